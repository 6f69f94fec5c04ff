"""evaluate: jiwer-equal scores, sweep points equal written checkpoints, labels, bad clips, dev/test."""

from __future__ import annotations

import json

import jiwer
import pytest
import torch

from conftest import ESC10_CLASSES, SHARED
from mamcli.metrics import asr_scores, classification_scores

LJ = f"ljspeech:{SHARED}/ljspeech-385/LJSpeech-1.1"
ESC10 = f"folders:{SHARED}/esc10/ESC-10"


def test_wer_cer_equal_jiwer_on_known_strings():
    refs = ["The cat sat on the mat.", "Hello, World!", "a b c d"]
    hyps = ["the cat sat on mat", "hello word", "a x c d e"]
    got = asr_scores(refs, hyps, "basic")
    norm = ["the cat sat on the mat", "hello world", "a b c d"]
    assert got["wer"] == jiwer.wer(norm, hyps)
    assert got["cer"] == jiwer.cer(norm, hyps)
    out = jiwer.process_words(norm, hyps)
    assert (got["substitutions"], got["insertions"], got["deletions"]) == (out.substitutions, out.insertions,
                                                                           out.deletions)
    assert (got["substitutions"], got["insertions"], got["deletions"]) == (2, 1, 1)
    assert got["wer"] == pytest.approx(4 / 12)
    raw = asr_scores(["Hello, World!"], ["hello world"], "none")
    assert raw["wer"] == 1.0


def test_classification_scores():
    s = classification_scores(["dog", "dog", "rain", "rain"], ["dog", "rain", "rain", "rain"])
    assert s["error"] == 0.25 and s["accuracy"] == 0.75
    assert s["confusion"] == {"dog": {"dog": 1, "rain": 1}, "rain": {"rain": 2}}


def test_sweep_point_equals_merged_checkpoint(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=4), tiny("hubert-ctc", layers=4)
    r = mam("evaluate", tgt, "--data", LJ, "--limit", "5", "--source", src, "--lam", "0,0.3", "--layers", "2-3",
            "--noise", "normal", "-o", tmp_path / "sweep.json", "--format", "csv")
    assert r.code == 0, r.err
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["first_merged_layer"] == 2
    stats = ("rel.red.", "delta", "delta_lo", "delta_hi", "better", "worse", "same")
    name = src.name  # columns name models as people do, not by path; error rates are fractions, and say so
    assert r.out.splitlines()[0] == ",".join(["split", "layers", "lam", f"{name} wer_fraction",
                                              "noise:normal wer_fraction",
                                              *(f"{name} {k}" for k in stats),
                                              *(f"noise:normal {k}" for k in stats)])
    for column, extra in ((src.name, []), ("noise:normal", ["--noise", "normal"])):
        out = tmp_path / column.replace("/", "_").replace(":", "_")
        assert mam("merge", src, tgt, "--lam", "0.3", "--layers", "2-3", *extra, "-o", out, "-q").code == 0
        r = mam("evaluate", out, "--data", LJ, "--limit", "5", "-o", tmp_path / "one.json")
        assert r.code == 0, r.err
        single = json.loads((tmp_path / "one.json").read_text())
        point = sweep["details"][f"2-3|0.3|{column}"]
        assert point["utterances"] == single["details"]["target"]["utterances"]
        assert point["wer"] == single["baseline"]["wer"] and point["cer"] == single["baseline"]["cer"]
    # the baseline row of the sweep equals evaluating the target alone
    r = mam("evaluate", tgt, "--data", LJ, "--limit", "5", "-o", tmp_path / "base.json")
    base = json.loads((tmp_path / "base.json").read_text())
    assert base["details"]["target"]["utterances"] == sweep["details"]["target"]["utterances"]


def test_replay_cache_budget_changes_speed_not_results(tiny, mam, tmp_path):
    """Past --cache-gb, batches run in full at every point: the same numbers, fewer batches replayed."""
    src, tgt = tiny("bert", layers=4), tiny("hubert-ctc", layers=4)
    args = ("evaluate", tgt, "--data", LJ, "--limit", "6", "--source", src, "--lam", "0,0.3", "--layers", "2-3")
    assert mam(*args, "-o", tmp_path / "all.json").code == 0
    full = json.loads((tmp_path / "all.json").read_text())
    cache = full["replay_cache"]
    assert cache["batches_replayed"] == cache["batches"] == 6 and cache["used_bytes"] > 0
    half = cache["used_bytes"] / 2 / 2**30  # longest clips first: room for one to three of the six batches
    for gb, replayed in ((half, (1, 2, 3)), (0, (0,))):
        r = mam(*args, "--cache-gb", gb, "-o", tmp_path / "part.json")
        assert r.code == 0, r.err
        part = json.loads((tmp_path / "part.json").read_text())
        assert part["replay_cache"]["batches_replayed"] in replayed
        assert part["replay_cache"]["used_bytes"] <= part["replay_cache"]["budget_bytes"]
        for key, scores in full["details"].items():
            assert part["details"][key]["utterances"] == scores["utterances"]
            assert part["details"][key]["wer"] == scores["wer"]


