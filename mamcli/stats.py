"""Paired statistics: how sure is a difference in WER (or classification error) between two systems?

Both systems are scored on the same utterances, so they are compared pairwise. For each utterance
we keep ``(errors, reference words)``: jiwer's substitutions + deletions + insertions and
hits + substitutions + deletions (a clip of a classifier is ``(0 or 1, 1)``). The error rate of a
set is pooled, as jiwer's corpus WER is: ``sum(errors) / sum(words)``, not a mean of per-utterance
rates. The difference is ``row − baseline``, so a negative delta means the row makes fewer errors.

Confidence interval: the paired bootstrap of Bisani & Ney (2004, "Bootstrap estimates for
confidence intervals in ASR performance evaluation", ICASSP). B times, draw n utterance indices
with replacement (a seeded ``numpy.random.Generator``); apply the *same* indices to both systems;
compute the pooled difference on the resample. The interval is the percentile interval of the B
differences (``numpy.percentile``, linear interpolation): for 95 %, the 2.5th and 97.5th
percentiles. Sharing the indices keeps the correlation between the systems (the same hard
utterances are hard for both), which makes the interval much narrower than two independent
intervals would. An interval that excludes 0 says the difference is unlikely to be resampling
noise of this test set; it says nothing about other data.

The counts ``better``/``worse``/``same`` compare per-utterance error counts (row vs baseline).

Classification error (every clip ``(0 or 1, 1)``) is not bootstrapped: with few changed clips a percentile
bootstrap is too sure of itself (on 80 clips it calls 4 clips changing the same way significant). Only the
discordant clips carry information about the difference, so :func:`paired_exact` gives the exact McNemar
test (two-sided binomial test of ``worse`` among ``better + worse`` at ½; the mid-p beside it, Fagerland,
Lydersen & Laake 2013, "The McNemar test for binary matched-pairs data: mid-p and asymptotic are better than
exact conditional", BMC Med. Res. Methodol. 13:91) and Newcombe's hybrid score interval for the paired
difference of proportions (Newcombe 1998, "Improved confidence intervals for the difference between binomial
proportions based on paired data", Stat. Med. 17:2635, method 10). A difference counts as shown (``shown``)
only when the interval excludes 0 *and* the exact test rejects: the score interval alone is slightly liberal
when nearly every clip is concordant.

Several comparisons in one report: each interval holds at 95 % on its own; a report states how many it shows
(``comparisons``), so a reader knows that about one in twenty excludes 0 by chance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mamcli.errors import MamError
from mamcli.metrics import normaliser

Counts = Sequence[tuple[int, int]]  # per utterance: (errors, reference words)
Norm = str | Callable[[str], str]  # a normaliser's name, or the very function the WER was scored with

COLUMNS = ("delta", "delta_lo", "delta_hi", "better", "worse", "same")
RESAMPLES = 10_000  # the default of the paired bootstrap: milliseconds on per-clip counts, stable intervals
_CHUNK = 1 << 22  # indices drawn per block: bounds memory, and the Generator's stream does not depend on it


def _text_normaliser(norm: Norm) -> Callable[[str], str]:
    return normaliser(norm) if isinstance(norm, str) else norm


def word_counts(refs: list[str], hyps: list[str], norm: Norm = "basic") -> list[tuple[int, int]]:
    """(errors, reference words) per utterance from jiwer's alignment of the normalised texts.

    Utterances whose normalised reference is empty are left out, as ``asr_scores`` leaves them out of
    the WER; they depend on the references only, so two systems on the same clips stay aligned.
    """
    f = _text_normaliser(norm)
    return _aligned([(ref, f(h)) for r, h in zip(refs, hyps, strict=True) if (ref := f(r))])


def _aligned(kept: list[tuple[str, str]]) -> list[tuple[int, int]]:
    """Counts of normalised (reference, hypothesis) pairs whose reference is not empty."""
    import jiwer

    if not kept:
        raise MamError("no utterance with a non-empty reference transcript to score")
    out = jiwer.process_words([r for r, _ in kept], [h for _, h in kept])
    counts = []
    for chunks in out.alignments:
        errors = words = 0
        for c in chunks:
            span_ref, span_hyp = c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx
            words += span_ref
            errors += span_hyp if c.type == "insert" else (0 if c.type == "equal" else span_ref)
        counts.append((errors, words))
    return counts


def clip_counts(labels: list[str], predicted: list[str]) -> list[tuple[int, int]]:
    """(1 if wrong else 0, 1) per clip: the classification error is then the same pooled rate."""
    return [(int(r != p), 1) for r, p in zip(labels, predicted, strict=True)]


def _arrays(row: Counts, baseline: Counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(row) != len(baseline):
        raise MamError(f"paired statistics need the same utterances: {len(row)} against {len(baseline)}")
    if not row:
        raise MamError("paired statistics need at least one utterance")
    a, b = np.asarray(row, dtype=np.int64).reshape(-1, 2), np.asarray(baseline, dtype=np.int64).reshape(-1, 2)
    if not np.array_equal(a[:, 1], b[:, 1]):
        raise MamError("paired statistics need the same references: the word counts of the two systems differ")
    if (a[:, 0] < 0).any() or (b[:, 0] < 0).any():
        raise MamError("error counts must not be negative")
    if (a[:, 1] < 1).any():
        raise MamError("every utterance needs at least one reference word")
    return a[:, 0], b[:, 0], a[:, 1]


def paired_bootstrap(row: Counts, baseline: Counts, resamples: int = RESAMPLES, seed: int = 0,
                     confidence: float = 0.95) -> dict[str, Any]:
    """Pooled error difference ``row − baseline``, its percentile bootstrap interval, and who got better."""
    if resamples < 1:
        raise MamError(f"the number of bootstrap resamples must be at least 1; got {resamples}")
    if not 0 < confidence < 1:
        raise MamError(f"the confidence level must lie strictly between 0 and 1; got {confidence}")
    ea, eb, w = _arrays(row, baseline)
    n, words = len(w), int(w.sum())
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    step = max(1, _CHUNK // n)
    for s in range(0, resamples, step):
        idx = rng.integers(0, n, size=(min(step, resamples - s), n))
        ws = w[idx].sum(axis=1)
        deltas[s:s + len(idx)] = ea[idx].sum(axis=1) / ws - eb[idx].sum(axis=1) / ws
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(deltas, [tail, 100 - tail])
    return {"delta": int(ea.sum()) / words - int(eb.sum()) / words, "delta_lo": float(lo), "delta_hi": float(hi),
            "better": int((ea < eb).sum()), "worse": int((ea > eb).sum()), "same": int((ea == eb).sum()),
            "utterances": n, "resamples": resamples, "seed": seed, "confidence": confidence}


def detail_counts(scores: dict[str, Any], norm: Norm = "basic") -> tuple[list[str], list[tuple[int, int]]]:
    """(clip ids, counts) from one entry of a sweep's ``details``: ``utterances`` (ASR) or ``clips_detail``."""
    if "utterances" in scores:
        f = _text_normaliser(norm)
        texts = [(u["id"], f(u["reference"]), f(u["hypothesis"])) for u in scores["utterances"]]
        kept = [t for t in texts if t[1]]
        return [i for i, _, _ in kept], _aligned([(r, h) for _, r, h in kept])
    if "clips_detail" not in scores:
        raise MamError("paired statistics need per-utterance results (utterances or clips_detail)")
    clips = scores["clips_detail"]
    return [c["id"] for c in clips], clip_counts([str(c["label"]) for c in clips], [c["predicted"] for c in clips])


