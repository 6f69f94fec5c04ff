"""finetune / L-MAM: loss falls, λ moves inside [0, 1], source frozen, baked == parametrised, resume == straight run;
--force never deletes what mam did not write; signals save the run; unusable clips are named."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import ESC10_CLASSES, SHARED
from helpers import load_dir
from mamcli.checkpoint import resolve
from mamcli.data import load_dataset, select
from mamcli.errors import Interrupted, MamError
from mamcli.finetune import FinetuneOptions, LamMerge, attach_learnable, baked_state_dict, finetune, run_dir
from mamcli.merge import MergeOptions
from mamcli.models import AudioModel, InMemoryMerger, ModelStore, load_audio_model
from mamcli.tasks import CTC

FSDD = f"fsdd:{SHARED}/fsdd/recordings"
ESC10 = f"folders:{SHARED}/esc10/ESC-10"


def _digits(n: int):
    return select(load_dataset(FSDD), limit=n)


def _snapshot(folder):
    """Every file under a folder with its bytes' hash: equal snapshots mean nothing was touched."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


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
    assert (tmp_path / "out" / "vocab.json").is_file() and not run_dir(tmp_path / "out").exists()


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


def _crash_at_batch(monkeypatch, n: int) -> None:
    """The n-th training batch's forward pass dies (a power cut): the run keeps its last checkpoint."""
    calls, inputs = [], AudioModel.inputs

    def crashing_inputs(self, audio):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("power cut")
        return inputs(self, audio)

    monkeypatch.setattr(AudioModel, "inputs", crashing_inputs)


def test_resumed_run_matches_uninterrupted(tiny, tmp_path, monkeypatch):
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    base = dict(task="asr", lam_init=0.2, learnable_lam=True, epochs=2, lr=1e-3, batch_size=2,
                checkpoint_every=1)
    with resolve(str(tgt)) as t, resolve(str(src)) as s:
        straight = finetune(t, _digits(6), None, FinetuneOptions(**base), tmp_path / "straight", s)
        _crash_at_batch(monkeypatch, 5)  # steps 1-4 done and saved: mid-epoch 2 (3 batches an epoch)
        with pytest.raises(RuntimeError, match="power cut"):
            finetune(t, _digits(6), None, FinetuneOptions(**base), tmp_path / "resumed", s)
        monkeypatch.undo()
        assert json.loads((run_dir(tmp_path / "resumed") / "run.json").read_text())["step"] == 4
        assert not (tmp_path / "resumed").exists()
        with pytest.raises(MamError, match="--resume"):
            finetune(t, _digits(6), None, FinetuneOptions(**base), tmp_path / "resumed", s)
        for changed, field in (({"lr": 2e-3}, "lr"), ({"max_steps": 5}, "max_steps")):  # the recipe stays
            with pytest.raises(MamError, match=rf"other options .*\({field}\)"):
                finetune(t, _digits(6), None, FinetuneOptions(**{**base, **changed}), tmp_path / "resumed", s,
                         resume=True)
        resumed = finetune(t, _digits(6), None, FinetuneOptions(**base), tmp_path / "resumed", s, resume=True)
    a, b = load_dir(tmp_path / "straight"), load_dir(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = json.loads((tmp_path / "straight" / "lams.json").read_text())
    lb = json.loads((tmp_path / "resumed" / "lams.json").read_text())
    assert la["lams"] == lb["lams"] and la["trajectory"] == lb["trajectory"]
    # the resumed epoch's loss covers its steps before the stop too, number for number
    assert [e["train_loss"] for e in resumed["epochs"]] == [e["train_loss"] for e in straight["epochs"]]
    assert resumed["epochs"] == straight["epochs"] and not run_dir(tmp_path / "resumed").exists()


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)  # what `mam`'s entry point installs for SIGTERM and SIGHUP


