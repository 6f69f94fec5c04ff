"""Scores: word/character error rates (jiwer), classification error, and layer similarity (numpy, POT)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from mamcli.errors import MamError

NORMALISERS = ("auto", "whisper", "basic", "none")
RANK_METRICS = ("swd", "euclidean", "inner")
ORIENTATION = {"swd": "lower is more similar", "euclidean": "lower is more similar",
               "inner": "higher is more similar"}


def resolve_normaliser(name: str, default: str) -> str:
    """``auto`` → the task's default (whisper for sequence-to-sequence, basic for CTC); a bad name is an error."""
    if name not in NORMALISERS:
        raise MamError(f"--normalizer must be one of {', '.join(NORMALISERS)}; got {name!r}")
    return default if name == "auto" else name


def normaliser(name: str, spelling: dict[str, str] | None = None) -> Callable[[str], str]:
    """A named text normaliser (string → string), recorded in every report.

    ``whisper``: transformers' ``EnglishTextNormalizer`` (Whisper's English normaliser: lower case, no
    punctuation or bracketed words, numbers and British spellings standardised), with the tokenizer's
    spelling map when it ships one."""
    import jiwer

    if name == "basic":  # lower-case, drop punctuation (apostrophes too), collapse whitespace
        return jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                              jiwer.Strip()])
    if name == "none":
        return jiwer.Compose([jiwer.RemoveMultipleSpaces(), jiwer.Strip()])
    if name == "whisper":
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        english = EnglishTextNormalizer(spelling or {})
        return lambda s: english(s).strip()
    raise MamError(f"--normalizer must be one of {', '.join(n for n in NORMALISERS if n != 'auto')}; got {name!r}")


def describe_normaliser(name: str, spelling: dict[str, str] | None = None) -> str:
    return {"basic": "jiwer: ToLowerCase, RemovePunctuation, RemoveMultipleSpaces, Strip",
            "none": "jiwer: RemoveMultipleSpaces, Strip",
            "whisper": f"transformers EnglishTextNormalizer (Whisper's English normaliser), spelling map of "
                       f"{len(spelling or {})} entries (the tokenizer's normalizer.json, when present)"}[name]


def asr_scores(refs: list[str], hyps: list[str], norm: str = "basic",
               spelling: dict[str, str] | None = None) -> dict[str, Any]:
    """WER and CER with substitution/insertion/deletion counts, on normalised text.

    Utterances whose normalised reference is empty cannot be scored and are counted apart.
    """
    import jiwer

    f = normaliser(norm, spelling)
    pairs = [(f(r), f(h)) for r, h in zip(refs, hyps, strict=True)]
    kept = [(r, h) for r, h in pairs if r]
    if not kept:
        raise MamError("no utterance with a non-empty reference transcript to score")
    r_list, h_list = [r for r, _ in kept], [h for _, h in kept]
    words = jiwer.process_words(r_list, h_list)
    chars = jiwer.process_characters(r_list, h_list)
    return {"wer": words.wer, "cer": chars.cer, "substitutions": words.substitutions,
            "insertions": words.insertions, "deletions": words.deletions, "hits": words.hits,
            "ref_words": words.hits + words.substitutions + words.deletions, "scored": len(kept),
            "empty_references": len(pairs) - len(kept)}


def classification_scores(refs: list[str], preds: list[str]) -> dict[str, Any]:
    """Error rate, accuracy and per-class confusion counts (reference → predicted → count)."""
    if not refs:
        raise MamError("no clip to score")
    correct = sum(r == p for r, p in zip(refs, preds, strict=True))
    confusion: dict[str, dict[str, int]] = {}
    for (r, p), n in sorted(Counter(zip(refs, preds, strict=True)).items()):
        confusion.setdefault(r, {})[p] = n
    per_class = {c: {"clips": sum(row.values()), "correct": row.get(c, 0)} for c, row in confusion.items()}
    return {"error": 1 - correct / len(refs), "accuracy": correct / len(refs), "clips": len(refs),
            "per_class": per_class, "confusion": confusion}


def layer_scores(audio: np.ndarray, text: np.ndarray, metric: str, n_projections: int = 200,
                 seed: int = 0) -> float:
    """Similarity of one layer's pooled vectors (rows are paired clips/transcripts).

    euclidean: mean over pairs of ‖a − t‖₂; inner: mean over pairs of ⟨a, t⟩; swd: POT's sliced
    Wasserstein distance between the two sets, with seeded projections.
    """
    a, t = np.asarray(audio, dtype=np.float64), np.asarray(text, dtype=np.float64)
    if metric == "euclidean":
        return float(np.linalg.norm(a - t, axis=1).mean())
    if metric == "inner":
        return float(np.einsum("nd,nd->n", a, t).mean())
    if metric == "swd":
        import ot

        return float(ot.sliced_wasserstein_distance(a, t, n_projections=n_projections, seed=seed))
    raise MamError(f"--metric must be one of {', '.join(RANK_METRICS)} or all; got {metric!r}")


def ranking(scores: list[float], metric: str) -> tuple[list[int], list[int]]:
    """(order: layers best first, rank: 1-based rank of each layer); ties keep the lower layer first."""
    sign = -1.0 if metric == "inner" else 1.0
    order = sorted(range(len(scores)), key=lambda i: (sign * scores[i], i))
    rank = [0] * len(scores)
    for r, i in enumerate(order):
        rank[i] = r + 1
    return order, rank
