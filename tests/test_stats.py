"""Paired bootstrap: equal to a plain loop, exact corpus deltas (jiwer), sure of sure things, unsure of nothing."""

from __future__ import annotations

import json
import random

import jiwer
import numpy as np
import pytest

from conftest import SHARED
from mamcli import stats
from mamcli.errors import MamError
from mamcli.metrics import asr_scores, classification_scores, normaliser
from mamcli.stats import add_paired_columns, clip_counts, paired_bootstrap, word_counts

LJ_DIR = SHARED / "ljspeech-385" / "LJSpeech-1.1"
LJ = f"ljspeech:{LJ_DIR}"


def lj_refs(n: int) -> list[str]:
    lines = (LJ_DIR / "metadata.csv").read_text().splitlines()[:n]
    return [line.split("|")[1] for line in lines]


def garble(texts: list[str], rate: float, seed: int) -> list[str]:
    """Hypotheses with deleted, substituted and inserted words at about ``rate`` per word."""
    rng = random.Random(seed)
    out = []
    for t in texts:
        words: list[str] = []
        for w in t.split():
            x = rng.random()
            if x < rate / 3:
                continue
            words.append("zzz" if x < 2 * rate / 3 else w)
            if x > 1 - rate / 3:
                words.append("extra")
        out.append(" ".join(words))
    return out


def reference_bootstrap(row, base, resamples, seed, confidence=0.95):
    """The method written out one resample at a time, with Python integers."""
    rng = np.random.default_rng(seed)
    n = len(row)
    deltas = []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        words = sum(row[i][1] for i in idx)
        deltas.append(sum(row[i][0] for i in idx) / words - sum(base[i][0] for i in idx) / words)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(deltas, [tail, 100 - tail])
    total = sum(w for _, w in row)
    pairs = list(zip(row, base, strict=True))
    return {"delta": sum(e for e, _ in row) / total - sum(e for e, _ in base) / total,
            "delta_lo": float(lo), "delta_hi": float(hi), "better": sum(a[0] < b[0] for a, b in pairs),
            "worse": sum(a[0] > b[0] for a, b in pairs), "same": sum(a[0] == b[0] for a, b in pairs)}


@pytest.fixture(scope="module")
def systems():
    refs = lj_refs(120)
    return refs, garble(refs, 0.10, seed=1), garble(refs, 0.14, seed=2)


def test_word_counts_are_jiwers_per_utterance_and_in_total(systems):
    refs, hyps, _ = systems
    refs = [*refs[:5], "?!", *refs[5:]]  # normalises to nothing: left out, as asr_scores leaves it out
    hyps = [*hyps[:5], "noise", *hyps[5:]]
    counts = word_counts(refs, hyps)
    f = normaliser("basic")
    kept = [(f(r), f(h)) for r, h in zip(refs, hyps, strict=True) if f(r)]
    assert len(counts) == len(kept) == len(refs) - 1
    for (r, h), (errors, words) in zip(kept, counts, strict=True):
        one = jiwer.process_words(r, h)
        assert (errors, words) == (one.substitutions + one.deletions + one.insertions,
                                   one.hits + one.substitutions + one.deletions)
    scores = asr_scores(refs, hyps)
    assert sum(e for e, _ in counts) == scores["substitutions"] + scores["deletions"] + scores["insertions"]
    assert sum(w for _, w in counts) == scores["ref_words"]
    assert sum(e for e, _ in counts) > 100  # the garbling really made errors
    assert word_counts(refs, hyps, f) == counts  # the scorer's own function does as its name
    assert sum(e for e, _ in word_counts(refs, hyps, "none")) > sum(e for e, _ in counts)  # case and commas count