def test_blocks_and_table(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=4), tiny("hubert-ctc", layers=4)
    r = mam("evaluate", tgt, "--data", LJ, "--limit", "3", "--source", src, "--lam", "0,0.2,0.4", "--blocks", "2",
            "--format", "json", "--plot", tmp_path / "p.png")
    assert r.code == 0, r.err
    rows = json.loads(r.out)
    assert [(x["layers"], x["lam"]) for x in rows] == [("-", 0.0), ("0-1", 0.2), ("0-1", 0.4), ("2-3", 0.2),
                                                       ("2-3", 0.4)]
    wer = f"{src.name} wer_fraction"
    base = rows[0][wer]
    assert 0 < base <= 5  # a fraction (a random tiny model's WER passes 1 with insertions), not percent
    for x in rows[1:]:
        assert x[f"{src.name} rel.red."] == pytest.approx((base - x[wer]) / base)
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_audio_events_with_label_map_and_names(tiny, mam, tmp_path):
    import shutil

    ast = tmp_path / "ast"
    shutil.copytree(tiny("ast", layers=2), ast)
    classes = ESC10_CLASSES
    (tmp_path / "map.json").write_text(json.dumps({c: f"LABEL_{i}" for i, c in enumerate(classes)}))
    r = mam("evaluate", ast, "--data", ESC10, "--folds", "1", "--limit", "6", "-o", tmp_path / "a.json")
    assert r.code == 1 and "--label-map" in r.err
    r = mam("evaluate", ast, "--data", ESC10, "--folds", "1", "--limit", "6", "--label-map", tmp_path / "map.json",
            "-o", tmp_path / "a.json")
    assert r.code == 0, r.err
    a = json.loads((tmp_path / "a.json").read_text())["details"]["target"]
    assert a["clips"] == 6 and 0.0 <= a["error"] <= 1.0
    assert all(d["label"] in classes for d in a["clips_detail"])
    # by name: the model's labels are spelled differently (underscores, case)
    cfg = json.loads((ast / "config.json").read_text())
    cfg["id2label"] = {str(i): c.lower().replace(" ", "_") for i, c in enumerate(classes)}
    cfg["label2id"] = {v: int(k) for k, v in cfg["id2label"].items()}
    (ast / "config.json").write_text(json.dumps(cfg))
    r = mam("evaluate", ast, "--data", ESC10, "--folds", "1", "--limit", "6", "-o", tmp_path / "b.json")
    assert r.code == 0, r.err
    b = json.loads((tmp_path / "b.json").read_text())["details"]["target"]
    assert [d["predicted"] for d in b["clips_detail"]] == [d["predicted"] for d in a["clips_detail"]]


