"""The cross-validation script pools the test folds' predictions before comparing two systems."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from esc_cv import compare

from mamcli.stats import clip_counts, paired_bootstrap


def _report(clips: list[tuple[str, str, str]]) -> dict:
    return {"details": {"target": {"clips_detail": [{"id": i, "label": lab, "predicted": p} for i, lab, p in clips]}}}


def test_folds_are_pooled_before_the_paired_statistics():
    fold1 = [("a", "dog", "dog"), ("b", "rain", "dog")]
    fold2 = [("c", "dog", "dog"), ("d", "rain", "rain"), ("e", "sea", "rain")]
    plain = [_report(fold1), _report(fold2)]
    merged = [_report([("b", "rain", "rain"), ("a", "dog", "rain")]), _report([("e", "sea", "sea"), *fold2[:2]])]
    got = compare(plain, merged, resamples=200, seed=3)
    assert got["clips"] == 5 and got["plain_error"] == 2 / 5 and got["merged_error"] == 1 / 5
    labels = ["dog", "rain", "dog", "rain", "sea"]
    want = paired_bootstrap(clip_counts(labels, ["rain", "rain", "dog", "rain", "sea"]),
                            clip_counts(labels, ["dog", "dog", "dog", "rain", "rain"]), 200, 3)
    assert {k: got[k] for k in want} == want
    assert (got["better"], got["worse"]) == (2, 1)


def test_overlapping_or_different_clips_are_refused():
    one = _report([("a", "dog", "dog")])
    with pytest.raises(SystemExit, match="overlap"):
        compare([one, one], [one, one], 10, 0)
    with pytest.raises(SystemExit, match="different clips"):
        compare([one], [_report([("z", "dog", "dog")])], 10, 0)


def test_a_unit_is_reused_only_with_the_same_arguments(tmp_path, monkeypatch):
    import esc_cv

    calls: list[tuple[str, ...]] = []

    def fake_mam(*args: str) -> None:  # evaluate writes its report where -o says
        calls.append(args)
        if args[0] == "evaluate":
            fold = args[args.index("--folds") + 1]
            Path(args[args.index("-o") + 1]).write_text(json.dumps({"fold": fold}))

    monkeypatch.setattr(esc_cv, "_mam", fake_mam)
    run = lambda lr: esc_cv.unit(tmp_path, "T", "folders:D", "5", "1,2,3,4", "plain", ["--lr", lr])  # noqa: E731
    assert run("1e-4") == {"fold": "5"} and [c[0] for c in calls] == ["finetune", "evaluate"]
    assert calls[0][calls[0].index("--folds") + 1] == "1,2,3,4" and "1e-4" in calls[0]
    assert run("1e-4") == {"fold": "5"} and len(calls) == 2  # reused: nothing ran
    assert run("1e-3") == {"fold": "5"} and len(calls) == 4  # other arguments: run again
    (tmp_path / "fold5-plain.args.json").unlink()  # a unit stopped before its end has no args file
    run("1e-3")
    assert len(calls) == 6
