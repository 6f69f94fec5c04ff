"""The bad-input catalogue: each case exits non-zero with one readable line and leaves no output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def _assert_clean_failure(r, out: Path, needle: str) -> None:
    assert r.code != 0
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("mam: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in r.err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary leftovers


@pytest.fixture
def pair(tiny):
    return tiny("bert", layers=2), tiny("hubert-ctc", layers=2)


def test_mismatched_widths(tiny, mam, tmp_path):
    r = mam("merge", tiny("bert", hidden=48, heads=4, layers=2), tiny("hubert-ctc", layers=2), "--lam", "0.1",
            "-o", tmp_path / "o")
    _assert_clean_failure(r, tmp_path / "o", "hidden sizes differ")
    assert "hidden 48, 4 heads × 12" in r.err and "hidden 32, 4 heads × 8" in r.err


def test_differing_heads_merge_with_a_note(tiny, mam, tmp_path):
    """Equal width is all Eq. 1 needs: other head counts merge, exactly, and the report and stderr say so."""
    import torch

    from helpers import load_dir

    src, tgt = tiny("bert", heads=8, layers=2), tiny("hubert-ctc", layers=2)
    r = mam("merge", src, tgt, "--lam", "0.25", "-o", tmp_path / "o")
    assert r.code == 0, r.err
    assert "note: head layouts differ" in r.err and "8 heads × 4" in r.err and "4 heads × 8" in r.err
    report = json.loads((tmp_path / "o" / "mam_report.json").read_text())
    assert any("head layouts differ" in n for n in report["notes"])
    s, t, m = load_dir(src), load_dir(tgt), load_dir(tmp_path / "o")
    q_s, q_t = "bert.encoder.layer.1.attention.self.query.weight", "hubert.encoder.layers.1.attention.q_proj.weight"
    expected = (s[q_s].float() * 0.25).add_(t[q_t].float() * 0.75).to(t[q_t].dtype)
    assert torch.equal(m[q_t], expected)


def test_unknown_family(pair, mam, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"foo.bar": torch.zeros(2, 2)}, str(tmp_path / "weird.safetensors"))
    r = mam("merge", tmp_path / "weird.safetensors", pair[1], "--lam", "0.1", "-o", tmp_path / "o")
    _assert_clean_failure(r, tmp_path / "o", "unknown architecture")


def test_corrupt_safetensors(pair, mam, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pair[0], bad)
    (bad / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    r = mam("merge", bad, pair[1], "--lam", "0.1", "-o", tmp_path / "o")
    _assert_clean_failure(r, tmp_path / "o", "model.safetensors")


def test_truncated_safetensors(pair, mam, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(pair[1], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = mam("merge", pair[0], bad, "--lam", "0.1", "-o", tmp_path / "o")
    _assert_clean_failure(r, tmp_path / "o", "model.safetensors")


def test_missing_shard(pair, mam, tmp_path):
    from mamcli.tiny import save_tiny

    d = save_tiny("hubert-ctc", tmp_path / "sharded", layers=2, max_shard_size="20KB")
    victim = sorted(d.glob("model-*.safetensors"))[0]
    victim.unlink()
    r = mam("merge", pair[0], d, "--lam", "0.1", "-o", tmp_path / "o")
    _assert_clean_failure(r, tmp_path / "o", victim.name)


@pytest.mark.parametrize("spec", ["./no/such/dir", "/nope/model.safetensors", "no-such-alias-or-cached-model"])
def test_missing_model(spec, pair, mam, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads its env at import
    r = mam("merge", spec, pair[1], "--lam", "0.1", "-o", tmp_path / "o")
    _assert_clean_failure(r, tmp_path / "o", "")


def test_no_weights_in_dir(pair, mam, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    r = mam("merge", tmp_path / "empty", pair[1], "--lam", "0.1", "-o", tmp_path / "o")
    _assert_clean_failure(r, tmp_path / "o", "no weights found")


@pytest.mark.parametrize("lam", ["1.5", "-0.1", "nan", "inf", "abc"])
def test_bad_lambda(lam, pair, mam, tmp_path):
    """Out of [0, 1], not finite or not a number: a usage error (exit 2), caught where the option is parsed."""
    r = mam("merge", *pair, "--lam", lam, "-o", tmp_path / "o")
    _assert_clean_failure(r, tmp_path / "o", "Invalid value for '--lam'")
    assert r.code == 2


@pytest.mark.parametrize("spec,needle", [("5-2", "runs backwards"), ("9", "out of range"), ("x", "bad layer spec"),
                                         ("0,0", "listed twice"), ("top:2:missing.json", "does not exist")])
def test_bad_layer_spec(spec, needle, pair, mam, tmp_path):
    r = mam("merge", *pair, "--lam", "0.1", "--layers", spec, "-o", tmp_path / "o")
    _assert_clean_failure(r, tmp_path / "o", needle)


@pytest.mark.parametrize("args,needle", [
    (["--parts", "q,x"], "--parts"), (["--noise", "pink"], "--noise"), (["--out-dtype", "int8"], "--out-dtype"),
    (["--shard-size", "lots"], "bad size"), (["--layer-map", "1,2,3"], "--layer-map"),
])
def test_bad_options(args, needle, pair, mam, tmp_path):
    r = mam("merge", *pair, "--lam", "0.1", *args, "-o", tmp_path / "o")
    _assert_clean_failure(r, tmp_path / "o", needle)


def test_lam_and_lams_together(pair, mam, tmp_path):
    (tmp_path / "l.json").write_text(json.dumps([0.1, 0.2]))
    r = mam("merge", *pair, "--lam", "0.1", "--lams", tmp_path / "l.json", "-o", tmp_path / "o")
    _assert_clean_failure(r, tmp_path / "o", "exactly one of --lam or --lams")
    (tmp_path / "short.json").write_text(json.dumps([0.1]))
    r = mam("merge", *pair, "--lams", tmp_path / "short.json", "-o", tmp_path / "o")
    _assert_clean_failure(r, tmp_path / "o", "1 λ values")


def test_existing_output(pair, mam, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = mam("merge", *pair, "--lam", "0.1", "-o", out)
    assert r.code == 1 and r.err.count("\n") == 1 and "already exists" in r.err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_pickle_with_code_is_refused(pair, mam, tmp_path):
    import collections

    import torch

    bad = tmp_path / "evil.pt"
    torch.save({"opaque": collections.Counter("abc")}, bad)
    r = mam("merge", bad, pair[1], "--lam", "0.1", "-o", tmp_path / "o")
    _assert_clean_failure(r, tmp_path / "o", "evil.pt")


LJ_DATA = "ljspeech:../shared/data/ljspeech-385/LJSpeech-1.1"
# every option value refused where it is parsed: (arguments, the option named in the one line); exit 2, as usage
USAGE_CASES = [
    (["merge", "s", "t", "--lam", "nan", "-o", "o"], "--lam"),
    (["merge", "s", "t", "--lam", "0.1", "--seed", "-1", "-o", "o"], "--seed"),
    (["merge", "s", "t", "--lam", "0.1", "--noise", "pink", "-o", "o"], "--noise"),
    (["merge", "s", "t", "--lam", "0.1", "--out-dtype", "fp8", "-o", "o"], "--out-dtype"),
    (["map", "s", "t", "--format", "xml"], "--format"),
    (["merge", "s", "t", "--lam", "0.1", "--shard-size", "nan", "-o", "o"], "--shard-size"),
    (["merge", "s", "t", "--lam", "0.1", "--shard-size", "1e400", "-o", "o"], "--shard-size"),
    (["merge", "s", "t", "--lam", "0.1", "--shard-size", "0MB", "-o", "o"], "--shard-size"),
    (["families", "--format", "xml"], "--format"),
    (["rank-layers", "s", "t", "--data", LJ_DATA, "--n-projections", "0"], "--n-projections"),
    (["rank-layers", "s", "t", "--data", LJ_DATA, "--top-k", "0"], "--top-k"),
    (["rank-layers", "s", "t", "--data", LJ_DATA, "--fraction", "0"], "--fraction"),
    (["rank-layers", "s", "t", "--data", LJ_DATA, "--metric", "cosine"], "--metric"),
    (["evaluate", "t", "--data", LJ_DATA, "--limit", "0"], "--limit"),
    (["evaluate", "t", "--data", LJ_DATA, "--batch-size", "-2"], "--batch-size"),
    (["evaluate", "t", "--data", LJ_DATA, "--dev-fraction", "1"], "--dev-fraction"),
    (["evaluate", "t", "--data", LJ_DATA, "--cache-gb", "nan"], "--cache-gb"),
    (["evaluate", "t", "--data", LJ_DATA, "--blocks", "0"], "--blocks"),
    (["evaluate", "t", "--data", LJ_DATA, "--task", "tts"], "--task"),
    (["evaluate", "t", "--data", LJ_DATA, "--split", "train"], "--split"),
    (["evaluate", "t", "--data", LJ_DATA, "--text-field", "upper"], "--text-field"),
    (["finetune", "t", "--data", LJ_DATA, "-o", "o", "--lr", "-1"], "--lr"),
    (["finetune", "t", "--data", LJ_DATA, "-o", "o", "--lr", "inf"], "--lr"),
    (["finetune", "t", "--data", LJ_DATA, "-o", "o", "--epochs", "0"], "--epochs"),
    (["finetune", "t", "--data", LJ_DATA, "-o", "o", "--batch-size", "0"], "--batch-size"),
    (["finetune", "t", "--data", LJ_DATA, "-o", "o", "--max-steps", "0"], "--max-steps"),
    (["finetune", "t", "--data", LJ_DATA, "-o", "o", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["finetune", "t", "--data", LJ_DATA, "-o", "o", "--warmup", "-1"], "--warmup"),
    (["finetune", "t", "--data", LJ_DATA, "-o", "o", "--lam-init", "2"], "--lam-init"),
    (["evaluate", "t", "--data", LJ_DATA, "--align", "rotate"], "--align"),
    (["search", "t", "--data", LJ_DATA], "--source"),
    (["search", "t", "--source", "s", "--data", LJ_DATA, "--alpha", "nan"], "--alpha"),
    (["search", "t", "--source", "s", "--data", LJ_DATA, "--budget-clips", "0"], "--budget-clips"),
    (["search", "t", "--source", "s", "--data", LJ_DATA, "--align", "rotate"], "--align"),
    (["search", "t", "--source", "s", "--data", LJ_DATA, "--dev-fraction", "0"], "--dev-fraction"),
    (["search", "t", "--source", "s", "--data", LJ_DATA, "--format", "xml"], "--format"),
]


@pytest.mark.parametrize("args,option", USAGE_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in USAGE_CASES])
def test_option_values_are_usage_errors(args, option, mam, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = mam(*args)
    assert r.code == 2, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mam: error: ") and option in lines[0], r.err
    assert r.out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("side", ["source", "target"])
def test_non_finite_weights_are_refused_by_name(side, pair, mam, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / side
    shutil.copytree(pair[0] if side == "source" else pair[1], model)
    weights = load_file(str(model / "model.safetensors"))
    name = next(k for k in weights if ("query.weight" in k or "q_proj.weight" in k) and ".1." in k)
    weights[name][0, 0] = float("nan") if side == "source" else float("inf")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    args = (model, pair[1]) if side == "source" else (pair[0], model)
    r = mam("merge", *args, "--lam", "0.1", "-o", tmp_path / "o")
    _assert_clean_failure(r, tmp_path / "o", f"tensor {name} holds 1 NaN/Inf value(s)")
    assert torch.isfinite(weights[name]).sum() == weights[name].numel() - 1


def test_a_fold_that_does_not_exist(tiny, mam, tmp_path):
    r = mam("evaluate", tiny("ast", layers=2), "--data", "folders:../shared/data/esc10/ESC-10", "--folds", "9")
    lines = r.err.strip().splitlines()
    assert r.code == 1 and len(lines) == 1
    assert "fold 9 does not exist" in lines[0] and "it has folds 1, 2, 3, 4, 5" in lines[0], r.err


def test_roles_swapped_in_rank_layers_and_evaluate(tiny, mam, tmp_path):
    """A speech model where the text source belongs (and the reverse) is one line saying each model's role."""
    text, speech = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    r = mam("rank-layers", speech, text, "--data", LJ_DATA.replace("../", f"{Path(__file__).parents[2]}/"))
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1 and "swap the two arguments" in r.err, r.err
    r = mam("evaluate", speech, "--data", LJ_DATA.replace("../", f"{Path(__file__).parents[2]}/"), "--limit", "1",
            "--source", speech, "--lam", "0.1")
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1 and "source" in r.err, r.err


