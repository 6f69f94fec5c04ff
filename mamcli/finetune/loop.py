"""The training loop: batches, gradient accumulation, optimizer and schedule, checkpoints and resume,
logging, and stop requests. The task computes the loss's targets; the loop never asks which head it trains.

One process is the plain loop on ``--device``; under a launcher (``accelerate launch``, ``torchrun``) it is
DDP through Accelerate, each process taking every n-th batch, so an optimizer step consumes
``processes · grad_accum`` batches. ``--max-steps`` sets the run's length as transformers' Trainer does:
it overrides ``--epochs``, and the data is gone through as many times as those steps need.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mamcli.data import Clip
from mamcli.errors import MamError
from mamcli.evaluate import Evaluator
from mamcli.finetune.lam import LamBank
from mamcli.finetune.options import RESUME_MAY_CHANGE, TRACKERS, FinetuneOptions
from mamcli.finetune.output import writing
from mamcli.finetune.progress import StepBar, step_bar
from mamcli.finetune.state import METRICS_FILE, TENSORBOARD_DIR, RunState, load_state, read_run, trim_metrics, write_run
from mamcli.finetune.stop import StopRequests
from mamcli.models import AudioModel, _transformers, resolve_device


def tracker_missing(name: str) -> str | None:
    """The package an Accelerate tracker needs when none of its modules imports (Accelerate would drop the
    tracker silently); None when one does."""
    for module in TRACKERS[name]:
        try:
            importlib.import_module(module)
            return None
        except ImportError:
            continue
    return name


def make_accelerator(opts: FinetuneOptions, work: Path) -> Any:
    """Hugging Face Accelerate decides the device under a launcher (``accelerate launch``, ``torchrun``);
    alone, --device does. Launched on a machine without CUDA, the processes train on CPUs over gloo
    (Accelerate stays single-process there unless told ``cpu``). The scheduler is stepped once per real
    optimizer step, never once per process; trackers log into the run folder."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = not torch.cuda.is_available() if launched else resolve_device(opts.device).type == "cpu"
    if not launched:  # Accelerate's state is process-wide and refuses another precision or device: start afresh
        AcceleratorState._reset_state(reset_partial_state=True)
    # LayerDrop (HuBERT/wav2vec2 fine-tuning configs: 0.1) leaves whole layers, and their λ, without
    # gradients in some steps; DDP must look for them, as transformers' Trainer does by default
    # the other processes wait while the main one evaluates dev: give that wait more than the default
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True),
                InitProcessGroupKwargs(timeout=timedelta(hours=2))]
    return Accelerator(cpu=cpu, mixed_precision=opts.mixed_precision, step_scheduler_with_optimizer=False,
                       log_with=opts.log_with, project_config=ProjectConfiguration(str(work), str(work)),
                       kwargs_handlers=handlers)


def _grad_norm(params: list[nn.Parameter]) -> float:
    """The total 2-norm of the gradients the optimizer is about to apply."""
    return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def _finite(x: float) -> float | None:
    """A number for JSON: an overflowed fp16 gradient (a skipped step) is null, not ``Infinity``."""
    return x if math.isfinite(x) else None


