"""evaluate and rank-layers under torchrun (search: tests/test_search.py): two gloo CPU processes give one
process's results, number for number, and only the main process speaks."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED
from helpers import timeless, torchrun

LJ = f"ljspeech:{SHARED}/ljspeech-385/LJSpeech-1.1"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_sweep_on_two_processes_equals_one(tiny, mam, tmp_path):
    """CTC, one clip per batch on CPU: each process scores 3 of the 6 clips at every point (the replay cache its
    own), and the main one scores the union: the same hypotheses, WER, table and paired statistics."""
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    args = ("evaluate", tgt, "--data", LJ, "--limit", "6", "--source", src, "--lam", "0,0.3,0.6", "--layers", "1",
            "--noise", "normal", "--resamples", "200", "--format", "json")
    run = torchrun(*args, "-o", tmp_path / "two.json")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("reading 6 clips") == 1  # progress from the main process only
    one_run = mam(*args, "-o", tmp_path / "one.json")
    assert one_run.code == 0, one_run.err
    table = json.loads(run.stdout)  # exactly one JSON document
    assert table == json.loads(one_run.out)
    assert len(table) == 3 and {"delta", "delta_lo", "delta_hi", "better", "worse"} <= {
        k.rsplit(" ", 1)[-1] for k in table[1]}
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["details"] == one["details"]  # every point's hypotheses, WER, CER, counts
    assert len(one["details"]) == 5 and len(one["details"]["target"]["utterances"]) == 6
    assert timeless(two["points"]) == timeless(one["points"])
    assert (two["evaluation"]["processes"], two["evaluation"]["clips_per_process"]) == (2, [3, 3])
    assert (one["evaluation"]["processes"], one["evaluation"]["clips_per_process"]) == (1, [6])
    for key in ("batches", "batches_replayed"):
        assert two["replay_cache"][key] == one["replay_cache"][key] == 6


def test_whisper_on_two_processes_keeps_one_processs_batches(tiny, mam, tmp_path):
    """Whisper's token bound follows the longest clip of a batch: the processes score the very batches one
    process cuts (2 clips each here: 2 batches on one process, 1 on the other), so clips stopped at the bound,
    hypotheses and the point picked on dev are one process's; the test split is sharded too."""
    src, tgt = tiny("bert", layers=2), tiny("whisper", layers=2)
    args = ("evaluate", tgt, "--data", LJ, "--limit", "6", "--batch-size", "2", "--source", src, "--lam", "0,0.5",
            "--pick-on-dev", "--dev-fraction", "0.5", "--resamples", "100", "--format", "json")
    run = torchrun(*args, "-o", tmp_path / "two.json")
    assert run.returncode == 0, run.stderr[-3000:]
    one_run = mam(*args, "-o", tmp_path / "one.json")
    assert one_run.code == 0, one_run.err
    assert json.loads(run.stdout) == json.loads(one_run.out)
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    for split in ("dev", "test"):
        assert two[split]["details"] == one[split]["details"]
        assert timeless(two[split]["points"]) == timeless(one[split]["points"])
    assert timeless(two["best_on_dev"]) == timeless(one["best_on_dev"])
    assert one["dev"]["details"]["target"]["hit_token_bound"] > 0  # the bound is in play
    assert (two["evaluation"]["clips_per_process"], one["evaluation"]["clips_per_process"]) == ([4, 2], [6])


def test_rank_layers_on_two_processes_equals_one(tiny, mam, tmp_path):
    """Audio and text batches split over the processes, pooled vectors gathered: the same scores, bit for bit,
    so the same ranking, for every metric."""
    src, tgt = tiny("bert", layers=2), tiny("whisper", layers=2)
    args = ("rank-layers", src, tgt, "--data", LJ, "--limit", "6", "--metric", "all", "--n-projections", "50",
            "--batch-size", "2", "--top-k", "1", "--format", "json")
    run = torchrun(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("encoding text") == 1
    one_run = mam(*args)
    assert one_run.code == 0, one_run.err
    two, one = json.loads(run.stdout), json.loads(one_run.out)
    assert two["metrics"] == one["metrics"] and two["samples"] == one["samples"] and len(one["samples"]) == 6
    assert (two["processes"], two["clips_per_process"], one["clips_per_process"]) == (2, [4, 2], [6])


def test_an_unreadable_clip_under_strict_stops_every_process(tiny, tmp_path):
    """The clip read by the second process fails --strict: both processes stop with its name (none waits
    forever for the other), nothing on stdout."""
    good = sorted((SHARED / "fsdd/recordings").glob("*_jackson_0.flac"))[:2]
    (tmp_path / "bad.wav").write_bytes(b"garbage")
    rows = [{"audio": str(good[0]), "text": "zero"}, {"audio": "bad.wav", "text": "one"},
            {"audio": str(good[1]), "text": "two"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run = torchrun("evaluate", tiny("hubert-ctc", layers=2), "--data", tmp_path / "m.jsonl", "--strict", "-q")
    assert run.returncode != 0 and run.stdout == ""
    errors = [line for line in run.stderr.splitlines() if line.startswith("mam: error: ")]
    assert len(errors) == 2 and all("bad.wav" in line for line in errors), run.stderr[-3000:]
