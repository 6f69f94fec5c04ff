"""docs/results.md: its verdicts follow the intervals, and the committed page is what the renderer writes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import results_md as rm

from mamcli.stats import compare

HAVE_CV = (rm.RESULTS / "esc10-cv-cv.json").is_file()


def _clips(wrong: list[int], n: int = 80) -> list[tuple[int, int]]:
    return [(int(i in wrong), 1) for i in range(n)]


def test_four_clips_changing_one_way_on_80_are_no_detectable_gain():
    """The issue-25 case: a percentile bootstrap called this better; the sign test gives p = 0.125."""
    base = _clips(list(range(16)))
    row = _clips(list(range(4, 16)))  # 4 clips fixed, none broken
    c = compare(row, base, classification=True)
    assert (c["better"], c["worse"]) == (4, 0) and c["p_value"] == pytest.approx(0.125)
    assert not c["shown"]
    assert rm.verdict(c) == f"no detectable gain (allows gains up to {100 * -c['delta_lo']:.2f} pp)"
    said = rm.helped([({}, {"layers": "all", "lam": 0.05}, c)])
    assert said.startswith("no detectable gain: none of the 1 rows") and "still allow gains up to" in said


def test_no_is_said_only_when_no_interval_allows_a_gain():
    worse = {"shown": True, "delta": 0.02, "delta_lo": 0.01, "delta_hi": 0.03}
    open_ = {"shown": False, "delta": 0.02, "delta_lo": -0.005, "delta_hi": 0.04}
    p = {"layers": "all", "lam": 0.1}
    assert rm.helped([({}, p, worse)]).startswith("no: none of the 1 rows is better than λ = 0")
    assert rm.helped([({}, p, worse), ({}, p, open_)]).startswith(
        "no detectable gain: none of the 2 rows is better than λ = 0 by its interval; the intervals still allow "
        "gains up to 0.50 pp")
    better = {"shown": True, "delta": -0.02, "delta_lo": -0.03, "delta_hi": -0.01}
    assert rm.helped([({}, p, better), ({}, p, worse)]) == (
        "yes, by its interval, in 1 of 2 rows (layers all, λ = 0.1); 1 is worse (layers all, λ = 0.1)")


@pytest.mark.skipif(not HAVE_CV, reason="the cross-validation reports are not committed")
def test_cv_headline_is_the_exact_test_and_names_the_folds_that_are_worse():
    text = rm.section_esc10_cv()
    assert "of the 50 clips that changed, 18 got better and 32 worse: exact McNemar p = 0.065 (mid-p 0.049)" in text
    assert "Folds 3 and 4 are each worse by their own exact test and interval" in text
    assert "the interval ends at 0" not in text


def test_every_measurement_day_shows_its_own_versions():
    days = {d["day"]: rm.day_versions(d) for d in rm.sessions()}
    assert "transformers 5.24.0" in days["2026-11-25"] and "transformers 5.25.0" in days["2026-12-05"]


def test_committed_page_is_the_render():
    assert rm.PAGE.read_text() == rm.render(), "docs/results.md is stale: run .venv/bin/python benchmarks/results_md.py"
