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

    with resolve(str(tiny("hubert-ctc", layers=2))) as t:
        assert finetune(t, _digits(4), None, FinetuneOptions(**{**vars(opts), "max_steps": 1}), out)["step"] == 1
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
    monkeypatch.setattr("mamcli.finetune._stderr_console",
                        lambda: Console(file=screen, force_terminal=True, width=150, color_system=None))
    lines: list[str] = []
    with resolve(str(tiny("hubert-ctc", layers=2))) as t:
        finetune(t, _digits(4), None, FinetuneOptions(task="asr", lr=1e-3, batch_size=2), tmp_path / "ft",
                 progress=lines.append)
    last = _rows(tmp_path / "ft")[-1]
    assert f"2/2 loss {last['loss']:.4f}  lr 0.0005" in screen.getvalue(), screen.getvalue()
    assert any(line.startswith("training on 4 clips") for line in lines)