def test_bad_clips_are_named_and_strict_is_fatal(tiny, mam, tmp_path):
    good = sorted((SHARED / "fsdd/recordings").glob("*_jackson_0.flac"))[:2]
    (tmp_path / "bad.wav").write_bytes(b"garbage")
    rows = [{"audio": str(p), "text": "one"} for p in good] + [{"audio": "bad.wav", "text": "two"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tgt = tiny("hubert-ctc", layers=2)
    r = mam("evaluate", tgt, "--data", tmp_path / "m.jsonl", "-o", tmp_path / "r.json")
    assert r.code == 0, r.err
    assert "skipped clip bad" in r.err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [b["id"] for b in rep["evaluation"]["bad_clips"]] == ["bad"] and rep["evaluation"]["clips"] == 2
    assert rep["evaluation"]["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # --device auto
    r = mam("evaluate", tgt, "--data", tmp_path / "m.jsonl", "--strict", "-q")
    assert r.code == 1 and r.err.count("\n") == 1 and r.err.startswith("mam: error: ") and "bad.wav" in r.err


def test_pick_on_dev_reports_best_on_test(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    r = mam("evaluate", tgt, "--data", f"fsdd:{SHARED}/fsdd/recordings", "--limit", "6", "--dev-fraction", "0.5",
            "--source", src, "--lam", "0,0.5", "--pick-on-dev", "-o", tmp_path / "r.json", "--format", "csv")
    assert r.code == 0, r.err
    rep = json.loads((tmp_path / "r.json").read_text())
    best = rep["best_on_dev"]
    dev_errors = [p["error"] for p in rep["dev"]["points"]]
    assert best["error"] == min(dev_errors)
    assert {x.split(",")[0] for x in r.out.strip().splitlines()[1:]} == {"dev", "test"}


@pytest.mark.parametrize("args,needle", [
    (["--lam", "0,0.1"], "needs --source"),
    (["--lam", "0.1", "--noise", "source", "--noise-only"], "--source"),
    (["--lam", "x"], "--lam"), (["--task", "tts"], "--task"),
    (["--normalizer", "fancy"], "--normalizer"), (["--split", "train"], "--split"),
])
def test_evaluate_errors(args, needle, tiny, mam):
    r = mam("evaluate", tiny("hubert-ctc", layers=2), "--data", LJ, "--limit", "2", "-q", *args)
    assert r.code != 0 and needle in r.err and r.err.count("\n") == 1, r.err


def test_plain_evaluation_and_noise_only_sweep(tiny, mam):
    tgt = tiny("hubert-ctc", layers=2)
    r = mam("evaluate", tgt, "--data", LJ, "--limit", "2", "-q", "--format", "csv")
    assert r.code == 0, r.err
    header, _ = r.out.strip().splitlines()
    assert header == "split,layers,lam,error_fraction,wer_fraction,cer_fraction,substitutions,insertions,deletions"
    r = mam("evaluate", tgt, "--data", LJ, "--limit", "2", "-q", "--format", "json", "--lam", "0,0.5",
            "--noise", "target,normal", "--noise-only")
    assert r.code == 0, r.err
    rows = json.loads(r.out)
    assert [x["lam"] for x in rows] == [0.0, 0.5]
    assert {"noise:target wer_fraction", "noise:normal wer_fraction"} <= rows[1].keys()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA message")
def test_unavailable_device_is_one_line(tiny, mam):
    r = mam("evaluate", tiny("hubert-ctc", layers=2), "--data", LJ, "--limit", "1", "-q", "--device", "cuda")
    assert r.code == 1 and r.err == "mam: error: --device cuda: CUDA is not available on this machine\n"


def test_unwritable_report_path_is_one_line(tiny, mam, tmp_path):
    (tmp_path / "a-file").write_text("")
    r = mam("evaluate", tiny("hubert-ctc", layers=2), "--data", LJ, "--limit", "1", "-q",
            "-o", tmp_path / "a-file" / "r.json")
    assert r.code == 1 and r.err.startswith("mam: error: cannot write ") and r.err.count("\n") == 1, r.err


def test_progress_bars_on_a_terminal_count_clips_and_batches(tiny, mam, monkeypatch):
    """On a terminal stderr shows a bar per stage (evaluate: clips read, batches scored; rank-layers: clips
    read, audio and text encoded); stdout stays clean."""
    import io

    from rich.console import Console

    import mamcli.cli

    buf = io.StringIO()
    monkeypatch.setattr(mamcli.cli, "err", Console(file=buf, force_terminal=True, width=120))
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    r = mam("evaluate", tgt, "--data", LJ, "--limit", "3", "--source", src, "--lam", "0,0.1", "--format", "csv")
    assert r.code == 0 and r.out.startswith("split,layers,lam")
    shown = buf.getvalue()
    assert "reading 3 clips" in shown and "3/3" in shown and "[1/1] layers all" in shown
    buf.seek(0)
    buf.truncate()
    r = mam("rank-layers", src, tgt, "--data", LJ, "--limit", "3", "--format", "csv")
    assert r.code == 0 and r.out.startswith("layer,")
    assert "encoding audio" in buf.getvalue() and "encoding text" in buf.getvalue() and "3/3" in buf.getvalue()


def test_terminal_table_shows_percent_and_fits_120_columns(tiny, mam, tmp_path):
    """A sweep with a source, three noises and two blocks: one row per model in percent, no line past 120
    characters; the numbers are the report's fractions × 100, Δ in percentage points with its interval."""
    src, tgt = tiny("bert", layers=4), tiny("hubert-ctc", layers=4)
    r = mam("evaluate", tgt, "--data", LJ, "--limit", "3", "--source", src, "--lam", "0,0.3", "--blocks", "2",
            "--noise", "source,target,normal", "-o", tmp_path / "r.json", "-q")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert max(map(len, lines)) <= 120, "\n".join(lines)
    assert lines[0].strip().startswith("WER in percent on all clips")
    header = next(x for x in lines if "WER %" in x)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["layers", "λ", "model", "WER %", "rel. red. %",
                                                                  "Δ pp [95 % CI]", "better/worse"]
    cells = [[c.strip() for c in x.strip("│ ").split("│")] for x in lines if x.startswith("│")]
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(cells) == len(report["points"]) == 1 + 2 * 4  # the target, then 2 blocks × 4 models
    assert report["paired_statistics"]["resamples"] == 10000  # the default: milliseconds on per-clip counts
    assert cells[0][:4] == ["-", "0", "target", f"{100 * report['baseline']['wer']:.2f}"]
    for row, p in zip(cells[1:], report["points"][1:], strict=True):
        assert (row[0], float(row[1]), row[2]) == (p["layers"], p["lam"], p["column"])
        base = report["baseline"]["error"]
        assert row[3] == f"{100 * p['wer']:.2f}" and row[4] == f"{100 * (base - p['error']) / base:+.2f}"
        assert row[5] == f"{100 * p['delta']:+.2f} [{100 * p['delta_lo']:+.2f}, {100 * p['delta_hi']:+.2f}]"
        assert row[6] == f"{p['better']}/{p['worse']}"


def test_evaluate_into_a_merge_output_adds_the_table_to_its_card(tiny, mam, tmp_path):
    """`-o OUT/mam_eval.json` of a mam output puts the measured table into OUT's model card; verify stays green."""
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    assert mam("merge", src, tgt, "--lam", "0.2", "-o", tmp_path / "m", "-q").code == 0
    before = (tmp_path / "m" / "README.md").read_text()
    r = mam("evaluate", tmp_path / "m", "--data", LJ, "--limit", "2", "-q", "-o", tmp_path / "m" / "mam_eval.json")
    assert r.code == 0, r.err
    card = (tmp_path / "m" / "README.md").read_text()
    assert "Not evaluated yet" in before and "Not evaluated yet" not in card and "WER %" in card
    assert mam("verify", tmp_path / "m", "--format", "csv").code == 0
    r = mam("evaluate", tmp_path / "m", "--data", LJ, "--limit", "2", "-q", "-o", tmp_path / "elsewhere.json")
    assert r.code == 0 and (tmp_path / "m" / "README.md").read_text() == card  # elsewhere: the card is left alone


def test_align_weights_sweep_solves_once_and_equals_the_aligned_merge(tiny, mam, tmp_path):
    """--align weights on a sweep: one alignment per layer set shared by every λ, stated in the report; a point
    scores exactly as `mam merge --align weights` of the same λ and layers."""
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    r = mam("evaluate", tgt, "--data", LJ, "--limit", "3", "--source", src, "--lam", "0,0.3,0.6", "--layers", "1",
            "--align", "weights", "-q", "-o", tmp_path / "r.json")
    assert r.code == 0, r.err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["alignment"] == {"mode": "weights", "solved": 1}
    merged = [p for p in rep["points"] if p["lam"] > 0]
    assert len(merged) == 2 and merged[0]["alignment"] == merged[1]["alignment"]
    assert merged[0]["alignment"]["mode"] == "weights" and merged[0]["alignment"]["layers"] == [1]
    assert mam("merge", src, tgt, "--lam", "0.3", "--layers", "1", "--align", "weights", "-o", tmp_path / "m",
               "-q").code == 0
    r = mam("evaluate", tmp_path / "m", "--data", LJ, "--limit", "3", "-q", "-o", tmp_path / "one.json")
    assert r.code == 0, r.err
    one = json.loads((tmp_path / "one.json").read_text())
    assert rep["details"][f"1|0.3|{src.name}"]["utterances"] == one["details"]["target"]["utterances"]


def test_fast_is_whisper_only_and_named_not_exact(tiny, mam, tmp_path):
    """--fast: int8 Whisper, named as not exact in the report; a CTC model refuses it in one line."""
    r = mam("evaluate", tiny("whisper", layers=2), "--data", LJ, "--limit", "2", "--fast", "-q",
            "-o", tmp_path / "r.json")
    assert r.code == 0, r.err
    ev = json.loads((tmp_path / "r.json").read_text())["evaluation"]
    assert (ev["engine"], ev["exact"]) == ("fast", False)
    r = mam("evaluate", tiny("hubert-ctc", layers=2), "--data", LJ, "--limit", "1", "--fast", "-q")
    assert r.code == 1 and r.err.count("\n") == 1 and "--fast applies to sequence-to-sequence" in r.err, r.err


def test_search_with_fast_keeps_its_own_cache(tiny, mam):
    """The clip cache keys the engine: a --fast search reuses nothing of an exact one, and then everything of itself."""
    args = ("search", tiny("whisper", layers=2), "--source", tiny("bert", layers=2), "--data", LJ, "--limit", "2",
            "--lam", "0.5", "--seed", "7", "--format", "json", "-q")
    costs = []
    for extra in ((), ("--fast",), ("--fast",)):
        r = mam(*args, *extra)
        assert r.code == 0, r.err
        rep = json.loads(r.out)
        costs.append(rep["cost"])
        assert rep["evaluation"]["exact"] is not bool(extra)
    assert costs[1]["reused_from_cache"] == 0
    assert costs[2]["reused_from_cache"] == costs[2]["clip_evaluations"] + costs[2]["test_clip_evaluations"]
