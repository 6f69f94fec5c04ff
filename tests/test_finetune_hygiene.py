"""finetune hygiene through Accelerate: save_state/load_state resume equals a straight run (weights and
metrics.jsonl), gradient clipping bounds the applied norm, one metrics row per optimizer step, mixed precision,
a bar on terminals only; a tampered state is refused without being unpickled; bad options are one line."""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import SHARED
from helpers import load_dir
from mamcli.checkpoint import resolve
from mamcli.data import load_dataset, select
from mamcli.errors import MamError
from mamcli.finetune import FinetuneOptions, finetune, run_dir
from mamcli.models import AudioModel

FSDD = f"fsdd:{SHARED}/fsdd/recordings"
ESC10 = f"folders:{SHARED}/esc10/ESC-10"
KEYS = {"step", "epoch", "loss", "lr", "grad_norm", "grad_norm_clipped"}


def _digits(n: int):
    return select(load_dataset(FSDD), limit=n)


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_crash_then_resume_equals_straight_run_weights_and_metrics(tiny, mam, tmp_path, monkeypatch):
    """L-MAM with dropout, LayerDrop and SpecAugment on (torch's and numpy's RNG both matter); the run dies in
    step 4, one step after its last checkpoint (step 2, mid-epoch): --resume drops the unsaved step's metrics
    row and ends bit for bit where the straight run ends, its metrics.jsonl row for row."""
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    base = dict(task="asr", lam_init=0.2, learnable_lam=True, lr=1e-3, lam_lr=0.1, batch_size=1, checkpoint_every=2)
    with resolve(str(tgt)) as t, resolve(str(src)) as s:
        straight = finetune(t, _digits(4), None, FinetuneOptions(**base), tmp_path / "straight", s)
        calls = []
        inputs = AudioModel.inputs

        def crashing_inputs(self, audio):
            calls.append(1)
            if len(calls) == 4:  # the forward pass of step 4
                raise RuntimeError("power cut")
            return inputs(self, audio)

        monkeypatch.setattr(AudioModel, "inputs", crashing_inputs)
        with pytest.raises(RuntimeError, match="power cut"):
            finetune(t, _digits(4), None, FinetuneOptions(**base), tmp_path / "resumed", s)
        monkeypatch.setattr(AudioModel, "inputs", inputs)
        work = run_dir(tmp_path / "resumed")
        assert [r["step"] for r in _rows(work)] == [1, 2, 3]  # step 3 ran after the last checkpoint
        saved = json.loads((work / "run.json").read_text())
        state = work / f"state-{saved['saves']}"
        assert saved["step"] == 2 and saved["batch_in_epoch"] == 2  # mid-epoch
        assert sorted(p.name for p in work.glob("state-*")) == [state.name]
        # Accelerate's layout, and nothing it would unpickle without weights_only (custom_checkpoint_*.pkl)
        assert sorted(p.name for p in state.iterdir()) == ["model.safetensors", "optimizer.bin",
                                                           "random_states_0.pkl", "scheduler.bin"]
        resumed = finetune(t, _digits(4), None, FinetuneOptions(**base), tmp_path / "resumed", s, resume=True)
    a, b = load_dir(tmp_path / "straight"), load_dir(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = _rows(tmp_path / "straight")
    assert _rows(tmp_path / "resumed") == rows and resumed["epochs"] == straight["epochs"]
    # one row per optimizer step, numbered, with the listed keys and λ of every merged layer
    assert [r["step"] for r in rows] == list(range(1, straight["steps"] + 1)) and straight["steps"] == 4
    assert [r["epoch"] for r in rows] == [1, 1, 1, 1]
    assert all(r.keys() == KEYS | {"lam_lr", "lams"} and r["lams"].keys() == {"0", "1"} for r in rows)
    assert rows[0]["lr"] == 1e-3 and rows[0]["lam_lr"] == 0.1 and rows[-1]["lr"] == pytest.approx(1e-3 / 4)
    lams = json.loads((tmp_path / "straight" / "lams.json").read_text())["trajectory"]
    assert [r["lams"] for r in rows] == [snap["lams"] for snap in lams[1:]]
    # the output holds metrics.jsonl, its hash is in the report, and `mam verify` checks it
    report = json.loads((tmp_path / "resumed" / "mam_report.json").read_text())
    digest = hashlib.sha256((tmp_path / "resumed" / "metrics.jsonl").read_bytes()).hexdigest()
    assert report["outputs"]["hashes"]["metrics.jsonl"] == digest
    assert mam("verify", tmp_path / "resumed").code == 0 and not work.exists()


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0, None])
def test_clipping_bounds_the_norm_the_optimizer_applies(max_grad_norm, tiny, tmp_path):
    """The norm is measured independently, in a pre-hook of every optimizer step: clipped to --max-grad-norm
    (the default 1.0) when the raw norm exceeds it; 0 or None leave the gradients as they are."""
    applied = []

    def measure(optimizer, _args, _kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        applied.append(float(torch.nn.utils.get_total_norm(grads)))

    hook = register_optimizer_step_pre_hook(measure)
    try:
        with resolve(str(tiny("hubert-ctc", layers=2))) as t:
            report = finetune(t, _digits(4), None, FinetuneOptions(task="asr", lr=1e-3, batch_size=2,
                                                                   max_grad_norm=max_grad_norm), tmp_path / "ft")
    finally:
        hook.remove()
    rows = _rows(tmp_path / "ft")
    assert len(rows) == len(applied) == report["steps"] == 2 and all(r.keys() == KEYS for r in rows)
    assert all(r["grad_norm"] > 5.0 for r in rows), rows  # CTC from scratch: raw norms of ~10
    measured = [r["grad_norm_clipped"] for r in rows]
    assert applied == pytest.approx(measured, rel=1e-6)
    if max_grad_norm:
        assert applied == pytest.approx([max_grad_norm] * 2, rel=1e-5)
    else:
        assert measured == [r["grad_norm"] for r in rows]
    assert FinetuneOptions().max_grad_norm == 1.0


def test_bf16_on_the_cpu_trains_under_autocast(tiny, tmp_path):
    """Accelerate allows bf16 on the CPU: the loss of the same first batch moves off float32's, by bf16's error."""
    losses = {}
    with resolve(str(tiny("hubert-ctc", layers=2))) as t:
        for mp in ("no", "bf16"):
            opts = FinetuneOptions(task="asr", lr=1e-3, batch_size=2, mixed_precision=mp)
            report = finetune(t, _digits(2), None, opts, tmp_path / mp)
            assert report["options"]["mixed_precision"] == mp
            losses[mp] = _rows(tmp_path / mp)[0]["loss"]
    assert losses["bf16"] != losses["no"] and losses["bf16"] == pytest.approx(losses["no"], rel=0.05), losses


def test_tampered_or_unrestorable_state_is_refused_in_one_line(tiny, tmp_path, monkeypatch):
    """A state file that is not plain tensors is never unpickled (weights_only); an RNG that Accelerate could not
    restore (it only logs that) is an error rather than a resume that silently differs."""
    out = tmp_path / "ft"
    opts = FinetuneOptions(task="asr", lr=1e-3, batch_size=2, epochs=2)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    inputs = AudioModel.inputs

    def crash_in_step_2(self, audio):
        if (run_dir(out) / "run.json").is_file():  # step 1 is saved
            raise RuntimeError("power cut")
        return inputs(self, audio)

    with resolve(str(tiny("hubert-ctc", layers=2))) as t:
        monkeypatch.setattr(AudioModel, "inputs", crash_in_step_2)
        with pytest.raises(RuntimeError, match="power cut"):
            finetune(t, _digits(4), None, FinetuneOptions(**{**vars(opts), "checkpoint_every": 1}), out)
        monkeypatch.undo()
        work = run_dir(out)
        state = work / f"state-{json.loads((work / 'run.json').read_text())['saves']}"
        monkeypatch.setattr(torch, "set_rng_state", lambda _s: None)
        with pytest.raises(MamError, match="its random state was not restored"):
            finetune(t, _digits(4), None, opts, out, resume=True)
        monkeypatch.undo()
        optimizer = state / "optimizer.bin"
        torch.save({"state": {}, "param_groups": [], "evil": Payload()}, optimizer)
        before = _tree(tmp_path)
        with pytest.raises(MamError) as e:
            finetune(t, _digits(4), None, opts, out, resume=True)
    assert str(e.value).startswith(f"cannot resume from {state}: ") and "\n" not in str(e.value), e.value
    assert not marker.exists() and _tree(tmp_path) == before and not out.exists()


def test_fp16_on_the_cpu_and_a_missing_tracker_are_one_line_and_write_nothing(tiny, tmp_path, monkeypatch):
    for name in ("tensorboard", "tensorboardX", "torch.utils.tensorboard"):  # as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    cases = [(dict(mixed_precision="fp16", device="cpu"), "--mixed-precision fp16 needs a GPU"),
             (dict(log_with="tensorboard"), "--log-with tensorboard needs the tensorboard package")]
    with resolve(str(tiny("hubert-ctc", layers=2))) as t:
        for fields, needle in cases:
            before = _tree(tmp_path)
            with pytest.raises(MamError) as e:
                finetune(t, _digits(2), None, FinetuneOptions(task="asr", **fields), tmp_path / "ft")
            assert str(e.value).startswith(needle) and "\n" not in str(e.value), e.value
            assert _tree(tmp_path) == before and not run_dir(tmp_path / "ft").exists()


