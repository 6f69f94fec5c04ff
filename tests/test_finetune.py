"""finetune / L-MAM: loss falls, λ moves inside [0, 1], source frozen, baked == parametrised, resume == straight run."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import ESC10_CLASSES, SHARED
from helpers import load_dir
from mamcli.checkpoint import resolve
from mamcli.data import load_dataset, select
from mamcli.finetune import FinetuneOptions, LamMerge, attach_learnable, baked_state_dict, finetune
from mamcli.merge import MergeOptions
from mamcli.models import InMemoryMerger, ModelStore, load_audio_model

FSDD = f"fsdd:{SHARED}/fsdd/recordings"
ESC10 = f"folders:{SHARED}/esc10/ESC-10"


def _digits(n: int):
    return select(load_dataset(FSDD), limit=n)


def test_loss_falls_and_lams_move_within_bounds(tiny, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    before = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    opts = FinetuneOptions(task="asr", lam_init=0.1, learnable_lam=True, epochs=8, lr=3e-3, lam_lr=0.2,
                           batch_size=4, checkpoint_every=1000)
    with resolve(str(tgt)) as t, resolve(str(src)) as s:
        report = finetune(t, _digits(4), _digits(2), opts, tmp_path / "out", s)
    losses = [e["train_loss"] for e in report["epochs"]]
    assert losses[-1] < 0.8 * losses[0], losses
    lams = json.loads((tmp_path / "out" / "lams.json").read_text())
    values = list(lams["per_layer"].values())
    assert all(0.0 <= v <= 1.0 for v in values) and any(abs(v - 0.1) > 1e-3 for v in values)
    assert lams["trajectory"][0]["lams"] == pytest.approx({"0": 0.1, "1": 0.1})
    assert len(lams["trajectory"]) == report["steps"] + 1
    assert all(0.0 <= v <= 1.0 for snap in lams["trajectory"] for v in snap["lams"].values())
    assert hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest() == before
    assert report["mode"] == "l-mam" and len(report["epochs"]) == 8 and "dev_error" in report["epochs"][0]
    # the output is an ordinary checkpoint with its processor
    import transformers
    assert load_dir(tmp_path / "out").keys() == load_dir(tgt).keys()  # no L-MAM leftovers
    transformers.HubertForCTC.from_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "vocab.json").is_file() and not (tmp_path / "out" / ".mam-run").exists()


def test_baked_checkpoint_equals_parametrised_model(tiny):
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    with resolve(str(tgt)) as t, resolve(str(src)) as s:
        am = load_audio_model(t, "asr")
        model = am.model
        store = ModelStore(model, t.spec)
        plan = InMemoryMerger(store).plan(s, MergeOptions(lam=0.3, layers="1"))
        bank = attach_learnable(model, plan, s, 0.3, per_part=True)
        with torch.no_grad():
            bank.logits.add_(torch.linspace(-1, 1, len(bank.keys)))
            model.hubert.encoder.layers[1].attention.q_proj.parametrizations.weight.original.add_(0.01)
        wav = am.inputs([torch.randn(8000).numpy()])
        with torch.no_grad():
            expect = model(**wav).logits
        for m in model.modules():  # the source stays a frozen buffer
            if isinstance(m, LamMerge):
                assert not m.source.requires_grad
        baked = baked_state_dict(model)
        fresh = type(model)(model.config)
        fresh.load_state_dict(baked)
        with torch.no_grad():
            got = fresh.eval()(**wav).logits
        assert torch.equal(got, expect)
        w = load_dir(src)["bert.encoder.layer.1.attention.self.query.weight"]
        lam = torch.sigmoid(bank.logits.detach()[bank.keys.index("1.q")])
        t_w = model.hubert.encoder.layers[1].attention.q_proj.parametrizations.weight.original.detach()
        assert torch.equal(baked["hubert.encoder.layers.1.attention.q_proj.weight"], lam * w + (1 - lam) * t_w)


def test_resumed_run_matches_uninterrupted(tiny, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    base = dict(task="asr", lam_init=0.2, learnable_lam=True, epochs=2, lr=1e-3, batch_size=2,
                checkpoint_every=1)
    with resolve(str(tgt)) as t, resolve(str(src)) as s:
        finetune(t, _digits(6), None, FinetuneOptions(**base), tmp_path / "straight", s)
        stopped = finetune(t, _digits(6), None, FinetuneOptions(**base, max_steps=4), tmp_path / "resumed", s)
        assert stopped["status"] == "stopped" and stopped["step"] == 4
        with pytest.raises(Exception, match="--resume"):
            finetune(t, _digits(6), None, FinetuneOptions(**base), tmp_path / "resumed", s)
        finetune(t, _digits(6), None, FinetuneOptions(**base), tmp_path / "resumed", s, resume=True)
    a, b = load_dir(tmp_path / "straight"), load_dir(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = json.loads((tmp_path / "straight" / "lams.json").read_text())
    lb = json.loads((tmp_path / "resumed" / "lams.json").read_text())
    assert la["lams"] == lb["lams"] and la["trajectory"] == lb["trajectory"]


def test_lams_replay_with_merge(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    r = mam("finetune", tgt, "--data", FSDD, "--limit", "4", "--source", src, "--learnable-lam", "--lam-init",
            "0.2", "--epochs", "1", "--batch-size", "2", "--lr", "0", "--lam-lr", "0.5", "-o", tmp_path / "ft", "-q")
    assert r.code == 0, r.err
    # with lr 0 the target weights never move, so replaying the learned λ on the original target
    # with `mam merge --lams` must give the baked checkpoint
    assert mam("merge", src, tgt, "--lams", tmp_path / "ft" / "lams.json", "-o", tmp_path / "replay", "-q").code == 0
    ft, replay = load_dir(tmp_path / "ft"), load_dir(tmp_path / "replay")
    name = "hubert.encoder.layers.1.attention.v_proj.weight"
    assert not torch.equal(ft[name], load_dir(tgt)[name])
    assert torch.allclose(ft[name], replay[name], atol=1e-6)


def test_audio_events_new_head_few_steps(tiny, mam, tmp_path):
    src, tgt = tiny("vit", layers=2), tiny("ast", layers=2)
    r = mam("finetune", tgt, "--data", ESC10, "--folds", "1", "--limit", "10", "--task", "aec", "--source", src,
            "--lam-init", "0.1", "--epochs", "1", "--batch-size", "4", "-o", tmp_path / "ft", "-q")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["mode"] == "mam+finetune" and report["epochs"][0]["train_loss"] > 0
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    labels = ESC10_CLASSES
    assert sorted(cfg["id2label"].values()) == labels


@pytest.mark.parametrize("args,needle", [(["--learnable-lam"], "needs --source"), (["--epochs", "0"], "--epochs"),
                                         (["--task", "tts"], "--task")])
def test_finetune_errors(args, needle, tiny, mam, tmp_path):
    r = mam("finetune", tiny("hubert-ctc", layers=2), "--data", FSDD, "--limit", "4", "-o", tmp_path / "o", "-q",
            *args)
    assert r.code == 1 and needle in r.err and r.err.count("\n") == 1, r.err
    assert not (tmp_path / "o").exists()


def _deterministic_copy(model_dir, dest):
    """The model with dropout, LayerDrop and SpecAugment off, so two runs can agree number for number."""
    import shutil

    shutil.copytree(model_dir, dest)
    cfg = json.loads((dest / "config.json").read_text())
    for key in cfg:
        if "dropout" in key or key in ("layerdrop", "mask_time_prob", "mask_feature_prob"):
            cfg[key] = 0.0
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_two_processes_equal_one_with_their_batches_accumulated(tiny, mam, tmp_path):
    """torchrun, 2 CPU processes over gloo, grad-accum 2 == one process, grad-accum 4: the same batches
    make each step (every n-th batch per process), gradients averaged once per step, λ synced,
    one report on stdout, the output written once."""
    import os
    import subprocess
    import sys

    src = tiny("bert", layers=2)
    tgt = _deterministic_copy(tiny("hubert-ctc", layers=2), tmp_path / "tgt")
    args = ["finetune", tgt, "--data", FSDD, "--limit", "20", "--source", src, "--learnable-lam",
            "--lam-init", "0.2", "--epochs", "2", "--batch-size", "2", "--lr", "1e-3", "--lam-lr", "0.1"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "mamcli.cli", *map(str, args), "--grad-accum", "2", "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads(run.stdout)  # exactly one JSON document
    assert run.stderr.count("reading 20 training clips") == 1
    one_run = mam(*args, "--grad-accum", "4", "-o", tmp_path / "one")
    assert one_run.code == 0, one_run.err
    one = json.loads(one_run.out)
    assert two["steps"] == one["steps"] == 6  # 10 batches: 5 groups of 2, a step every 2 groups (3 per epoch)
    wa, wb = load_dir(tmp_path / "two"), load_dir(tmp_path / "one")
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff < 1e-4, diff  # float sums in another order: ~4e-6 here; a wrong schedule gives ~2e-3
    for a, b in zip(two["epochs"], one["epochs"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5) and a["dev_error"] == b["dev_error"]
    la = json.loads((tmp_path / "two" / "lams.json").read_text())["per_layer"]
    lb = json.loads((tmp_path / "one" / "lams.json").read_text())["per_layer"]
    assert la == pytest.approx(lb, abs=1e-6) and la != pytest.approx({"0": 0.2, "1": 0.2}, abs=1e-3)
