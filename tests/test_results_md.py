"""docs/results.md: its verdicts follow the intervals, and the committed page is what the renderer writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import results_md as rm

from mamcli.stats import compare

HAVE_CV = (rm.RESULTS / "esc10-cv-cv.json").is_file()
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "search_bench.json"


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


def _search_report(which: str) -> dict:
    """A report of `mam search`'s JSON contract from the benchmark's (``real``: the LJ grid, unaligned, verdict
    inconclusive; ``control``: the positive control, helps): each candidate's per-round trace, which the benchmark
    left out, rebuilt from the clips each round had seen, and the test split's size."""
    r = json.loads(BENCH.read_text())[which]
    seen = sorted({row["clips"] for row in r["rounds"]})
    for row in r["rounds"]:
        row["trace"] = [{"clips": c, "error": row["error"]} for c in seen if c <= row["clips"]]
    r["inputs"] = {"test": {"clips": r["test"]["clips"]}}
    return r


@pytest.fixture
def results(tmp_path, monkeypatch):
    """docs/results/ as published but without its search reports, in a tmp dir where a test adds its own: links
    to the published reports are read, never written through."""
    for f in rm.RESULTS.iterdir():
        if not f.name.startswith("search-"):
            (tmp_path / f.name).symlink_to(f)
    monkeypatch.setattr(rm, "RESULTS", tmp_path)
    rm.load.cache_clear()
    yield tmp_path
    rm.load.cache_clear()


def _write(results: Path, name: str, report: dict) -> None:
    (results / f"{name}.json").unlink(missing_ok=True)  # a link to a published report is replaced, not followed
    (results / f"{name}.json").write_text(json.dumps(report))
    rm.load.cache_clear()


def _total(page: str) -> int:
    return int(page.split("This page shows ", 1)[1].split(" ", 1)[0])


def test_search_section_lists_every_missing_search_as_not_run(results):
    text = rm.section_search()
    assert text.count("| not run |") == 12  # 6 searches, in the overview and the alignment table
    assert text.count("\nNot run.\n") == 6
    assert "paired comparison" not in text
    assert "Did aligning help?" not in text


def test_search_verdict_cost_and_race_come_from_the_report(results):
    _write(results, "search-ljs", _search_report("real"))
    text = rm.section_search()
    assert ("**Verdict:** **inconclusive**: dev picked layers 2, λ = 0.05 (all-MiniLM-L6-v2); on the 272 test clips, "
            "against λ = 0, Δ -0.13 [-0.45, +0.17] pp: test does not confirm it, no detectable gain (allows gains up "
            "to 0.45 pp).") in text
    assert ("Dev: 592 clip evaluations against the full grid's 2373 (all 21 candidates on all 113 dev clips): 0.25× "
            "the grid (budget 791). Test: 816 clip evaluations. 2256 s in all.") in text
    assert "It ended after 2 rounds: budget spent, 32 of 113 dev clips seen." in text
    assert "split over 210 candidate pairs, α′ = 0.000238 per pair" in text
    assert "| 1 | 16 | 4 | 1 | 16 | layers all, λ = 0.2: degenerate: 1 clip(s) at the token bound" in text
    assert "| 2 | 32 | 0 | 1 | 15 | layers 2, λ = 0.3: worse than layers 2, λ = 0.05 beyond the bound |" in text
    assert "15 survivors left unseparated" in text
    assert "the real source did not beat it (no detectable difference)" in text
    assert "| LJ Speech, MiniLM | unaligned | **inconclusive** | layers 2, λ = 0.05 |" in text
    assert "*11 paired comparisons in this section" in text  # 3 on test, 8 grid rows on the same clips


def test_search_agreement_is_computed_from_the_grid_on_the_same_clips(results):
    report = _search_report("real")
    _write(results, "search-ljs", report)
    text = rm.section_search()
    assert ("**Agrees with the grid?** Yes. Of the search's 20 merge candidates, section 1's grid evaluated 8; on the "
            "same 272 test clips: no detectable gain: none of the 8 rows is better than λ = 0") in text
    assert "λ = 0 on these clips: 4.89 % in the search, 4.89 % in section 1's report (the same)." in text
    report.update(verdict="helps", picked={**report["picked"], "layers": "all", "lam": 0.1})
    _write(results, "search-ljs", report)
    text = rm.section_search()  # a "helps" the grid's own row for the pick does not bear out
    assert "**Agrees with the grid?** No." in text and "Its row for the pick: Δ +2.14 [+1.39, +2.96] pp, worse." in text


def test_search_comparisons_join_the_page_total_once(results):
    before = _total(rm.render())
    _write(results, "search-ljs", _search_report("real"))
    assert _total(rm.render()) == before + 3  # its 8 grid rows are section 1's rows, already counted
    esc = _search_report("real")  # the same race on ESC-10 with DINOv2: the grid is cut to fold 5's test clips
    for row in esc["rounds"]:
        row["column"] = "target" if row["lam"] == 0 else "dinov2-vits14"
    esc["picked"]["column"] = "dinov2-vits14"
    esc["inputs"]["test"]["clips"] = 61
    for key in ("test", "noise_control", "source_vs_noise"):
        esc[key] = {**esc[key], "clips": 61, "p_value": 0.5, "mid_p": 0.4}
    _write(results, "search-esc10-dinov2", esc)
    page = rm.render()
    assert "section 5's grid evaluated 11; on the same 61 test clips" in page
    assert _total(page) == before + 3 + 3 + 11


def test_alignment_reads_each_search_against_its_own_noise(results):
    _write(results, "search-ljs", _search_report("real"))
    aligned = _search_report("control")
    aligned["alignment"] = {"mode": "weights", "solved": 6,
                            "picked": {"mode": "weights", "cosine": {"identity": 0.0004, "aligned": 0.0855}}}
    _write(results, "search-ljs-aligned", aligned)
    text = rm.section_alignment()
    assert "| LJ Speech, MiniLM | --align weights | helps | layers all, λ = 0.05 |" in text
    assert "| beat it | 0.0004 → 0.0855 | — |" in text
    assert ("LJ Speech, MiniLM: aligning found a merge that helps where the unaligned search did not (unaligned, the "
            "search picked a merge that test does not confirm; aligned, it found a merge that test confirms") in text
    assert "against its aligned noise: -110.88 [-124.45, -98.22] pp, the real weights do better" in text


def test_machine_records_versions_show_on_their_day():
    v = {"mam": "0.1.0", "python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.25.0", "numpy": "2.4.6"}
    day = {"day": "2026-12-06", "records": [{"versions": v}], "runs": []}
    assert rm.day_versions(day) == ("2026-12-06: no report of that day recorded versions; results.sh's machine "
                                    "record: mam 0.1.0, python 3.11.7, torch 2.13.0+cpu, transformers 5.25.0, "
                                    "numpy 2.4.6")


def test_committed_page_is_the_render():
    assert rm.PAGE.read_text() == rm.render(), "docs/results.md is stale: run .venv/bin/python benchmarks/results_md.py"