@pytest.mark.parametrize("field,value,flag", [("max_grad_norm", -1.0, "--max-grad-norm"),
                                              ("max_grad_norm", math.nan, "--max-grad-norm"),
                                              ("mixed_precision", "fp8", "--mixed-precision"),
                                              ("log_with", "wandb", "--log-with")])
def test_bad_hygiene_options_are_one_line(field, value, flag):
    with pytest.raises(MamError, match=flag):
        FinetuneOptions(**{field: value})


def test_progress_bar_on_a_terminal_shows_loss_and_lr(tiny, tmp_path, monkeypatch):
    from rich.console import Console

    screen = io.StringIO()
    monkeypatch.setattr("mamcli.finetune.progress._stderr_console",
                        lambda: Console(file=screen, force_terminal=True, width=150, color_system=None))
    lines: list[str] = []
    with resolve(str(tiny("hubert-ctc", layers=2))) as t:
        finetune(t, _digits(4), None, FinetuneOptions(task="asr", lr=1e-3, batch_size=2), tmp_path / "ft",
                 progress=lines.append)
    last = _rows(tmp_path / "ft")[-1]
    assert f"2/2 loss {last['loss']:.4f}  lr 0.0005" in screen.getvalue(), screen.getvalue()
    assert any(line.startswith("training on 4 clips") for line in lines)