@pytest.mark.parametrize("signum,raised", [(signal.SIGTERM, Interrupted), (signal.SIGINT, KeyboardInterrupt)])
def test_signal_mid_step_saves_the_run_and_resume_equals_straight(signum, raised, tiny, tmp_path, monkeypatch):
    """The signal arrives between the two micro-batches of a step: the step is finished, the run saved,
    then the signal handed on; --resume ends number for number where the uninterrupted run ends."""
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    base = dict(task="asr", lam_init=0.2, learnable_lam=True, epochs=2, lr=1e-3, batch_size=2, grad_accum=2,
                checkpoint_every=100)
    with resolve(str(tgt)) as t, resolve(str(src)) as s:
        straight = finetune(t, _digits(6), None, FinetuneOptions(**base), tmp_path / "straight", s)
        calls = []
        inputs = AudioModel.inputs

        def signalling_inputs(self, audio):
            calls.append(len(audio))
            if len(calls) == 4:  # epoch 2, batch 1 of 3: the first micro-batch of step 3
                signal.raise_signal(signum)
            return inputs(self, audio)

        monkeypatch.setattr(AudioModel, "inputs", signalling_inputs)
        previous = {n: signal.signal(n, h) for n, h in ((signal.SIGTERM, _raise_interrupted),
                                                        (signal.SIGINT, signal.default_int_handler))}
        try:
            with pytest.raises(raised):
                finetune(t, _digits(6), None, FinetuneOptions(**base), tmp_path / "out", s)
            assert signal.getsignal(signal.SIGTERM) is _raise_interrupted  # finetune's own handler is gone
        finally:
            for n, h in previous.items():
                signal.signal(n, h)
        assert len(calls) == 5  # the step's second micro-batch still ran, nothing after it
        monkeypatch.setattr(AudioModel, "inputs", inputs)
        saved = json.loads((run_dir(tmp_path / "out") / "run.json").read_text())
        assert saved["step"] == 3 and not (tmp_path / "out").exists()
        resumed = finetune(t, _digits(6), None, FinetuneOptions(**base), tmp_path / "out", s, resume=True)
    a, b = load_dir(tmp_path / "straight"), load_dir(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["epochs"] == straight["epochs"]
    la = json.loads((tmp_path / "straight" / "lams.json").read_text())
    assert la == json.loads((tmp_path / "out" / "lams.json").read_text())


@pytest.mark.parametrize("source_layers,layer_map", [(2, []), (4, ["--layer-map", "stride"])])
def test_lams_replay_with_merge(source_layers, layer_map, tiny, mam, tmp_path):
    """L-MAM's learned λ replay with `mam merge --lams`, also from a deeper source through a layer map."""
    src, tgt = tiny("bert", layers=source_layers), tiny("hubert-ctc", layers=2)
    r = mam("finetune", tgt, "--data", FSDD, "--limit", "4", "--source", src, "--learnable-lam", "--lam-init",
            "0.2", "--epochs", "1", "--batch-size", "2", "--lr", "1e-30", "--lam-lr", "0.5", "-o", tmp_path / "ft",
            "-q", *layer_map)
    assert r.code == 0, r.err
    # at lr 1e-30 the target weights cannot move in float32 (checked below), so replaying the learned λ on
    # the original target with `mam merge --lams` must give the baked checkpoint, bit for bit
    assert mam("merge", src, tgt, "--lams", tmp_path / "ft" / "lams.json", *layer_map, "-o", tmp_path / "replay",
               "-q").code == 0
    ft, replay, original = load_dir(tmp_path / "ft"), load_dir(tmp_path / "replay"), load_dir(tgt)
    merged = [k for k in original if "attention." in k and k.endswith(("q_proj.weight", "k_proj.weight",
                                                                         "v_proj.weight"))]
    assert len(merged) == 6 and all(not torch.equal(ft[k], original[k]) for k in merged)
    assert all(torch.equal(ft[k], replay[k]) for k in merged)
    assert all(torch.equal(ft[k], original[k]) for k in original if k not in merged)
    assert mam("verify", tmp_path / "ft").code == 0 and (tmp_path / "ft" / "README.md").is_file()


def test_audio_events_new_head_few_steps(tiny, mam, tmp_path):
    src, tgt = tiny("vit", layers=2), tiny("ast", layers=2)
    r = mam("finetune", tgt, "--data", ESC10, "--folds", "1", "--limit", "10", "--task", "aec", "--source", src,
            "--lam-init", "0.1", "--epochs", "1", "--batch-size", "4", "-o", tmp_path / "ft", "-q", "--format", "json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["mode"] == "mam+finetune" and report["epochs"][0]["train_loss"] > 0
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    labels = ESC10_CLASSES
    assert sorted(cfg["id2label"].values()) == labels


@pytest.mark.parametrize("args,needle", [(["--learnable-lam"], "--learnable-lam needs --source"),
                                         (["--lam-init", "0.1"], "--lam-init needs --source")])
def test_finetune_errors(args, needle, tiny, mam, tmp_path):
    r = mam("finetune", tiny("hubert-ctc", layers=2), "--data", FSDD, "--limit", "4", "-o", tmp_path / "o", "-q",
            *args)
    assert r.code == 1 and needle in r.err and r.err.count("\n") == 1, r.err
    assert not (tmp_path / "o").exists() and not run_dir(tmp_path / "o").exists()


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("lr", -1e-3), ("lr", math.nan), ("lr", math.inf),
                                         ("lam_lr", 0.0), ("epochs", 0), ("batch_size", 0), ("grad_accum", 0),
                                         ("max_steps", 0), ("checkpoint_every", 0), ("warmup", -1),
                                         ("lam_init", 1.5), ("task", "tts")])