def test_corpus_delta_is_jiwers_wer_difference_exactly(systems):
    refs, a, b = systems
    f = normaliser("basic")
    r = paired_bootstrap(word_counts(refs, a), word_counts(refs, b), resamples=10)
    nr, na, nb = [f(x) for x in refs], [f(x) for x in a], [f(x) for x in b]
    assert r["delta"] == jiwer.wer(nr, na) - jiwer.wer(nr, nb)
    assert r["delta"] == asr_scores(refs, a)["wer"] - asr_scores(refs, b)["wer"]
    assert r["delta"] < 0  # a was garbled less
    assert r["better"] + r["worse"] + r["same"] == len(refs) and r["better"] > r["worse"]


@pytest.mark.parametrize("chunk", [stats._CHUNK, 1000])  # 1000: a few resamples per block
def test_vectorised_equals_loop(systems, monkeypatch, chunk):
    monkeypatch.setattr(stats, "_CHUNK", chunk)
    refs, a, b = systems
    ca, cb = word_counts(refs, a), word_counts(refs, b)
    fast = paired_bootstrap(ca, cb, resamples=300, seed=7)
    slow = reference_bootstrap(ca, cb, 300, 7)
    assert {k: fast[k] for k in slow} == slow  # bit-identical, not approximately
    assert fast["delta_lo"] < fast["delta"] < fast["delta_hi"]
    wide = paired_bootstrap(ca, cb, resamples=300, seed=7, confidence=0.99)
    assert wide["delta_lo"] <= fast["delta_lo"] and wide["delta_hi"] >= fast["delta_hi"]


def test_identical_systems_give_zero_and_a_zero_interval(systems):
    refs, a, _ = systems
    c = word_counts(refs, a)
    r = paired_bootstrap(c, c)
    assert (r["delta"], r["delta_lo"], r["delta_hi"]) == (0.0, 0.0, 0.0)
    assert (r["better"], r["worse"], r["same"]) == (0, 0, len(c))


def test_strictly_better_everywhere_excludes_zero():
    base = [(3, 10), (1, 4), (2, 7), (5, 12), (1, 3)] * 8
    row = [(e - 1, w) for e, w in base]
    r = paired_bootstrap(row, base, resamples=2000, seed=3)
    assert r["delta_hi"] < 0 and r["delta_lo"] < r["delta_hi"]
    assert r["delta"] == sum(e for e, _ in row) / 288 - sum(e for e, _ in base) / 288
    assert (r["better"], r["worse"], r["same"]) == (40, 0, 0)
    flipped = paired_bootstrap(base, row, resamples=2000, seed=3)
    assert flipped["delta_lo"] == -r["delta_hi"] and flipped["delta_hi"] == -r["delta_lo"]


def test_seeded_and_reproducible(systems):
    refs, a, b = systems
    ca, cb = word_counts(refs, a), word_counts(refs, b)
    assert paired_bootstrap(ca, cb, seed=5) == paired_bootstrap(ca, cb, seed=5)
    other = paired_bootstrap(ca, cb, seed=6)
    assert (other["delta_lo"], other["delta_hi"]) != (paired_bootstrap(ca, cb, seed=5)["delta_lo"],
                                                      paired_bootstrap(ca, cb, seed=5)["delta_hi"])


def test_classification_error_difference():
    labels = ["dog", "rain", "sea", "baby", "clock"] * 12
    base = [lab if i % 4 else "rain" for i, lab in enumerate(labels)]
    row = [lab if i % 5 else "sea" for i, lab in enumerate(labels)]
    r = paired_bootstrap(clip_counts(labels, row), clip_counts(labels, base), resamples=500, seed=1)
    assert r["delta"] == classification_scores(labels, row)["error"] - classification_scores(labels, base)["error"]
    assert {k: r[k] for k in ("delta_lo", "delta_hi", "better", "worse")} == {
        k: v for k, v in reference_bootstrap(clip_counts(labels, row), clip_counts(labels, base), 500, 1).items()
        if k in ("delta_lo", "delta_hi", "better", "worse")}


