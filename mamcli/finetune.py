"""Fine-tuning: plain, MAM then fine-tune, and Learnable-MAM (per-layer λ learned with the target).

L-MAM (Eq. 3): every merged target weight is reparametrised as
``W = λ_i · W_source + (1 − λ_i) · W_target`` with ``λ_i = sigmoid(logit_i)`` (so λ stays in [0, 1]),
the source weight a frozen buffer, the target weight and the logits trainable (torch
parametrizations). At the end the merged weights are baked into an ordinary checkpoint.
Runs are resumable: checkpoints at step boundaries hold the weights, λ logits, optimizer,
scheduler and RNG state, so a resumed run ends where an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from mamcli.checkpoint import Checkpoint
from mamcli.data import Clip, Dataset, iter_clips
from mamcli.errors import MamError
from mamcli.evaluate import EvalOptions, Evaluator
from mamcli.families import FAMILIES, Family
from mamcli.merge import MergeOptions, MergePlan, TensorStore
from mamcli.metrics import normaliser
from mamcli.models import AudioModel, InMemoryMerger, ModelStore, _transformers, load_audio_model, resolve_device
from mamcli.report import peak_rss_mib, versions, write_json
from mamcli.writer import atomic_output_dir

STATE_DIR = ".mam-run"  # inside the output directory while a run is in progress


@dataclass
class FinetuneOptions:
    task: str = "asr"
    lam_init: float | None = None  # with a source: MAM (fixed) or the initial λ of L-MAM
    learnable_lam: bool = False
    layers: str | None = None
    per_part: bool = False
    parts: tuple[str, ...] = ("q", "k", "v")
    epochs: int = 1
    lr: float = 1e-5
    lam_lr: float = 1e-2
    batch_size: int = 8
    grad_accum: int = 1
    warmup: int = 0
    weight_decay: float = 0.01
    freeze_feature_encoder: bool = False
    seed: int = 0
    max_steps: int | None = None  # stop (and checkpoint) after this many optimizer steps
    checkpoint_every: int = 50
    device: str = "cpu"
    normalizer: str = "basic"


class LamMerge(nn.Module):
    """Parametrization: the weight seen by the model is λ·source + (1 − λ)·target."""

    def __init__(self, source: torch.Tensor, logits: nn.Parameter, index: int) -> None:
        super().__init__()
        self.register_buffer("source", source.detach().clone(), persistent=False)
        self.logits = [logits]  # a list: the shared logits are not this module's parameter
        self.index = index

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        lam = torch.sigmoid(self.logits[0][self.index]).to(target.dtype)
        return lam * self.source + (1 - lam) * target


LAM_MODULE = "mam_lams"  # attribute under which the λ logits live on the model (so DDP syncs them)


class LamBank(nn.Module):
    """The trainable λ logits: one per merged layer, or one per layer and part with ``per_part``."""

    def __init__(self, keys: list[str], init: float, per_part: bool) -> None:
        super().__init__()
        self.keys = keys
        self.per_part = per_part
        self.logits = nn.Parameter(torch.full((len(keys),), init))

    @staticmethod
    def key(layer: int, part: str, per_part: bool) -> str:
        """``"3"`` (one λ per layer) or ``"3.q"`` (per layer and part)."""
        return f"{layer}.{part}" if per_part else str(layer)

    def values(self) -> dict[str, float]:
        return {k: float(torch.sigmoid(v)) for k, v in zip(self.keys, self.logits.detach().cpu(), strict=True)}


def _module_of(model: nn.Module, tensor_name: str) -> tuple[nn.Module, str]:
    path, _, attr = tensor_name.rpartition(".")
    return model.get_submodule(path), attr


def attach_learnable(model: nn.Module, plan: MergePlan, source: TensorStore, lam_init: float,
                     per_part: bool) -> LamBank:
    """Register λ-merge parametrizations on every planned target tensor (unfused layouts only)."""
    if any(p.target_rows is not None for p in plan.pairs):
        raise MamError("L-MAM needs separate q/k/v weights in the target (its attention is fused)")
    keys = sorted({LamBank.key(p.layer, p.part, per_part) for p in plan.pairs},
                  key=lambda k: [int(x) if x.isdigit() else x for x in k.split(".")])
    init = math.log(lam_init / (1 - lam_init)) if 0 < lam_init < 1 else (10.0 if lam_init >= 1 else -10.0)
    device = next(model.parameters()).device
    bank = LamBank(keys, init, per_part).to(device)
    model.add_module(LAM_MODULE, bank)
    for p in plan.pairs:
        module, attr = _module_of(model, p.target)
        src = source.get(p.source)
        src = (src if p.source_rows is None else src[p.source_rows[0]:p.source_rows[1]]).to(device)
        key = LamBank.key(p.layer, p.part, per_part)
        parametrize.register_parametrization(module, attr, LamMerge(src.to(getattr(module, attr).dtype),
                                                                    bank.logits, keys.index(key)))
    return bank


def baked_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as an ordinary checkpoint: λ-merged tensors replaced by their merged value.

    Other parametrizations (HuBERT's weight-normed positional conv) are left as the model saves them.
    """
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{LAM_MODULE}.")}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, chain in module.parametrizations.items():
            if any(isinstance(p, LamMerge) for p in chain):
                prefix = f"{name}.parametrizations.{attr}."
                for key in [k for k in state if k.startswith(prefix)]:
                    del state[key]
                state[f"{name}.{attr}"] = getattr(module, attr).detach().clone()
    return state