class TrainingLoop:
    """One run's training: ``run()`` goes from the saved position (``resume()``) to the last step, evaluating
    dev after each epoch on the main process (``on_best`` keeps an improvement), checkpointing every
    ``checkpoint_every`` steps, at each epoch's end and when a signal asks to stop (then handing it on)."""

    def __init__(self, acc: Any, am: AudioModel, bank: LamBank | None, clips: list[Clip], opts: FinetuneOptions,
                 work: Path, say: Callable[[str], None], show_bar: bool, on_best: Callable[[], None]) -> None:
        self.acc, self.am, self.model, self.bank, self.clips, self.opts, self.work = \
            acc, am, am.model, bank, clips, opts, work
        self.say, self.show_bar, self.on_best = say, show_bar, on_best
        self.evaluator: Evaluator | None = None
        self.n_proc, self.rank = acc.num_processes, acc.process_index
        groups_per_epoch = math.ceil(math.ceil(len(clips) / opts.batch_size) / self.n_proc)
        self.steps_per_epoch = math.ceil(groups_per_epoch / opts.grad_accum)
        self.total_steps = opts.max_steps or self.steps_per_epoch * opts.epochs
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)  # --max-steps may need more than --epochs
        self._optimizer()
        self.recipe = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts).items()
                       if k not in RESUME_MAY_CHANGE}
        self.st = RunState(processes=self.n_proc, options=self.recipe, loss_sum=[0.0] * self.n_proc,
                           loss_count=[0] * self.n_proc)
        self.metrics = work / METRICS_FILE
        self.saved_at: tuple[int, int, int] | None = None
        self.stop = StopRequests(say)
        self.last_good: list[Clip] | None = None  # the batch before, to tell diverged weights from a bad clip
        self.last_loss = math.nan
        self.step_loss, self.step_batches = 0.0, 0

    def _optimizer(self) -> None:
        """AdamW over what trains (the λ logits in a group of their own, without weight decay) and a linear
        schedule over the run's optimizer steps, both prepared by Accelerate."""
        opts, bank = self.opts, self.bank
        lam_params = {id(bank.logits)} if bank is not None else set()
        params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in lam_params]
        self.trainable = params + ([bank.logits] if bank is not None else [])  # what the gradient norm covers
        groups: list[dict[str, Any]] = [{"params": params, "lr": opts.lr, "weight_decay": opts.weight_decay}]
        if bank is not None:
            groups.append({"params": [bank.logits], "lr": opts.lam_lr, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups)
        # counted in real optimizer steps (the Accelerator steps it once per call, not once per process)
        scheduler = _transformers().get_linear_schedule_with_warmup(optimizer, opts.warmup, self.total_steps)
        self.wrapped, self.optimizer, self.scheduler = self.acc.prepare(self.model, optimizer, scheduler)

    def resume(self) -> None:
        """Continue the run saved in the run folder: same processes, same recipe, every state restored."""
        acc, work = self.acc, self.work
        st = read_run(work)
        if st.processes != self.n_proc:
            raise MamError(f"the run in {work} was started with {st.processes} process(es); resume it with as many")
        changed = [k for k in self.recipe if st.options.get(k) != self.recipe[k]]
        if changed:
            raise MamError(f"--resume with other options than the run started with ({', '.join(changed)}); "
                           "give the same ones, or --force to start over")
        load_state(acc, work / f"state-{st.saves}")
        if acc.is_main_process:
            trim_metrics(self.metrics, st.step)
            for stray in work.glob("state-*"):  # a checkpoint cut short before its run.json was written
                if stray.name != f"state-{st.saves}":
                    shutil.rmtree(stray, ignore_errors=True)
        acc.wait_for_everyone()
        self.st, self.saved_at = st, st.position
        self.say(f"resuming at epoch {st.epoch + 1}, step {st.step}")

    def checkpoint(self) -> None:
        """Accelerate's save_state into a new folder, then run.json naming it: a crash mid-save resumes the last."""
        acc, st, work = self.acc, self.st, self.work
        if self.saved_at == st.position:  # nothing new since the last save
            return
        if self.n_proc > 1:  # every process's share of the epoch's loss goes into the one saved state
            mine = torch.tensor([st.loss_sum[self.rank], st.loss_count[self.rank]], dtype=torch.float64,
                                device=acc.device)
            every = acc.gather(mine).view(self.n_proc, 2).cpu()
            st.loss_sum, st.loss_count = every[:, 0].tolist(), [int(n) for n in every[:, 1].tolist()]
        st.saves += 1
        folder = work / f"state-{st.saves}"
        with writing(work):
            acc.save_state(str(folder))  # every process its RNG states, the main process the rest
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_run(work, st)
                for old in work.glob("state-*"):
                    if old != folder:
                        shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.saved_at = st.position

    def run(self, evaluator: Evaluator | None) -> None:
        """Train to the last step (from where ``resume()`` left the run), then save the final state;
        ``evaluator`` scores dev after each epoch (made after ``resume()``, whose RNG states it must not see)."""
        opts, st = self.opts, self.st
        self.evaluator = evaluator
        if opts.log_with:  # a resumed run hides the events its replayed steps logged before
            self.acc.init_trackers(TENSORBOARD_DIR, init_kwargs={opts.log_with: {"purge_step": st.step + 1}})
        if self.bank is not None and not st.trajectory:
            self._snapshot_lams()
        self.model.train()
        self.say(f"training on {len(self.clips)} clips: {self.total_steps} optimizer steps")
        try:
            with self.stop.installed(), step_bar(self.show_bar, self.total_steps, st.step, self.say) as bar:
                tell = self.say if bar is None else bar.say
                while st.epoch < self.epochs:
                    self._epoch(bar, tell)
                    self._end_epoch(tell)
            self.checkpoint()
        finally:
            for tracker in self.acc.trackers:  # not end_training(): that also ends the process group, still needed
                tracker.finish()

    def _epoch(self, bar: StepBar | None, tell: Callable[[str], None]) -> None:
        """The epoch's batches from the saved position, until they run out or the run has all its steps."""
        opts, st = self.opts, self.st
        order = torch.randperm(len(self.clips), generator=torch.Generator().manual_seed(opts.seed + st.epoch)).tolist()
        batches = [[self.clips[k] for k in order[s:s + opts.batch_size]]
                   for s in range(0, len(order), opts.batch_size)]
        for g in range(st.batch_in_epoch, len(batches), self.n_proc):
            if st.step >= self.total_steps:
                return
            batch = batches[(g + self.rank) % len(batches)]  # the last group wraps, as samplers pad
            st.batch_in_epoch = min(g + self.n_proc, len(batches))
            groups_done = -(-st.batch_in_epoch // self.n_proc)
            steps_now = groups_done % opts.grad_accum == 0 or st.batch_in_epoch == len(batches)
            with nullcontext() if steps_now else self.acc.no_sync(self.wrapped):  # all-reduce once per step
                self._micro_batch(batch)
            if steps_now:
                self._optimizer_step(bar, tell)

    def _loss_of(self, batch: list[Clip]) -> torch.Tensor:
        labels = self.am.task.labels(self.am, [c.item for c in batch]).to(self.model.device)
        return self.wrapped(**self.am.inputs([c.audio for c in batch]), labels=labels).loss

    def _micro_batch(self, batch: list[Clip]) -> None:
        """Forward and backward of one batch, its loss counted toward the step and the epoch."""
        st = self.st
        loss = self._loss_of(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise self._non_finite(value, batch)
        self.acc.backward(loss / self.opts.grad_accum)
        self.last_good, self.last_loss = batch, value
        st.loss_sum[self.rank] += value
        st.loss_count[self.rank] += 1
        self.step_loss, self.step_batches = self.step_loss + value, self.step_batches + 1

    def _optimizer_step(self, bar: StepBar | None, tell: Callable[[str], None]) -> None:
        """Clip, step, log; checkpoint when due and act on a stop request."""
        st = self.st
        norms = self._clip_gradients()
        if not math.isfinite(norms[0]) and self.acc.scaler is None:  # fp16's scaler skips such a step
            raise MamError(f"the gradients became non-finite at step {st.step + 1} (loss {self.last_loss:g}): "
                           f"the weights diverged; lower --lr (now {self.opts.lr:g}) or add --warmup")
        lrs = [group["lr"] for group in self.optimizer.param_groups]  # what this step applies
        self.optimizer.step()
        if not self.optimizer.step_was_skipped:  # fp16: overflowed gradients skip the step
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        self._snapshot_lams()
        self._log_step(self.step_loss / self.step_batches, lrs, norms, bar)
        self.step_loss, self.step_batches = 0.0, 0
        if st.step % self.opts.checkpoint_every == 0:
            self.checkpoint()
        self._stop_if_asked(tell)

    def _end_epoch(self, tell: Callable[[str], None]) -> None:
        """The epoch's mean loss and dev error (the last epoch of a --max-steps run may be partial)."""
        acc, st, rank = self.acc, self.st, self.rank
        # every process has batches (the last group wraps round): the mean of their means
        mean_loss = acc.reduce(torch.tensor(st.loss_sum[rank] / st.loss_count[rank], device=acc.device),
                               "mean") if st.loss_count[rank] else None
        entry: dict[str, Any] = {"epoch": st.epoch + 1, "step": st.step,
                                 "train_loss": None if mean_loss is None else float(mean_loss)}
        if self.evaluator is not None and acc.is_main_process:
            scores = self.evaluator.evaluate()
            entry["dev_error"] = scores["error"]
            if st.best is None or scores["error"] < st.best:
                st.best = scores["error"]
                self.on_best()
            tell(f"epoch {st.epoch + 1}: loss {entry['train_loss']:.4f}, dev error {scores['error']:.4f}")
        st.history.append(entry)
        st.epoch += 1
        st.batch_in_epoch = 0
        st.loss_sum, st.loss_count = [0.0] * self.n_proc, [0] * self.n_proc
        self.checkpoint()
        self._stop_if_asked(tell)

    def _clip_gradients(self) -> tuple[float, float]:
        """The gradients' total norm before and after clipping (fp16: unscaled first)."""
        if self.opts.max_grad_norm:
            raw = float(self.acc.clip_grad_norm_(self.trainable, self.opts.max_grad_norm))
            return raw, _grad_norm(self.trainable)
        self.acc.unscale_gradients()
        raw = _grad_norm(self.trainable)
        return raw, raw

    def _snapshot_lams(self) -> None:
        if self.bank is not None:
            self.st.trajectory.append({"step": self.st.step, "epoch": self.st.epoch, "lams": self.bank.values()})

    def _log_step(self, loss: float, lrs: list[float], norms: tuple[float, float], bar: StepBar | None) -> None:
        """A row of metrics.jsonl (and of the tracker), then the bar or, in a log, a line every 10 steps."""
        acc, st, bank = self.acc, self.st, self.bank
        if self.n_proc > 1:  # the step is every process's micro-batches
            loss = float(acc.reduce(torch.tensor(loss, dtype=torch.float64, device=acc.device), "mean"))
        row: dict[str, Any] = {"step": st.step, "epoch": st.epoch + 1, "loss": loss, "lr": lrs[0],
                               "grad_norm": _finite(norms[0]), "grad_norm_clipped": _finite(norms[1])}
        if bank is not None:
            row.update(lam_lr=lrs[1], lams=bank.values())
        if acc.is_main_process:
            with writing(self.metrics), self.metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.opts.log_with:
            flat = {k: v for k, v in row.items() if isinstance(v, float)} | {
                f"lam/{k}": v for k, v in (row.get("lams") or {}).items()}
            acc.log(flat, step=st.step)
        if bar is not None:
            bar.update(st.step, loss, lrs[0])
        elif st.step % 10 == 0:
            lam_note = f", λ {row['lams']}" if bank is not None else ""
            self.say(f"epoch {st.epoch + 1}, step {st.step}/{self.total_steps}: loss {loss:.4f}, "
                     f"lr {lrs[0]:.3g}{lam_note}")

    def _stop_if_asked(self, tell: Callable[[str], None]) -> None:
        if self.stop.requested(self.acc):
            self.checkpoint()
            tell(f"interrupted: the run is saved in {self.work}; continue with --resume (step {self.st.step})")
            self.stop.hand_on()

    def _non_finite(self, loss: float, batch: list[Clip]) -> MamError:
        """Name the cause of a non-finite loss: diverged weights (non-finite, or the last good batch fails now:
        lower --lr), or the clips that fail alone (their audio or transcript)."""
        where, lr = f"the loss became {loss} at step {self.st.step}", self.opts.lr
        with torch.no_grad():
            diverged = any(not torch.isfinite(p).all() for p in self.model.parameters()) or (
                self.last_good is not None and not torch.isfinite(self._loss_of(self.last_good)))
            culprits = [] if diverged else [c.item.id for c in batch if not torch.isfinite(self._loss_of([c]))]
        if diverged:
            return MamError(f"{where}: the weights diverged; lower --lr (now {lr:g}) or add --warmup")
        if culprits:
            return MamError(f"{where} on clip(s) {', '.join(culprits)}, which give a non-finite loss alone: check "
                            "their audio and transcript, or leave them out")
        return MamError(f"{where}, though no clip of the batch does alone: lower --lr (now {lr:g}) or --batch-size")