def detail_key(point: dict[str, Any]) -> str:
    """The key of a sweep point in ``details``, as ``sweep`` writes it."""
    return "target" if point["column"] == "target" else f"{point['layers']}|{point['lam']}|{point['column']}"


def add_paired_columns(points: list[dict[str, Any]], details: dict[str, dict[str, Any]], baseline: str = "target",
                       norm: Norm = "basic", resamples: int = RESAMPLES, seed: int = 0) -> None:
    """Add ``delta``, ``delta_lo``, ``delta_hi``, ``better``, ``worse``, ``same`` to every point, in place
    (audio events also ``p_value`` and ``mid_p`` of the exact test, see :func:`compare`).

    ``baseline`` is a key of ``details`` (λ = 0 is ``"target"``). Every point is resampled with the
    same seed, so all rows of a sweep see the same bootstrap draws. ``norm`` must be the normaliser the
    WER was scored with (ignored for audio events).
    """
    if baseline not in details:
        raise MamError(f"unknown baseline {baseline!r}; choose one of {', '.join(details)}")
    base_ids, base = detail_counts(details[baseline], norm)
    for p in points:
        ids, counts = detail_counts(details[detail_key(p)], norm)
        if ids != base_ids:
            raise MamError(f"row {detail_key(p)!r} was scored on other clips than the baseline {baseline!r}")
        stats = compare(counts, base, resamples, seed, classification="clips_detail" in details[baseline])
        p.update({k: stats[k] for k in (*COLUMNS, "p_value", "mid_p") if k in stats})