def lam_table(bank: LamBank, plan: MergePlan, num_layers: int) -> dict[str, list[float]]:
    """Per part, λ of every layer (0 where nothing is merged): the form ``mam merge --lams`` reads."""
    values = bank.values()
    table = {p: [0.0] * num_layers for p in plan.options.parts}
    for pair in plan.pairs:
        table[pair.part][pair.layer] = values[LamBank.key(pair.layer, pair.part, bank.per_part)]
    return table


def ctc_targets(tokenizer: Any, texts: list[str], norm: str) -> torch.Tensor:
    """Character targets for CTC: normalised text, cased like the tokenizer's vocabulary, -100 padded."""
    f = normaliser(norm)
    vocab = tokenizer.get_vocab()
    upper = "A" in vocab and "a" not in vocab
    prepared = [f(t).upper() if upper else f(t) for t in texts]
    enc = tokenizer(prepared, padding=True, return_tensors="pt", return_attention_mask=True)
    return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)


def load_for_training(target: Checkpoint, task: str, ds: Dataset, device: str) -> AudioModel:
    """The target with its processor; for audio events a classifier sized to the dataset's labels."""
    labels = ds.all_labels
    if task != "aec":
        return load_audio_model(target, task, device)
    if target.fmt != "beats":  # transformers builds the new head while loading: the model is read once
        saved = sorted(str(v) for v in (target.config.get("id2label") or {}).values())
        return load_audio_model(target, task, device, labels=None if saved == sorted(labels) else labels)
    am = load_audio_model(target, task, device)
    if sorted(str(v) for v in am.model.config.id2label.values()) != sorted(labels):
        from mamcli.beats import new_head

        new_head(am.model, labels)
    return am


@dataclass
class RunState:
    epoch: int = 0
    step: int = 0  # optimizer steps done
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    best: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    trajectory: list[dict[str, Any]] = field(default_factory=list)