def test_max_steps_overrides_the_epoch_count_as_transformers_trainer_does(tiny, mam, tmp_path, monkeypatch):
    """2 clips, batch 1, --epochs 1 --max-steps 5: five optimizer steps over three passes (the last one partial,
    closed with its loss and dev error), the linear schedule spanning the five; a run shorter than one epoch
    ends there with its output. A power cut in step 4 resumes to the same weights."""
    tgt = tiny("hubert-ctc", layers=2)
    args = ["finetune", tgt, "--data", FSDD, "--limit", "2", "--batch-size", "1", "--epochs", "1", "--lr", "1e-3",
            "--max-steps", "5", "-q", "--format", "json"]
    r = mam(*args, "-o", tmp_path / "ft")
    assert r.code == 0 and r.err == "", r.err
    report = json.loads(r.out)
    assert report["inputs"]["train"]["clips"] == 2 and report["steps"] == 5
    assert [(e["epoch"], e["step"]) for e in report["epochs"]] == [(1, 2), (2, 4), (3, 5)]
    assert all(isinstance(e["train_loss"], float) and "dev_error" in e for e in report["epochs"])
    rows = _rows(tmp_path / "ft")
    assert [(row["step"], row["epoch"]) for row in rows] == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]
    assert [row["lr"] for row in rows] == pytest.approx([1e-3 * (5 - k) / 5 for k in range(5)])

    inputs, saved = AudioModel.inputs, run_dir(tmp_path / "resumed") / "run.json"

    def crash_in_step_4(self, audio):
        if saved.is_file() and json.loads(saved.read_text())["step"] == 3:
            raise RuntimeError("power cut")
        return inputs(self, audio)

    monkeypatch.setattr(AudioModel, "inputs", crash_in_step_4)
    assert mam(*args, "--checkpoint-every", "1", "-o", tmp_path / "resumed").code == 3
    monkeypatch.undo()
    assert json.loads((run_dir(tmp_path / "resumed") / "run.json").read_text())["step"] == 3
    r = mam(*args, "--resume", "-o", tmp_path / "resumed")
    assert r.code == 0, r.err
    a, b = load_dir(tmp_path / "ft"), load_dir(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(r.out)["epochs"] == report["epochs"] and _rows(tmp_path / "resumed") == rows

    r = mam("finetune", tgt, "--data", FSDD, "--limit", "4", "--batch-size", "1", "--max-steps", "1", "-q",
            "--format", "json", "-o", tmp_path / "short")
    assert r.code == 0, r.err
    short = json.loads(r.out)
    assert short["steps"] == 1 and [(e["epoch"], e["step"]) for e in short["epochs"]] == [(1, 1)]
    assert (tmp_path / "short" / "model.safetensors").is_file() and not run_dir(tmp_path / "short").exists()


@pytest.mark.parametrize("kind,data,lr", [("hubert-ctc", FSDD, 1e-5), ("ast", ESC10, 1e-4)])
def test_default_learning_rate_is_the_heads_measured_one(kind, data, lr, tiny, mam, tmp_path):
    """Without --lr: 1e-5 for speech recognition, 1e-4 for audio events (1e-3 left Whisper's encoder near chance
    on ESC-10: docs/finetune.md); the first step applies it."""
    r = mam("finetune", tiny(kind, layers=2), "--data", data, "--limit", "2", "--batch-size", "2", "--max-steps", "1",
            "-o", tmp_path / "ft", "-q", "--format", "json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["options"]["lr"] == lr and _rows(tmp_path / "ft")[0]["lr"] == lr
    with resolve(str(tiny(kind, layers=2))) as t:  # the library: task "auto" and no lr resolve the same way
        ds = select(load_dataset(data), limit=2)
        options = finetune(t, ds, None, FinetuneOptions(task="auto", batch_size=2, max_steps=1),
                           tmp_path / "lib")["options"]
    assert (options["task"], options["lr"]) == ("asr" if kind == "hubert-ctc" else "aec", lr)


NO_SPACE = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@pytest.mark.parametrize("writer", ["transformers.modeling_utils.safe_save_file",  # the output's weights
                                    "accelerate.utils.other.safe_save_file"])  # the first checkpoint's
def test_a_full_disk_is_one_line_and_leaves_nothing(writer, tiny, mam, tmp_path, monkeypatch):
    """safetensors reports ENOSPC as its own error (not an OSError): still exit 1, one line, and neither the
    output, its temporary folder nor the run folder stays behind."""
    from safetensors import SafetensorError

    def full(*_args, **_kwargs):
        raise SafetensorError(NO_SPACE)

    monkeypatch.setattr(writer, full)
    r = mam("finetune", tiny("hubert-ctc", layers=2), "--data", FSDD, "--limit", "2", "--batch-size", "2",
            "-o", tmp_path / "ft", "-q")
    monkeypatch.undo()
    assert r.code == 1 and r.err.count("\n") == 1, r.err
    assert r.err.startswith(f"mam: error: cannot write {tmp_path}") and "No space left on device" in r.err, r.err
    assert list(tmp_path.iterdir()) == []


def test_the_shard_writing_bar_never_reaches_stderr(tiny, tmp_path, capfd):
    """save_pretrained draws "Writing model shards" with tqdm whenever transformers' bars are on, as they are
    in a fresh process that calls finetune() (the CLI turns them off unless -v): mam writes its output with them
    off, and leaves them as they were."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.enable_progress_bar()
    try:
        with resolve(str(tiny("hubert-ctc", layers=2))) as t:
            finetune(t, _digits(2), None, FinetuneOptions(task="asr", batch_size=2), tmp_path / "ft")
        assert logging.is_progress_bar_enabled()
    finally:
        (logging.enable_progress_bar if was else logging.disable_progress_bar)()
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and (tmp_path / "ft" / "model.safetensors").is_file(), err