def method(classification: bool, resamples: int = RESAMPLES) -> str:
    """The paired method :func:`compare` uses, in words for a report."""
    if classification:
        return ("exact McNemar test on the clips that changed (two-sided; mid-p beside it) and Newcombe's hybrid "
                "score 95 % interval for the paired difference (Newcombe 1998, method 10)")
    return (f"paired bootstrap over utterances, {resamples} resamples, 95 % percentile interval of the error "
            "difference (Bisani & Ney 2004)")


def compare(row: Counts, baseline: Counts, resamples: int = RESAMPLES, seed: int = 0, *,
            classification: bool = False, confidence: float = 0.95) -> dict[str, Any]:
    """``row − baseline`` with the method fit for the data: exact for classification error, bootstrap for WER.
    ``shown`` says the interval excludes 0 (and, for classification, the exact test rejects too)."""
    if classification:
        out = paired_exact(row, baseline, confidence)
        out["shown"] = (out["delta_hi"] < 0 or out["delta_lo"] > 0) and out["p_value"] < 1 - confidence
    else:
        out = paired_bootstrap(row, baseline, resamples, seed, confidence)
        out["shown"] = out["delta_hi"] < 0 or out["delta_lo"] > 0
    out["method"] = method(classification, resamples)
    return out


def _wilson(x: int, n: int, z: float) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``x / n``."""
    p = x / n
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float((centre - half) / (1 + z * z / n)), float((centre + half) / (1 + z * z / n))


def binomial_two_sided(k: int, m: int) -> tuple[float, float]:
    """(exact p, mid-p) of a two-sided test of ``k`` successes in ``m`` trials at ½: twice the smaller tail
    (capped at 1); the mid-p counts the observed outcome's probability half."""
    if m == 0:
        return 1.0, 1.0
    from scipy.stats import binom

    low = min(k, m - k)
    tail, point = float(binom.cdf(low, m, 0.5)), float(binom.pmf(low, m, 0.5))
    return min(1.0, 2 * tail), min(1.0, 2 * tail - point)


def paired_exact(row: Counts, baseline: Counts, confidence: float = 0.95) -> dict[str, Any]:
    """Paired difference of two classification error rates (``row − baseline``): the exact McNemar test on the
    discordant clips and Newcombe's (1998) method-10 interval, from Wilson intervals of both rates and the
    φ correlation of the 2×2 table (with his continuity-corrected φ when the rates are positively associated)."""
    if not 0 < confidence < 1:
        raise MamError(f"the confidence level must lie strictly between 0 and 1; got {confidence}")
    ea, eb, w = _arrays(row, baseline)
    if (w != 1).any() or (ea > 1).any() or (eb > 1).any():
        raise MamError("the exact paired test takes classification counts: (0 or 1 errors, 1) per clip")
    n = len(w)
    both, worse = int(((ea == 1) & (eb == 1)).sum()), int(((ea == 1) & (eb == 0)).sum())
    better, neither = int(((ea == 0) & (eb == 1)).sum()), int(((ea == 0) & (eb == 0)).sum())
    from scipy.stats import norm as gauss

    z = float(gauss.ppf(1 - (1 - confidence) / 2))
    p1, p2 = (both + worse) / n, (both + better) / n
    (l1, u1), (l2, u2) = _wilson(both + worse, n, z), _wilson(both + better, n, z)
    margins = (both + worse) * (better + neither) * (both + better) * (worse + neither)
    cross = both * neither - worse * better
    phi = 0.0 if margins == 0 else (max(cross - n / 2, 0) if cross > 0 else cross) / np.sqrt(margins)
    delta = p1 - p2
    lo = delta - np.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    hi = delta + np.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    p, mid = binomial_two_sided(worse, worse + better)
    return {"delta": delta, "delta_lo": float(max(lo, -1.0)), "delta_hi": float(min(hi, 1.0)), "better": better,
            "worse": worse, "same": both + neither, "utterances": n, "p_value": p, "mid_p": mid,
            "confidence": confidence}