def _numpy_rng() -> dict[str, Any]:
    """numpy's global RNG (transformers' SpecAugment masks draw from it) as tensors and numbers,
    so the checkpoint loads with weights_only=True."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}


def _restore_numpy_rng(d: dict[str, Any]) -> None:
    np.random.set_state(("MT19937", d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"]))


def _save_state(path: Path, model: nn.Module, opt: Any, sched: Any, st: RunState) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(), "numpy_rng": _numpy_rng(), "run": json.dumps(asdict(st))}, tmp)
    tmp.replace(path)


def finetune(target: Checkpoint, train: Dataset, dev: Dataset | None, opts: FinetuneOptions, out: Path,
             source: Checkpoint | None = None, *, resume: bool = False, force: bool = False,
             families: tuple[Family, ...] = FAMILIES,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train, evaluate on dev after each epoch, keep the best, and write a loadable checkpoint to ``out``."""
    started = time.perf_counter()
    if opts.task not in ("asr", "aec"):
        raise MamError(f"--task must be asr or aec; got {opts.task!r}")
    if opts.learnable_lam and source is None:
        raise MamError("--learnable-lam needs --source")
    if source is not None and opts.lam_init is None:
        raise MamError("with --source give --lam-init (the fixed λ of MAM, or L-MAM's starting λ)")
    sizes = (("--epochs", opts.epochs), ("--batch-size", opts.batch_size), ("--grad-accum", opts.grad_accum))
    for name, value in sizes:
        if value < 1:
            raise MamError(f"{name} must be at least 1; got {value}")
    out = out.expanduser().absolute()
    state_dir = out / STATE_DIR
    # every process checks before any process changes anything; only the main process changes files
    acc = _accelerator(opts.device)
    say = progress if progress is not None and acc.is_main_process else _quiet  # one voice on stderr
    if out.exists() and not resume and not force:
        raise MamError(f"{out} already exists; pass --resume to continue its run or --force to start over")
    if resume and not (state_dir / "state.pt").is_file():
        raise MamError(f"nothing to resume in {out}: no {STATE_DIR}/state.pt")
    created = not resume and (force or not out.exists())
    acc.wait_for_everyone()
    if acc.is_main_process:
        if force and not resume and out.exists():
            shutil.rmtree(out)
        state_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    try:
        return _run(target, train, dev, opts, out, state_dir, source, resume, families, say, started, acc)
    except BaseException:
        if created and acc.is_main_process and not (state_dir / "state.pt").is_file():
            shutil.rmtree(out, ignore_errors=True)  # failed before any progress: leave nothing
        raise


def _quiet(_msg: str) -> None:
    """Progress sink without a progress callback, and for the other processes of a launched run."""