def test_options_out_of_range_are_one_line(field, value):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(MamError, match=flag):
        FinetuneOptions(**{field: value})


@pytest.mark.parametrize("case", ["the target", "the cwd", "a folder mam did not write", "an input's ancestor"])
def test_force_never_replaces_what_mam_did_not_write(case, tiny, mam, tmp_path, monkeypatch):
    model = tmp_path / "anc" / "model"
    shutil.copytree(tiny("hubert-ctc", layers=2), model)
    (model / "mam_report.json").write_text("{}")  # even an earlier mam output is never replaced while an input
    (tmp_path / "anc" / "mam_report.json").write_text("{}")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "mam_report.json").write_text("{}")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    out = {"the target": model, "the cwd": tmp_path / "cwd", "a folder mam did not write": tmp_path / "mine",
           "an input's ancestor": tmp_path / "anc"}[case]
    monkeypatch.chdir(tmp_path / "cwd")
    before = _snapshot(tmp_path)
    r = mam("finetune", model, "--data", FSDD, "--limit", "4", "-o", out, "--force", "-q")
    assert r.code == 1 and r.err.count("\n") == 1 and "refusing" in r.err, r.err
    assert _snapshot(tmp_path) == before and not run_dir(out).exists()


def test_forced_run_that_fails_midway_keeps_the_old_output(tiny, tmp_path, monkeypatch):
    tgt = tiny("hubert-ctc", layers=2)
    opts = FinetuneOptions(task="asr", epochs=2, lr=1e-3, batch_size=2, checkpoint_every=1)
    out = tmp_path / "ft"
    with resolve(str(tgt)) as t:
        finetune(t, _digits(4), None, FinetuneOptions(task="asr", lr=1e-3, batch_size=2), out)
        before = _snapshot(out)
        calls = []
        inputs = AudioModel.inputs

        def failing_inputs(self, audio):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("disk on fire")
            return inputs(self, audio)

        monkeypatch.setattr(AudioModel, "inputs", failing_inputs)
        with pytest.raises(RuntimeError, match="disk on fire"):
            finetune(t, _digits(4), None, opts, out, force=True)
        assert _snapshot(out) == before  # the old output stays whole while the new run is unfinished
        monkeypatch.setattr(AudioModel, "inputs", inputs)
        report = finetune(t, _digits(4), None, opts, out, resume=True)
    assert len(report["epochs"]) == 2 and json.loads((out / "mam_report.json").read_text())["steps"] == 4
    assert not run_dir(out).exists() and not list(tmp_path.glob(".ft.*"))


def _manifest(tmp_path, rows):
    path = tmp_path / "manifest.csv"
    path.write_text("id,path,text\n" + "".join(f"{i},{p},{t}\n" for i, p, t in rows))
    return load_dataset(str(path))


def _clip_rows(tmp_path):
    digits = sorted((SHARED / "fsdd" / "recordings").glob("*_george_*.flac"))[:4]
    sf.write(tmp_path / "blip.wav", np.zeros(160, dtype=np.float32), 16000)  # 10 ms: no output frame
    return [(p.stem, p, "one") for p in digits[:3]] + [("blip", tmp_path / "blip.wav", "one"),
                                                       ("chatty", digits[3], "seven hundred and seventy seven " * 4)]