@pytest.mark.parametrize(("row", "base", "kw", "needle"), [
    ([(1, 3)], [(1, 3), (0, 2)], {}, "same utterances"),
    ([], [], {}, "at least one utterance"),
    ([(1, 0)], [(0, 0)], {}, "at least one reference word"),
    ([(1, 3)], [(1, 4)], {}, "same references"),
    ([(-1, 3)], [(1, 3)], {}, "negative"),
    ([(1, 3)], [(1, 3)], {"resamples": 0}, "at least 1"),
    ([(1, 3)], [(1, 3)], {"confidence": 1.0}, "confidence"),
])
def test_bad_input_is_one_line(row, base, kw, needle):
    with pytest.raises(MamError, match=needle):
        paired_bootstrap(row, base, **kw)


def test_no_scorable_reference():
    with pytest.raises(MamError, match="non-empty reference"):
        word_counts(["?!", ""], ["a", "b"])


def test_columns_on_a_real_sweep(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    r = mam("evaluate", tgt, "--data", LJ, "--limit", "4", "--source", src, "--lam", "0,0.5,1", "-q",
            "-o", tmp_path / "e.json")
    assert r.code == 0, r.err
    result = json.loads((tmp_path / "e.json").read_text())
    points, details = result["points"], result["details"]
    # the random model gets every word wrong at every λ: make λ = 0.5 right on the first clip
    half = details[f"all|0.5|{src.name}"]["utterances"]
    half[0]["hypothesis"] = half[0]["reference"]
    next(p for p in points if p["lam"] == 0.5)["error"] = asr_scores([u["reference"] for u in half],
                                                                     [u["hypothesis"] for u in half])["wer"]
    add_paired_columns(points, details, resamples=200, seed=2)
    base = next(p for p in points if p["column"] == "target")
    assert (base["delta"], base["delta_lo"], base["delta_hi"], base["better"], base["worse"]) == (0.0, 0.0, 0.0, 0, 0)
    utts = details["target"]["utterances"]
    base_counts = word_counts([u["reference"] for u in utts], [u["hypothesis"] for u in utts])
    for p in points:
        assert p["delta"] == p["error"] - base["error"]  # the sweep's own jiwer WERs
        key = "target" if p["column"] == "target" else f"{p['layers']}|{p['lam']}|{p['column']}"
        u = details[key]["utterances"]
        direct = paired_bootstrap(word_counts([x["reference"] for x in u], [x["hypothesis"] for x in u]), base_counts,
                                  200, 2)
        assert {k: p[k] for k in stats.COLUMNS} == {k: direct[k] for k in stats.COLUMNS}
    assert next(p for p in points if p["lam"] == 0.5)["better"] == 1
    other = f"all|1.0|{src.name}"
    add_paired_columns(points, details, baseline=other, resamples=50)
    assert next(p for p in points if p["lam"] == 1.0)["delta"] == 0.0
    with pytest.raises(MamError, match="unknown baseline"):
        add_paired_columns(points, details, baseline="nope")
    details[other]["utterances"] = details[other]["utterances"][1:]
    with pytest.raises(MamError, match="other clips"):
        add_paired_columns(points, details)


def test_columns_for_audio_events():
    clips = [{"id": f"c{i}", "label": lab, "predicted": lab} for i, lab in enumerate(["a", "b", "c", "d"] * 5)]
    worse = [{**c, "predicted": "a"} for c in clips]
    details = {"target": {"clips_detail": clips}, "all|0.1|src": {"clips_detail": worse}}
    points = [{"layers": None, "lam": 0.0, "column": "target", "error": 0.0},
              {"layers": "all", "lam": 0.1, "column": "src", "error": 0.75}]
    add_paired_columns(points, details, resamples=100)
    assert points[1]["delta"] == 0.75 and points[1]["worse"] == 15 and points[1]["better"] == 0
    assert 0 < points[1]["delta_lo"] <= 0.75 <= points[1]["delta_hi"]


def _table(both: int, worse: int, better: int, neither: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(row, baseline) clip counts of a paired 2×2 table of errors."""
    row = [(1, 1)] * (both + worse) + [(0, 1)] * (better + neither)
    base = [(1, 1)] * both + [(0, 1)] * worse + [(1, 1)] * better + [(0, 1)] * neither
    return row, base


@pytest.mark.parametrize(("k", "m"), [(0, 4), (4, 4), (18, 50), (32, 50), (3, 11), (7, 7), (5, 20)])
def test_exact_test_is_scipys_binomial_test(k, m):
    from scipy.stats import binomtest

    p, mid = stats.binomial_two_sided(k, m)
    assert p == pytest.approx(binomtest(k, m, 0.5).pvalue, rel=1e-12)
    low = min(k, m - k)  # mid-p by hand: the observed outcome counts half
    from math import comb
    assert mid == pytest.approx(min(1.0, 2 * sum(comb(m, i) for i in range(low)) / 2**m + comb(m, low) / 2**m))


def test_the_issues_cases_by_the_exact_test():
    # 4 of 80 clips change the same way: sign test p = 2 / 2**4 = 0.125, not shown (a bootstrap would say it is)
    r = stats.compare(*_table(10, 0, 4, 66), classification=True)
    assert (r["better"], r["worse"], r["p_value"]) == (4, 0, 0.125) and r["shown"] is False
    assert r["delta"] == pytest.approx(-4 / 80)
    # ESC-10 5-fold: 18 clips better, 32 worse: p ≈ 0.065
    r = stats.paired_exact(*_table(30, 32, 18, 320))
    assert r["p_value"] == pytest.approx(0.0649, abs=5e-4)


def test_newcombe_interval_equals_the_published_one():
    # Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8, Cavo et al. (2012):
    # the table [[59, 6], [16, 80]], Newcombe square-and-add: -0.0621 (95 % CI -0.1186 to -0.0046)
    r = stats.paired_exact(*_table(59, 6, 16, 80))
    assert (round(r["delta"], 4), round(r["delta_lo"], 4), round(r["delta_hi"], 4)) == (-0.0621, -0.1186, -0.0046)
    assert (r["better"], r["worse"], r["same"]) == (16, 6, 139)
    # the score interval excludes 0, the exact test (p = 0.0525) does not reject: not shown; its mid-p would
    assert r["p_value"] == pytest.approx(0.0525, abs=1e-4) and r["mid_p"] < 0.05
    assert stats.compare(*_table(59, 6, 16, 80), classification=True)["shown"] is False


def test_newcombe_interval_holds_its_level():
    """Coverage over simulated paired tables (n = 80, π_row = 0.25, π_base = 0.30, some agreement)."""
    rng = np.random.default_rng(0)
    probs = [0.15, 0.10, 0.15, 0.60]  # both wrong, worse, better, neither
    truth = probs[1] - probs[2]
    draws = rng.multinomial(80, probs, size=800)
    covered = sum(r["delta_lo"] <= truth <= r["delta_hi"] for r in (stats.paired_exact(*_table(*d)) for d in draws))
    assert 0.93 <= covered / len(draws) <= 0.985


def test_no_change_gives_zero_with_a_two_sided_interval():
    r = stats.paired_exact(*_table(20, 0, 0, 60))
    assert r["delta"] == 0 and r["delta_lo"] < 0 < r["delta_hi"] and r["p_value"] == 1.0
    assert r["delta_lo"] == pytest.approx(-r["delta_hi"])


def test_exact_test_refuses_word_counts():
    with pytest.raises(MamError, match="classification counts"):
        stats.paired_exact([(2, 3)], [(1, 3)])


def test_wer_default_is_ten_thousand_resamples():
    r = stats.compare([(1, 3), (0, 2)], [(2, 3), (1, 2)])
    assert r["resamples"] == 10_000 and "10000 resamples" in r["method"]