def _run(target: Checkpoint, train: Dataset, dev: Dataset | None, opts: FinetuneOptions, out: Path,
         state_dir: Path, source: Checkpoint | None, resume: bool, families: tuple[Family, ...],
         say: Callable[[str], None], started: float, acc: Any) -> dict[str, Any]:

    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed)  # transformers' SpecAugment time masks use numpy's global RNG
    am = load_for_training(target, opts.task, train, opts.device)
    model = am.model
    if opts.freeze_feature_encoder and hasattr(model, "freeze_feature_encoder"):
        model.freeze_feature_encoder()
    store = ModelStore(model, target.spec)
    plan = None
    bank: LamBank | None = None
    if source is not None:
        assert opts.lam_init is not None
        merger = InMemoryMerger(store, families)
        plan = merger.plan(source, MergeOptions(lam=opts.lam_init, layers=opts.layers, parts=opts.parts))
        if opts.learnable_lam:
            bank = attach_learnable(model, plan, source, opts.lam_init, opts.per_part)
        else:  # MAM, then plain fine-tuning: the merged weights are the starting point
            merger.apply(source, plan)
    bad: list[dict[str, str]] = []
    say(f"reading {len(train.items)} training clips")
    clips: list[Clip] = list(iter_clips(train, am.rate, False, bad))
    if not clips:
        raise MamError(f"no readable training clip in {train.spec!r}")
    clips.sort(key=lambda c: c.item.id)
    label_ids = {str(k): int(v) for k, v in model.config.label2id.items()}

    lam_params = {id(bank.logits)} if bank is not None else set()
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in lam_params]
    groups: list[dict[str, Any]] = [{"params": params, "lr": opts.lr, "weight_decay": opts.weight_decay}]
    if bank is not None:
        groups.append({"params": [bank.logits], "lr": opts.lam_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    # one process: the plain loop; under a launcher: DDP, each process takes every n-th batch, so an
    # optimizer step consumes n_proc · grad_accum batches
    n_proc, rank = acc.num_processes, acc.process_index
    groups_per_epoch = math.ceil(math.ceil(len(clips) / opts.batch_size) / n_proc)
    total_steps = math.ceil(groups_per_epoch / opts.grad_accum) * opts.epochs
    tf = _transformers()
    # counted in real optimizer steps, so not handed to Accelerate (which would step it n_proc times)
    scheduler = tf.get_linear_schedule_with_warmup(optimizer, opts.warmup, max(total_steps, 1))
    wrapped, optimizer = acc.prepare(model, optimizer)
    st = RunState()
    if resume:
        saved = torch.load(state_dir / "state.pt", map_location=model.device, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        _restore_numpy_rng(saved["numpy_rng"])
        st = RunState(**json.loads(saved["run"]))
        say(f"resuming at epoch {st.epoch + 1}, step {st.step}")
    evaluator = Evaluator(target, dev, EvalOptions(task=opts.task, normalizer=opts.normalizer), am=am) \
        if dev is not None else None

    def checkpoint() -> None:
        if acc.is_main_process:
            _save_state(state_dir / "state.pt", model, optimizer, scheduler, st)
        acc.wait_for_everyone()

    def snapshot_lams() -> None:
        if bank is not None:
            st.trajectory.append({"step": st.step, "epoch": st.epoch, "lams": bank.values()})

    if bank is not None and not st.trajectory:
        snapshot_lams()
    model.train()
    stopped = False
    try:
        while st.epoch < opts.epochs and not stopped:
            order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(opts.seed + st.epoch)).tolist()
            epoch_batches = [[clips[k] for k in order[s:s + opts.batch_size]]
                             for s in range(0, len(order), opts.batch_size)]
            losses: list[float] = []
            for g in range(st.batch_in_epoch, len(epoch_batches), n_proc):
                batch = epoch_batches[(g + rank) % len(epoch_batches)]  # the last group wraps, as samplers pad
                inputs = am.inputs([c.audio for c in batch])
                if opts.task == "asr":
                    labels = ctc_targets(am.tokenizer, [c.item.text or "" for c in batch], opts.normalizer)
                else:
                    labels = torch.tensor([label_ids[c.item.label or ""] for c in batch])
                st.batch_in_epoch = min(g + n_proc, len(epoch_batches))
                groups_done = -(-st.batch_in_epoch // n_proc)
                steps_now = groups_done % opts.grad_accum == 0 or st.batch_in_epoch == len(epoch_batches)
                with nullcontext() if steps_now else acc.no_sync(wrapped):  # all-reduce once per step
                    loss = wrapped(**inputs, labels=labels.to(model.device)).loss
                    if not torch.isfinite(loss):
                        raise MamError(f"the loss became {float(loss)} at step {st.step}; lower --lr")
                    acc.backward(loss / opts.grad_accum)
                losses.append(float(loss.detach()))
                if steps_now:
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    st.step += 1
                    snapshot_lams()
                    if st.step % 10 == 0:
                        lam_note = f", λ {bank.values()}" if bank is not None else ""
                        say(f"epoch {st.epoch + 1}, step {st.step}/{total_steps}: loss {losses[-1]:.4f}{lam_note}")
                    if st.step % opts.checkpoint_every == 0:
                        checkpoint()
                    if opts.max_steps is not None and st.step >= opts.max_steps:
                        stopped = True
                        break
            if stopped and st.batch_in_epoch < len(epoch_batches):
                break
            mean_loss = acc.reduce(torch.tensor(sum(losses) / len(losses), device=acc.device), "mean") \
                if losses else None  # every process has batches: the last group wraps round
            entry: dict[str, Any] = {"epoch": st.epoch + 1, "step": st.step,
                                     "train_loss": None if mean_loss is None else float(mean_loss)}
            if evaluator is not None and acc.is_main_process:
                scores = evaluator.evaluate()
                entry["dev_error"] = scores["error"]
                if st.best is None or scores["error"] < st.best:
                    st.best = scores["error"]
                    _save_best(state_dir, model, bank, plan, store)
                say(f"epoch {st.epoch + 1}: loss {entry['train_loss']:.4f}, dev error {scores['error']:.4f}")
            st.history.append(entry)
            st.epoch += 1
            st.batch_in_epoch = 0
            checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        say(f"interrupted: state saved; continue with --resume (step {st.step})")
        raise
    checkpoint()
    status = "stopped" if stopped and st.epoch < opts.epochs else "done"
    if not acc.is_main_process:  # the main process writes the output and the report
        return {"command": "finetune", "status": status, "process": rank}
    if status == "stopped":
        return {"command": "finetune", "status": status, "step": st.step, "epoch": st.epoch, "resume": str(out)}
    if evaluator is None or not (state_dir / "best.pt").is_file():
        _save_best(state_dir, model, bank, plan, store)
    best = torch.load(state_dir / "best.pt", weights_only=True)
    report = {
        "command": "finetune", "status": "done",
        "inputs": {"target": target.describe(), "source": source.describe() if source else None,
                   "train": train.describe(), "dev": dev.describe() if dev else None},
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "mode": "l-mam" if bank is not None else ("mam+finetune" if source is not None else "finetune"),
        "epochs": st.history, "best_dev_error": st.best, "steps": st.step, "bad_clips": bad,
        "versions": versions(), "wall_time_s": round(time.perf_counter() - started, 3),
        "peak_rss_mib": peak_rss_mib(),
    }
    lams = json.loads(best["lams_json"]) if best.get("lams_json") else None
    _write_output(out, target, am, best["state"], report, lams, st.trajectory)
    return report


def _accelerator(device: str) -> Any:
    """Hugging Face Accelerate decides the device under a launcher (``accelerate launch``, ``torchrun``);
    alone, --device does. Launched on a machine without CUDA, the processes train on CPUs over gloo
    (Accelerate stays single-process there unless told ``cpu``)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = not torch.cuda.is_available() if launched else resolve_device(device).type == "cpu"
    # LayerDrop (HuBERT/wav2vec2 fine-tuning configs: 0.1) leaves whole layers, and their λ, without
    # gradients in some steps; DDP must look for them, as transformers' Trainer does by default
    # the other processes wait while the main one evaluates dev: give that wait more than the default
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True),
                InitProcessGroupKwargs(timeout=timedelta(hours=2))]
    return Accelerator(cpu=cpu, kwargs_handlers=handlers)


def _save_best(state_dir: Path, model: nn.Module, bank: LamBank | None, plan: MergePlan | None,
               store: ModelStore) -> None:
    lams = None
    if bank is not None and plan is not None:
        lams = json.dumps({"lams": lam_table(bank, plan, store.arch().num_layers), "per_layer": bank.values()})
    tmp = state_dir / "best.pt.tmp"
    torch.save({"state": baked_state_dict(model), "lams_json": lams or ""}, tmp)
    tmp.replace(state_dir / "best.pt")


def _write_output(out: Path, target: Checkpoint, am: AudioModel, state: dict[str, torch.Tensor],
                  report: dict[str, Any], lams: dict[str, Any] | None, trajectory: list[dict[str, Any]]) -> None:
    """Atomically replace the run directory by the final, ordinary checkpoint."""
    final = out.with_name(out.name + ".mam-final")
    with atomic_output_dir(final, force=True) as tmp:
        if target.fmt == "beats":  # the official layout, and a safetensors copy
            from safetensors.torch import save_file

            from mamcli.beats import save_checkpoint

            save_checkpoint(tmp / target.files[0].name, am.model, state, target.extras)
            save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
        else:
            clean_model = type(am.model)(am.model.config)  # no parametrizations: an ordinary model
            clean_model.load_state_dict(state)
            clean_model.save_pretrained(tmp)
            am.features.save_pretrained(tmp)
            if am.tokenizer is not None:
                am.tokenizer.save_pretrained(tmp)
        if lams is not None:
            write_json(tmp / "lams.json", {**lams, "trajectory": trajectory})
        write_json(tmp / "mam_report.json", report)
    shutil.rmtree(out)
    final.rename(out)