def test_clips_the_model_cannot_learn_from_are_named_and_skipped(tiny, tmp_path):
    with resolve(str(tiny("hubert-ctc", layers=2))) as t:
        report = finetune(t, _manifest(tmp_path, _clip_rows(tmp_path)), None,
                          FinetuneOptions(task="asr", lr=1e-3, batch_size=2), tmp_path / "ft")
    bad = {b["id"]: b["error"] for b in report["bad_clips"]}
    assert bad.keys() == {"blip", "chatty"} and report["steps"] == 2, bad  # 3 clips left: 2 batches
    assert "too short" in bad["blip"] and "CTC frames" in bad["chatty"], bad


def test_non_finite_loss_names_the_clip_not_the_learning_rate(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(CTC, "unlearnable", lambda self, am, clip: None)  # let the unlearnable clip in
    rows = [r for r in _clip_rows(tmp_path) if r[0] != "blip"]
    with resolve(str(tiny("hubert-ctc", layers=2))) as t, pytest.raises(MamError) as e:
        finetune(t, _manifest(tmp_path, rows), None, FinetuneOptions(task="asr", lr=1e-3, batch_size=2),
                 tmp_path / "ft")
    assert "chatty" in str(e.value) and "--lr" not in str(e.value), e.value


def test_diverged_weights_advise_a_lower_learning_rate(tiny, tmp_path):
    with resolve(str(tiny("hubert-ctc", layers=2))) as t, pytest.raises(MamError, match="diverged; lower --lr"):
        finetune(t, _digits(8), None, FinetuneOptions(task="asr", lr=1e30, epochs=3, batch_size=2), tmp_path / "ft")
    assert not (tmp_path / "ft").exists() and not run_dir(tmp_path / "ft").exists()


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
            "--lam-init", "0.2", "--epochs", "2", "--batch-size", "2", "--lr", "1e-3", "--lam-lr", "0.1",
            "--format", "json"]
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


BERT = {"q": "query", "k": "key", "v": "value"}


def _aligned(source: dict[str, torch.Tensor], doc: dict, i: int, part: str) -> torch.Tensor:
    """The source tensor as ``--align`` re-indexes it: S[rows][:, hidden] (mam_align.json's convention)."""
    name = f"bert.encoder.layer.{i}.attention.self.{BERT[part]}.weight"
    rows = torch.tensor(doc["rows"][str(i)]["v" if part == "v" else "qk"])
    return source[name].index_select(0, rows).index_select(1, torch.tensor(doc["hidden"]))


def test_lmam_aligned_starts_at_the_aligned_formula(tiny, tmp_path):
    """L-MAM reads the source itself: with --align its buffers hold the permuted source, so at step 0 every merged
    weight is exactly λ · S[rows][:, hidden] + (1 − λ) · T, with the permutations `mam merge --align` finds."""
    from mamcli.merge import merge_to_dir, solve_alignment

    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    with resolve(str(tgt)) as t, resolve(str(src)) as s:
        merge_to_dir(s, t, MergeOptions(lam=0.3, align="weights"), tmp_path / "m")
        am = load_audio_model(t, "asr")
        store = ModelStore(am.model, t.spec)
        plan = InMemoryMerger(store).plan(s, MergeOptions(lam=0.3, align="weights"))
        with pytest.raises(MamError, match="permutations first"):
            attach_learnable(am.model, plan, s, 0.3, per_part=False)
        alignment = solve_alignment(plan, s, store)
        bank = attach_learnable(am.model, plan, s, 0.3, per_part=False)
    assert alignment is not None and alignment.dumps() == (tmp_path / "m" / "mam_align.json").read_text()
    doc = json.loads(alignment.dumps())
    source, target = load_dir(src), load_dir(tgt)
    for i in range(2):
        lam = torch.sigmoid(bank.logits.detach()[bank.keys.index(str(i))])
        for part in ("q", "k", "v"):
            name = f"hubert.encoder.layers.{i}.attention.{part}_proj.weight"
            got = am.model.get_submodule(name.removesuffix(".weight")).weight.detach()
            assert torch.equal(got, lam * _aligned(source, doc, i, part) + (1 - lam) * target[name])
            unaligned = source[f"bert.encoder.layer.{i}.attention.self.{BERT[part]}.weight"]
            assert not torch.equal(got, lam * unaligned + (1 - lam) * target[name])