def _help(mam, *command: str) -> str:
    r = mam(*command, "--help")
    assert r.code == 0, r.err
    return " ".join(r.out.split())  # the words, however the terminal wraps them


def test_help_says_what_each_command_takes(mam):
    """Whisper (sequence-to-sequence) is as much a target as a CTC model: no help speaks of CTC alone."""
    overview = _help(mam)
    assert "CTC ASR" not in overview and "Word error rate (CTC or Whisper)" in overview
    for command in ("evaluate", "finetune", "rank-layers"):
        text = _help(mam, command)
        assert "Speech (CTC)" not in text and "CTC ASR" not in text, command
        assert "Whisper" in text and "CTC" in text and "audio-event" in text, command
    finetune = _help(mam, "finetune")
    assert ("Default per head: 1e-5 for speech recognition, 1e-4 for audio events (measured: docs/finetune.md)."
            in finetune)
    assert "Train for N optimizer steps, past --epochs if need be (as transformers' Trainer); resumable." in finetune
    evaluate = _help(mam, "evaluate")
    assert "Paired bootstrap resamples of the 95 % interval. [default: 10000; x>=1]" in evaluate
    assert "percent on the table, a fraction in CSV, TSV and JSON" in evaluate


SEARCH = ["search", "t", "--source", "s", "--data", LJ_DATA]
# bad input of `mam search` known before any model is read: exit 1, one line, nothing written
SEARCH_CASES = [
    (["--alpha", "1.5"], "--alpha must lie strictly between 0 and 1"),
    (["--lam", "0,0.1"], "λ = 0 always races"),
    (["--noise", "pink"], "--noise takes source, target, normal"),
    (["--layers", "0", "--blocks", "1"], "--layers and --blocks do not mix"),
    (["--write", "taken"], "already exists; pass --force"),
    (["-o", "a-file/r.json"], "cannot write"),
    (["--align", "x/mam_align.json"], "a search solves its own alignments"),
]


@pytest.mark.parametrize("args,needle", SEARCH_CASES, ids=[a[0] for a, _ in SEARCH_CASES])
def test_search_refuses_before_any_work(args, needle, mam, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    (tmp_path / "a-file").write_text("")
    r = mam(*SEARCH, *args)
    _assert_clean_failure(r, tmp_path / "out", needle)
    assert r.code == 1 and r.out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "taken"]


def test_search_align_activations_needs_one_text_source(tiny, mam, tmp_path):
    """Activations pair speech clips with transcripts: an image source, or two sources, is one line."""
    data = LJ_DATA.replace("../", f"{Path(__file__).parents[2]}/")
    speech, text, image = tiny("hubert-ctc", layers=2), tiny("bert", layers=2), tiny("vit", layers=2)
    r = mam("search", speech, "--source", image, "--data", data, "--limit", "2", "--align", "activations", "-q")
    _assert_clean_failure(r, tmp_path / "out", "use --align weights")
    r = mam("search", speech, "--source", text, "--source", image, "--data", data, "--limit", "2", "--align",
            "activations", "-q")
    _assert_clean_failure(r, tmp_path / "out", "give exactly one --source")