def test_aligned_finetune_writes_verifies_and_replays_its_permutations(tiny, mam, tmp_path):
    """MAM and L-MAM with --align weights: the output carries mam_align.json (the bytes `mam merge --align
    weights` writes for the pair), hashed in the report and checked by `mam verify`; at lr 1e-30 (the target
    cannot move in float32) MAM's weights are the aligned merge's, and L-MAM's replay with
    `mam merge --lams lams.json --align mam_align.json` bit for bit."""
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    common = ["--data", FSDD, "--limit", "4", "--source", src, "--lam-init", "0.2", "--align", "weights",
              "--epochs", "1", "--batch-size", "2", "--lr", "1e-30", "-q"]
    assert mam("merge", src, tgt, "--lam", "0.2", "--align", "weights", "-o", tmp_path / "m", "-q").code == 0
    r = mam("finetune", tgt, *common, "--learnable-lam", "--lam-lr", "0.5", "-o", tmp_path / "l", "--format", "json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["alignment"]["mode"] == "weights" and report["options"]["align"] == "weights"
    assert report["outputs"]["hashes"]["mam_align.json"]
    assert (tmp_path / "l" / "mam_align.json").read_bytes() == (tmp_path / "m" / "mam_align.json").read_bytes()
    assert mam("verify", tmp_path / "l").code == 0
    assert "Aligned first (`--align weights`" in (tmp_path / "l" / "README.md").read_text()
    assert mam("merge", src, tgt, "--lams", tmp_path / "l" / "lams.json", "--align",
               tmp_path / "l" / "mam_align.json", "-o", tmp_path / "replay", "-q").code == 0
    lmam, replay, merged, original = (load_dir(d) for d in (tmp_path / "l", tmp_path / "replay", tmp_path / "m", tgt))
    assert mam("finetune", tgt, *common, "-o", tmp_path / "f").code == 0
    mam_ft = load_dir(tmp_path / "f")
    qkv = [k for k in original if ".attention." in k and k.endswith(("q_proj.weight", "k_proj.weight",
                                                                     "v_proj.weight"))]
    assert len(qkv) == 6
    assert all(torch.equal(lmam[k], replay[k]) and not torch.equal(lmam[k], merged[k]) for k in qkv)  # λ moved
    assert all(torch.equal(mam_ft[k], merged[k]) for k in qkv)
    assert all(torch.equal(mam_ft[k], original[k]) for k in original if k not in qkv)
    r = mam("finetune", tgt, "--data", FSDD, "--limit", "4", "--align", "weights", "-o", tmp_path / "n", "-q")
    assert r.code == 1 and "--align needs --source" in r.err


def test_aligned_run_keeps_its_permutations_for_resume(tiny, tmp_path, monkeypatch):
    """The permutations are solved once and kept in the run folder (a file mam owns there): --resume reads them
    rather than solving again, and ends where the uninterrupted run ends, bit for bit."""
    from mamcli.finetune.state import ours

    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    base = dict(task="asr", lam_init=0.2, learnable_lam=True, align="weights", epochs=1, lr=1e-3, batch_size=2,
                checkpoint_every=1)
    with resolve(str(tgt)) as t, resolve(str(src)) as s:
        finetune(t, _digits(6), None, FinetuneOptions(**base), tmp_path / "straight", s)
        _crash_at_batch(monkeypatch, 3)  # steps 1-2 done and saved
        with pytest.raises(RuntimeError, match="power cut"):
            finetune(t, _digits(6), None, FinetuneOptions(**base), tmp_path / "resumed", s)
        monkeypatch.undo()
        saved = run_dir(tmp_path / "resumed") / "mam_align.json"
        assert ours(saved) and saved.read_bytes() == (tmp_path / "straight" / "mam_align.json").read_bytes()

        def no_solve(*_args: object) -> None:
            raise AssertionError("a resumed run solved the alignment again")

        monkeypatch.setattr("mamcli.merge.solve_weights", no_solve)
        finetune(t, _digits(6), None, FinetuneOptions(**base), tmp_path / "resumed", s, resume=True)
    a, b = load_dir(tmp_path / "straight"), load_dir(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in ("mam_align.json", "lams.json"):
        assert (tmp_path / "resumed" / f).read_bytes() == (tmp_path / "straight" / f).read_bytes()
