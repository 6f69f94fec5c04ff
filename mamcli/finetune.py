"""Fine-tuning: plain, MAM then fine-tune, and Learnable-MAM (per-layer λ learned with the target).

L-MAM (Eq. 3): every merged target weight is reparametrised as
``W = λ_i · W_source + (1 − λ_i) · W_target`` with ``λ_i = sigmoid(logit_i)`` (so λ stays in [0, 1]),
the source weight a frozen buffer, the target weight and the logits trainable (torch
parametrizations). At the end the merged weights are baked into an ordinary checkpoint.

Three kinds of head train here: CTC (the wav2vec2 family), sequence to sequence (Whisper: cross-entropy
on the transcript tokens after Whisper's decoder prompt) and audio classification. Only encoder
attention is ever merged; Whisper's decoder never sees a λ.

Runs are resumable: the state lives in a hidden sibling of the output, ``.DIR.mam-run/``: Accelerate's
``save_state`` folder (weights with the λ logits, optimizer, scheduler, gradient scaler, every RNG of every
process) and ``run.json`` (the position in the epoch, the epoch's loss so far), so a resumed run ends where an
uninterrupted one would. Every optimizer step appends a row to ``metrics.jsonl`` there. DIR itself is written
once, whole, at the end (with ``metrics.jsonl``): an existing DIR (``--force``) is replaced only then.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from mamcli.card import write_card
from mamcli.checkpoint import Checkpoint
from mamcli.data import Clip, Dataset, iter_clips
from mamcli.errors import Interrupted, MamError
from mamcli.evaluate import EvalOptions, Evaluator
from mamcli.families import FAMILIES, Family
from mamcli.merge import MergeOptions, MergePlan, TensorStore
from mamcli.models import (
    AudioModel,
    InMemoryMerger,
    ModelStore,
    _transformers,
    load_audio_model,
    resolve_device,
    stored_dtype,
)
from mamcli.report import peak_rss_mib, versions, write_json
from mamcli.tasks import Task, TaskOptions, make
from mamcli.writer import REPORT_FILE, atomic_output_dir, check_output_dir, hash_tree, output_lock

RUN_FILE = "run.json"  # the run's position; names the save_state folder it goes with (written last: the commit)
METRICS_FILE = "metrics.jsonl"  # one JSON object per optimizer step, copied into the output
TENSORBOARD_DIR = "tensorboard"  # --log-with tensorboard: event files, copied into the output
RUN_FILES = frozenset({RUN_FILE, f"{RUN_FILE}.tmp", "best.pt", "best.pt.tmp", METRICS_FILE, f"{METRICS_FILE}.tmp",
                       TENSORBOARD_DIR})  # all a run folder ever holds, besides the state folders
STATE_DIR = re.compile(r"state-\d+")  # Accelerate's save_state folders, numbered by save
MIXED_PRECISION = ("no", "fp16", "bf16")  # Accelerate's
TRACKERS = {"tensorboard": ("torch.utils.tensorboard", "tensorboardX")}  # --log-with → modules, any one will do
# convolutional front ends of models that lack transformers' freeze_feature_encoder(), below the arch prefix
FRONT_ENDS: dict[str, tuple[str, ...]] = {"whisper": ("encoder.conv1", "encoder.conv2")}
SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # deferred to the end of the optimizer step while training
RESUME_MAY_CHANGE = ("max_steps", "checkpoint_every", "device", "log_with")  # the others must match on --resume


def _not_tied_weights_note(record: logging.LogRecord) -> bool:
    """Whisper ties proj_out to the decoder's embed_tokens: Accelerate's save_state drops the duplicate and warns
    "check that you don't receive any warning while reloading" at every checkpoint. mam has checked: load_state
    restores it through the tie, and a resumed run equals a straight one (tests/test_finetune_whisper.py)."""
    return "Removed shared tensor" not in record.getMessage()  # after Accelerate's "[RANK 0] "


logging.getLogger("accelerate.utils.other").addFilter(_not_tied_weights_note)


@dataclass
class FinetuneOptions:
    task: str = "asr"
    lam_init: float | None = None  # with a source: MAM (fixed) or the initial λ of L-MAM
    learnable_lam: bool = False
    layers: str | None = None
    layer_map: str | None = None  # source layer per target layer, as for merge (sources of another depth)
    per_part: bool = False
    parts: tuple[str, ...] = ("q", "k", "v")
    epochs: int = 1
    lr: float = 1e-5
    lam_lr: float = 1e-2
    batch_size: int = 8
    grad_accum: int = 1
    warmup: int = 0
    weight_decay: float = 0.01
    freeze_feature_encoder: bool = False  # the convolutional front end (wav2vec2 family, Whisper's conv1/conv2)
    freeze_decoder: bool = False  # sequence-to-sequence models (Whisper): train the encoder only
    language: str | None = None  # Whisper: the transcripts' language (multilingual checkpoints only)
    beams: int = 1  # Whisper: beam search width of the dev decoding
    seed: int = 0
    max_steps: int | None = None  # stop (and checkpoint) after this many optimizer steps
    checkpoint_every: int = 50
    device: str = "cpu"
    normalizer: str = "auto"  # the task's default: whisper for Whisper, basic for CTC (shapes CTC's targets too)
    max_grad_norm: float | None = 1.0  # clip the gradients' total norm to this (0 or None: no clipping)
    mixed_precision: str = "no"  # Accelerate's: no, fp16 (a GPU only), bf16
    log_with: str | None = None  # "tensorboard": Accelerate's tracker, beside the run and then in DIR

    def __post_init__(self) -> None:
        """Bad numbers are one line however the options were built (the CLI bounds them as well)."""
        if self.task not in ("asr", "aec"):
            raise MamError(f"--task must be asr or aec; got {self.task!r}")
        for flag, rate in (("--lr", self.lr), ("--lam-lr", self.lam_lr)):
            if not (math.isfinite(rate) and rate > 0):
                raise MamError(f"{flag} must be a finite number above 0; got {rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise MamError(f"weight decay must be a finite number, 0 or more; got {self.weight_decay}")
        counts = (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum),
                  ("--max-steps", self.max_steps), ("--checkpoint-every", self.checkpoint_every))
        for flag, n in counts:
            if n is not None and n < 1:
                raise MamError(f"{flag} must be at least 1; got {n}")
        if self.warmup < 0:
            raise MamError(f"--warmup must be 0 or more; got {self.warmup}")
        if self.lam_init is not None and not (math.isfinite(self.lam_init) and 0 <= self.lam_init <= 1):
            raise MamError(f"--lam-init must lie in [0, 1]; got {self.lam_init}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise MamError(f"--max-grad-norm must be a finite number, 0 or more (0: no clipping); "
                           f"got {self.max_grad_norm}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise MamError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}; "
                           f"got {self.mixed_precision!r}")
        if self.log_with is not None and self.log_with not in TRACKERS:
            raise MamError(f"--log-with must be one of {', '.join(TRACKERS)}; got {self.log_with!r}")


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


def _unlearnable(am: AudioModel, clip: Clip) -> str | None:
    """Why the head cannot learn from this clip (None: it can). Such a clip gives an infinite or undefined loss,
    which would otherwise surface later as a "non-finite loss" with the wrong advice."""
    if not np.isfinite(clip.audio).all():
        return "its audio holds NaN or infinite samples"
    task = am.task
    assert task is not None
    if task.kind == "classify":
        return None
    ids = task.labels(am, [clip.item])[0]
    ids = ids[ids != -100]
    if task.kind == "seq2seq":
        longest = int(am.model.config.max_target_positions)
        return f"its transcript is {len(ids)} tokens; the decoder takes at most {longest}" if len(ids) > longest \
            else None
    need = len(ids) + int((ids[1:] == ids[:-1]).sum())  # CTC puts a blank between repeated labels
    frames = am.output_frames(torch.tensor([len(clip.audio)]))
    if frames is not None and int(frames[0]) < need:
        return f"its transcript needs {need} CTC frames; its audio gives {int(frames[0])}"
    return None


def load_for_training(target: Checkpoint, task: Task, ds: Dataset, device: str) -> AudioModel:
    """The target with its processor; for audio events a classifier sized to the dataset's labels (from a
    Whisper speech-recognition folder: its encoder under a new head, which transformers loads from the
    folder's ``model.encoder.*``)."""
    labels = ds.all_labels
    fp32 = torch.float32  # trained in float32 everywhere: a half-precision checkpoint would train in fp16 on a GPU
    if task.kind != "classify":
        return load_audio_model(target, task, device, dtype=fp32)
    if target.fmt != "beats":  # transformers builds the new head while loading: the model is read once
        saved = sorted(str(v) for v in (target.config.get("id2label") or {}).values())
        return load_audio_model(target, task, device, labels=None if saved == sorted(labels) else labels, dtype=fp32)
    am = load_audio_model(target, "encode", device, dtype=fp32)  # a BEATs encoder may have no head yet: bind after
    if sorted(str(v) for v in (am.model.config.id2label or {}).values()) != sorted(labels):
        from mamcli.beats import new_head

        new_head(am.model, labels)
    am.task = task
    task.bind(am)
    return am


def _freeze(am: AudioModel, store: ModelStore, opts: FinetuneOptions, spec: str) -> None:
    model = am.model
    if opts.freeze_feature_encoder:
        if hasattr(model, "freeze_feature_encoder"):
            model.freeze_feature_encoder()
        elif model.config.model_type in FRONT_ENDS:
            for name in FRONT_ENDS[model.config.model_type]:
                model.get_submodule(store.arch().prefix + name).requires_grad_(False)
        else:
            raise MamError(f"--freeze-feature-encoder: {spec} has no convolutional front end that mam knows")
    if opts.freeze_decoder:
        if am.task is None or am.task.kind != "seq2seq":
            raise MamError(f"--freeze-decoder: {spec} has no decoder (only sequence-to-sequence models do)")
        model.get_decoder().requires_grad_(False)


@dataclass
class RunState:
    epoch: int = 0
    step: int = 0  # optimizer steps done
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    best: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    processes: int = 1
    options: dict[str, Any] = field(default_factory=dict)  # what a resume must match (not RESUME_MAY_CHANGE)
    loss_sum: list[float] = field(default_factory=list)  # per process: the current epoch's loss so far
    loss_count: list[int] = field(default_factory=list)
    saves: int = 0  # checkpoints written; the latest lives in state-<saves>/


def run_dir(out: Path) -> Path:
    """Where a run keeps its resumable state: a hidden sibling of ``out`` (found again by --resume)."""
    name = out.name if len(out.name.encode()) <= 240 else out.name.encode()[:240].decode(errors="ignore")  # ≤ 255 B
    return out.with_name(f".{name}.mam-run")


def _ours(path: Path) -> bool:
    """Whether a run folder's entry is one that mam writes there."""
    return path.name in RUN_FILES or (STATE_DIR.fullmatch(path.name) is not None and path.is_dir())


def _read_run(work: Path) -> RunState:
    try:
        return RunState(**json.loads((work / RUN_FILE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise MamError(f"cannot resume: {work / RUN_FILE} is unreadable ({type(e).__name__})") from None


def _write_run(work: Path, st: RunState) -> None:
    """The commit point of a checkpoint: until it is replaced, the previous state folder stays the one resumed."""
    tmp = work / f"{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(asdict(st)))
    tmp.replace(work / RUN_FILE)


def _load_state(acc: Any, folder: Path) -> None:
    """Accelerate's ``load_state``: weights from safetensors, the rest through ``torch.load(weights_only=True)``
    (mam registers no custom objects, the one thing Accelerate unpickles freely). A file that is not plain
    tensors and numbers is refused, not run. Accelerate only logs an RNG state it cannot restore; a resume
    that is not bit-identical is an error here."""
    from accelerate.utils import load

    try:
        acc.load_state(str(folder))
        saved = load(folder / f"random_states_{acc.process_index}.pkl")
    except Exception as e:  # whatever the files hold, the answer is one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MamError(f"cannot resume from {folder}: {first}") from None
    restored = torch.equal(saved["torch_manual_seed"], torch.get_rng_state())
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in saved:  # one state per GPU, as many GPUs
        cuda, now = saved["torch_cuda_manual_seed"], torch.cuda.get_rng_state_all()
        restored &= len(cuda) == len(now) and all(torch.equal(a, b) for a, b in zip(cuda, now, strict=True))
    if not restored:
        raise MamError(f"cannot resume from {folder}: its random state was not restored")


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the rows up to the saved step: the steps after it are run again on --resume (and logged again)."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # the half-written last line of a killed run
            continue
        if row.get("step", math.inf) <= step:
            rows.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(rows))
    tmp.replace(path)


def _tracker_missing(name: str) -> str | None:
    """The package an Accelerate tracker needs when none of its modules imports (Accelerate would drop the
    tracker silently); None when one does."""
    for module in TRACKERS[name]:
        try:
            importlib.import_module(module)
            return None
        except ImportError:
            continue
    return name


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


class _StepBar:
    """A rich bar over the optimizer steps with the last step's loss and learning rate, on a terminal's stderr.
    Lines said meanwhile go out with the bar lifted, so that neither is cut."""

    def __init__(self, console: Any, total: int, done: int, say: Callable[[str], None]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}"), TimeRemainingColumn(),
                                 console=console, transient=True)
        self.task = self.progress.add_task("training", total=total, completed=done, loss="-", lr="-")
        self.lines = say

    def update(self, step: int, loss: float, lr: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.3g}", refresh=True)

    def say(self, msg: str) -> None:
        self.progress.stop()
        self.lines(msg)
        self.progress.start()


@contextmanager
def _step_bar(show: bool, total: int, done: int, say: Callable[[str], None]) -> Iterator[_StepBar | None]:
    """The bar on a terminal; None elsewhere (a log gets a line every 10 steps instead)."""
    console = _stderr_console() if show else None
    if console is None or not console.is_terminal:
        yield None
        return
    bar = _StepBar(console, total, done, say)
    with bar.progress:
        yield bar


class _StopRequests:
    """Ctrl-C, SIGTERM and SIGHUP while training are noted and acted on at the end of the optimizer step,
    where the saved state is whole; then the signal is handed on as it came (to the handler before this
    one: ``mam``'s raises :class:`Interrupted`, exit 128 + N; Python's default raises KeyboardInterrupt).
    A second signal is handed on at once; the last checkpoint stays."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is threading.main_thread():
            for num in (getattr(signal, n) for n in SIGNALS if hasattr(signal, n)):
                if signal.getsignal(num) not in (signal.SIG_IGN, None):
                    self.previous[num] = signal.signal(num, self._note)
        try:
            yield
        finally:
            self._restore()

    def _restore(self) -> None:
        for num, handler in self.previous.items():
            signal.signal(num, handler)
        self.previous = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self.hand_on(signum, frame)
        self.signum = signum
        self.say(f"{signal.Signals(signum).name}: saving the run at the end of this step (again to stop at once)")

    def requested(self, acc: Any) -> bool:
        """Whether any process was signalled (all processes must stop at the same step)."""
        if acc.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor(float(self.signum is not None), device=acc.device)
        return bool(acc.reduce(flag, "sum") > 0)

    def hand_on(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        """Deliver the signal to the handler it would have reached; raise :class:`Interrupted` if that one did not."""
        num = signum or self.signum or signal.SIGTERM  # another process was signalled: stop like it
        handler = self.previous.get(num)
        self._restore()
        if callable(handler):
            handler(num, frame)
        raise Interrupted(num)


def finetune(target: Checkpoint, train: Dataset, dev: Dataset | None, opts: FinetuneOptions, out: Path,
             source: Checkpoint | None = None, *, resume: bool = False, force: bool = False,
             families: tuple[Family, ...] = FAMILIES, progress: Callable[[str], None] | None = None,
             command: str | None = None) -> dict[str, Any]:
    """Train, evaluate on dev after each epoch, keep the best, and write a loadable checkpoint to ``out``
    with a model card (README.md) naming ``command``.

    ``force`` replaces an earlier mam output (never an input or a folder mam did not write), and only
    once the new output is complete; ``resume`` continues the run kept beside ``out``."""
    started = time.perf_counter()
    if opts.learnable_lam and source is None:
        raise MamError("--learnable-lam needs --source")
    if opts.lam_init is not None and source is None:
        raise MamError("--lam-init needs --source (the model whose attention is merged in)")
    if source is not None and opts.lam_init is None:
        raise MamError("with --source give --lam-init (the fixed λ of MAM, or L-MAM's starting λ)")
    task = make(opts.task, target.config, TaskOptions(beams=opts.beams, language=opts.language,
                                                      normalizer=opts.normalizer), spec=target.spec)
    out = out.expanduser().absolute()
    work = run_dir(out)
    inputs = [target.root, *([source.root] if source else []), train.root, *([dev.root] if dev else [])]
    # every process checks before any process changes anything; only the main process changes files
    missing = _tracker_missing(opts.log_with) if opts.log_with else None
    if missing:
        raise MamError(f"--log-with {opts.log_with} needs the {missing} package (pip install {missing})")
    acc = _accelerator(opts, work)
    if opts.mixed_precision == "fp16" and acc.device.type == "cpu":  # Accelerate would train in float32 unasked
        raise MamError("--mixed-precision fp16 needs a GPU and this run trains on the CPU; use bf16 or no")
    say = progress if progress is not None and acc.is_main_process else _quiet  # one voice on stderr
    if resume and not (work / RUN_FILE).is_file():
        raise MamError(f"nothing to resume for {out}: no saved run in {work}")
    if not resume and work.exists():
        if not force:
            raise MamError(f"an unfinished run for {out} is kept in {work}: pass --resume to continue it or "
                           "--force to start over")
        if not work.is_dir() or not all(_ours(p) for p in work.iterdir()):
            raise MamError(f"{work} holds files mam did not write; remove it yourself")
    replace = force or resume  # a resumed run was allowed to replace DIR when it started
    check_output_dir(out, replace, inputs)
    with output_lock(out) if acc.is_main_process else nullcontext():
        acc.wait_for_everyone()
        created = False
        if acc.is_main_process:
            if not resume and work.exists():
                shutil.rmtree(work)  # --force: the unfinished run is dropped (its folder holds only RUN_FILES)
            created = not work.exists()
            try:
                work.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise MamError(f"cannot create {work}: {e.strerror}") from None
        acc.wait_for_everyone()
        try:
            return _run(target, task, train, dev, opts, out, work, source, resume, replace, inputs, families,
                        say, progress is not None and acc.is_main_process, started, acc, command)
        except BaseException:
            if created and acc.is_main_process and not (work / RUN_FILE).is_file():
                shutil.rmtree(work, ignore_errors=True)  # failed before any progress: leave nothing
            raise


def _quiet(_msg: str) -> None:
    """Progress sink without a progress callback, and for the other processes of a launched run."""


def _read_clips(train: Dataset, am: AudioModel, bad: list[dict[str, str]]) -> list[Clip]:
    """Training clips; unreadable ones, those the model's front end cannot take (too short, too long) and those
    the head cannot learn from are named in ``bad`` and skipped, as evaluate and rank-layers skip them."""
    clips = []
    for clip in iter_clips(train, am.rate, False, bad, usable=am.usable):
        why = _unlearnable(am, clip)
        if why is None:
            clips.append(clip)
        else:
            bad.append({"id": clip.item.id, "path": str(clip.item.path), "error": f"{clip.item.path}: {why}"})
    return sorted(clips, key=lambda c: c.item.id)


def _non_finite(loss: float, step: int, batch: list[Clip], last_good: list[Clip] | None, model: nn.Module,
                loss_of: Callable[[list[Clip]], torch.Tensor], lr: float) -> MamError:
    """Name the cause of a non-finite loss: diverged weights (non-finite, or the last good batch fails now:
    lower --lr), or the clips that fail alone (their audio or transcript)."""
    where = f"the loss became {loss} at step {step}"
    with torch.no_grad():
        diverged = any(not torch.isfinite(p).all() for p in model.parameters()) or (
            last_good is not None and not torch.isfinite(loss_of(last_good)))
        culprits = [] if diverged else [c.item.id for c in batch if not torch.isfinite(loss_of([c]))]
    if diverged:
        return MamError(f"{where}: the weights diverged; lower --lr (now {lr:g}) or add --warmup")
    if culprits:
        return MamError(f"{where} on clip(s) {', '.join(culprits)}, which give a non-finite loss alone: check their "
                        "audio and transcript, or leave them out")
    return MamError(f"{where}, though no clip of the batch does alone: lower --lr (now {lr:g}) or --batch-size")


def _grad_norm(params: list[nn.Parameter]) -> float:
    """The total 2-norm of the gradients the optimizer is about to apply."""
    return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def _finite(x: float) -> float | None:
    """A number for JSON: an overflowed fp16 gradient (a skipped step) is null, not ``Infinity``."""
    return x if math.isfinite(x) else None


def _run(target: Checkpoint, task: Task, train: Dataset, dev: Dataset | None, opts: FinetuneOptions, out: Path,
         work: Path, source: Checkpoint | None, resume: bool, replace: bool, inputs: list[Path],
         families: tuple[Family, ...], say: Callable[[str], None], show_bar: bool, started: float, acc: Any,
         command: str | None) -> dict[str, Any]:

    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed)  # transformers' SpecAugment time masks use numpy's global RNG
    am = load_for_training(target, task, train, opts.device)
    task.check(train)
    model = am.model
    store = ModelStore(model, target.spec, round_to=stored_dtype(target))  # MAM's start equals `mam merge`'s
    _freeze(am, store, opts, target.spec)
    plan = None
    bank: LamBank | None = None
    if source is not None:
        assert opts.lam_init is not None
        merger = InMemoryMerger(store, families)
        plan = merger.plan(source, MergeOptions(lam=opts.lam_init, layers=opts.layers, parts=opts.parts,
                                                layer_map=opts.layer_map))
        if opts.learnable_lam:
            bank = attach_learnable(model, plan, source, opts.lam_init, opts.per_part)
        else:  # MAM, then plain fine-tuning: the merged weights are the starting point
            merger.apply(source, plan)
    bad: list[dict[str, str]] = []
    say(f"reading {len(train.items)} training clips")
    clips = _read_clips(train, am, bad)
    if not clips:
        raise MamError(f"no usable training clip in {train.spec!r}" + (f" (first problem: {bad[0]['error']})"
                                                                      if bad else ""))

    lam_params = {id(bank.logits)} if bank is not None else set()
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in lam_params]
    trainable = params + ([bank.logits] if bank is not None else [])  # what the gradient norm covers
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
    # counted in real optimizer steps (the Accelerator steps it once per call, not once per process)
    scheduler = tf.get_linear_schedule_with_warmup(optimizer, opts.warmup, max(total_steps, 1))
    wrapped, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    recipe = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts).items() if k not in RESUME_MAY_CHANGE}
    st = RunState(processes=n_proc, options=recipe, loss_sum=[0.0] * n_proc, loss_count=[0] * n_proc)
    metrics = work / METRICS_FILE
    if resume:
        st = _read_run(work)
        if st.processes != n_proc:
            raise MamError(f"the run in {work} was started with {st.processes} process(es); resume it with as many")
        changed = [k for k in recipe if st.options.get(k) != recipe[k]]
        if changed:
            raise MamError(f"--resume with other options than the run started with ({', '.join(changed)}); "
                           "give the same ones, or --force to start over")
        _load_state(acc, work / f"state-{st.saves}")
        if acc.is_main_process:
            _trim_metrics(metrics, st.step)
            for stray in work.glob("state-*"):  # a checkpoint cut short before its run.json was written
                if stray.name != f"state-{st.saves}":
                    shutil.rmtree(stray, ignore_errors=True)
        acc.wait_for_everyone()
        say(f"resuming at epoch {st.epoch + 1}, step {st.step}")
    saved_at = (st.epoch, st.step, st.batch_in_epoch) if resume else None
    dev_opts = EvalOptions(task=opts.task, normalizer=opts.normalizer, beams=opts.beams, language=opts.language)
    evaluator = Evaluator(target, dev, dev_opts, am=am) if dev is not None else None
    if opts.log_with:  # a resumed run hides the events its replayed steps logged before
        acc.init_trackers(TENSORBOARD_DIR, init_kwargs={opts.log_with: {"purge_step": st.step + 1}})

    def checkpoint() -> None:
        """Accelerate's save_state into a new folder, then run.json naming it: a crash mid-save resumes the last."""
        nonlocal saved_at
        if saved_at == (st.epoch, st.step, st.batch_in_epoch):  # nothing new since the last save
            return
        if n_proc > 1:  # every process's share of the epoch's loss goes into the one saved state
            mine = torch.tensor([st.loss_sum[rank], st.loss_count[rank]], dtype=torch.float64, device=acc.device)
            every = acc.gather(mine).view(n_proc, 2).cpu()
            st.loss_sum, st.loss_count = every[:, 0].tolist(), [int(n) for n in every[:, 1].tolist()]
        st.saves += 1
        folder = work / f"state-{st.saves}"
        acc.save_state(str(folder))  # every process its RNG states, the main process the rest
        acc.wait_for_everyone()
        if acc.is_main_process:
            _write_run(work, st)
            for old in work.glob("state-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        saved_at = (st.epoch, st.step, st.batch_in_epoch)

    def snapshot_lams() -> None:
        if bank is not None:
            st.trajectory.append({"step": st.step, "epoch": st.epoch, "lams": bank.values()})

    def loss_of(batch: list[Clip]) -> torch.Tensor:
        labels = task.labels(am, [c.item for c in batch]).to(model.device)
        return wrapped(**am.inputs([c.audio for c in batch]), labels=labels).loss

    def clip_gradients() -> tuple[float, float]:
        """The gradients' total norm before and after clipping (fp16: unscaled first)."""
        if opts.max_grad_norm:
            raw = float(acc.clip_grad_norm_(trainable, opts.max_grad_norm))
            return raw, _grad_norm(trainable)
        acc.unscale_gradients()
        raw = _grad_norm(trainable)
        return raw, raw

    def log_step(loss: float, lrs: list[float], norms: tuple[float, float], bar: _StepBar | None) -> None:
        """A row of metrics.jsonl (and of the tracker), then the bar or, in a log, a line every 10 steps."""
        if n_proc > 1:  # the step is every process's micro-batches
            loss = float(acc.reduce(torch.tensor(loss, dtype=torch.float64, device=acc.device), "mean"))
        row: dict[str, Any] = {"step": st.step, "epoch": st.epoch + 1, "loss": loss, "lr": lrs[0],
                               "grad_norm": _finite(norms[0]), "grad_norm_clipped": _finite(norms[1])}
        if bank is not None:
            row.update(lam_lr=lrs[1], lams=bank.values())
        if acc.is_main_process:
            with metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if opts.log_with:
            flat = {k: v for k, v in row.items() if isinstance(v, float)} | {
                f"lam/{k}": v for k, v in (row.get("lams") or {}).items()}
            acc.log(flat, step=st.step)
        if bar is not None:
            bar.update(st.step, loss, lrs[0])
        elif st.step % 10 == 0:
            lam_note = f", λ {row['lams']}" if bank is not None else ""
            say(f"epoch {st.epoch + 1}, step {st.step}/{total_steps}: loss {loss:.4f}, lr {lrs[0]:.3g}{lam_note}")

    stop = _StopRequests(say)

    def stop_if_asked(tell: Callable[[str], None]) -> None:
        if stop.requested(acc):
            checkpoint()
            tell(f"interrupted: the run is saved in {work}; continue with --resume (step {st.step})")
            stop.hand_on()

    if bank is not None and not st.trajectory:
        snapshot_lams()
    model.train()
    stopped = False
    last_good: list[Clip] | None = None
    step_loss, step_batches = 0.0, 0
    say(f"training on {len(clips)} clips: {total_steps} optimizer steps")
    try:
        with stop.installed(), _step_bar(show_bar, total_steps, st.step, say) as bar:
            tell = say if bar is None else bar.say
            while st.epoch < opts.epochs and not stopped:
                order = torch.randperm(len(clips),
                                       generator=torch.Generator().manual_seed(opts.seed + st.epoch)).tolist()
                epoch_batches = [[clips[k] for k in order[s:s + opts.batch_size]]
                                 for s in range(0, len(order), opts.batch_size)]
                for g in range(st.batch_in_epoch, len(epoch_batches), n_proc):
                    batch = epoch_batches[(g + rank) % len(epoch_batches)]  # the last group wraps, as samplers pad
                    st.batch_in_epoch = min(g + n_proc, len(epoch_batches))
                    groups_done = -(-st.batch_in_epoch // n_proc)
                    steps_now = groups_done % opts.grad_accum == 0 or st.batch_in_epoch == len(epoch_batches)
                    with nullcontext() if steps_now else acc.no_sync(wrapped):  # all-reduce once per step
                        loss = loss_of(batch)
                        value = float(loss.detach())
                        if not math.isfinite(value):
                            raise _non_finite(value, st.step, batch, last_good, model, loss_of, opts.lr)
                        acc.backward(loss / opts.grad_accum)
                    last_good = batch
                    st.loss_sum[rank] += value
                    st.loss_count[rank] += 1
                    step_loss, step_batches = step_loss + value, step_batches + 1
                    if steps_now:
                        norms = clip_gradients()
                        if not math.isfinite(norms[0]) and acc.scaler is None:  # fp16's scaler skips such a step
                            raise MamError(f"the gradients became non-finite at step {st.step + 1} (loss {value:g}): "
                                           f"the weights diverged; lower --lr (now {opts.lr:g}) or add --warmup")
                        lrs = [group["lr"] for group in optimizer.param_groups]  # what this step applies
                        optimizer.step()
                        if not optimizer.step_was_skipped:  # fp16: overflowed gradients skip the step
                            scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        st.step += 1
                        snapshot_lams()
                        log_step(step_loss / step_batches, lrs, norms, bar)
                        step_loss, step_batches = 0.0, 0
                        if st.step % opts.checkpoint_every == 0:
                            checkpoint()
                        stop_if_asked(tell)
                        if opts.max_steps is not None and st.step >= opts.max_steps:
                            stopped = True
                            break
                if stopped and st.batch_in_epoch < len(epoch_batches):
                    break
                # every process has batches (the last group wraps round): the mean of their means
                mean_loss = acc.reduce(torch.tensor(st.loss_sum[rank] / st.loss_count[rank], device=acc.device),
                                       "mean") if st.loss_count[rank] else None
                entry: dict[str, Any] = {"epoch": st.epoch + 1, "step": st.step,
                                         "train_loss": None if mean_loss is None else float(mean_loss)}
                if evaluator is not None and acc.is_main_process:
                    scores = evaluator.evaluate()
                    entry["dev_error"] = scores["error"]
                    if st.best is None or scores["error"] < st.best:
                        st.best = scores["error"]
                        _save_best(work, model, bank, plan, store)
                    tell(f"epoch {st.epoch + 1}: loss {entry['train_loss']:.4f}, dev error {scores['error']:.4f}")
                st.history.append(entry)
                st.epoch += 1
                st.batch_in_epoch = 0
                st.loss_sum, st.loss_count = [0.0] * n_proc, [0] * n_proc
                checkpoint()
                stop_if_asked(tell)
        checkpoint()
    finally:
        for tracker in acc.trackers:  # not end_training(): that also ends the process group, still needed
            tracker.finish()
    status = "stopped" if stopped and st.epoch < opts.epochs else "done"
    if not acc.is_main_process:  # the main process writes the output and the report
        return {"command": "finetune", "status": status, "process": rank}
    if status == "stopped":
        return {"command": "finetune", "status": status, "step": st.step, "epoch": st.epoch, "resume": str(out),
                "state": str(work), "metrics": str(metrics)}
    if evaluator is None or not (work / "best.pt").is_file():
        _save_best(work, model, bank, plan, store)
    best = torch.load(work / "best.pt", weights_only=True)
    report = {
        "command": "finetune", "status": "done",
        "inputs": {"target": target.describe(), "source": source.describe() if source else None,
                   "train": train.describe(), "dev": dev.describe() if dev else None},
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "mode": "l-mam" if bank is not None else ("mam+finetune" if source is not None else "finetune"),
        "task": task.describe(), "epochs": st.history, "best_dev_error": st.best, "steps": st.step,
        "bad_clips": bad, "versions": versions(), "wall_time_s": round(time.perf_counter() - started, 3),
        "peak_rss_mib": peak_rss_mib(),
    }
    lams = json.loads(best["lams_json"]) if best.get("lams_json") else None
    _write_output(out, replace, inputs, target, am, best["state"], report, lams, st.trajectory, command,
                  [metrics, work / TENSORBOARD_DIR])
    shutil.rmtree(work, ignore_errors=True)
    report["output_dir"] = str(out)
    return report


def _accelerator(opts: FinetuneOptions, work: Path) -> Any:
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


def _save_best(work: Path, model: nn.Module, bank: LamBank | None, plan: MergePlan | None,
               store: ModelStore) -> None:
    lams = None
    if bank is not None and plan is not None:
        lams = json.dumps({"lams": lam_table(bank, plan, store.arch().num_layers), "per_layer": bank.values()})
    tmp = work / "best.pt.tmp"
    torch.save({"state": baked_state_dict(model), "lams_json": lams or ""}, tmp)
    tmp.replace(work / "best.pt")


def _write_output(out: Path, replace: bool, inputs: list[Path], target: Checkpoint, am: AudioModel,
                  state: dict[str, torch.Tensor], report: dict[str, Any], lams: dict[str, Any] | None,
                  trajectory: list[dict[str, Any]], command: str | None, logs: list[Path]) -> None:
    """The final, ordinary checkpoint, written beside ``out`` and renamed into place once complete, with the
    run's ``logs`` (metrics.jsonl, tracker folders) so the hashes `mam verify` checks cover them."""
    with atomic_output_dir(out, force=replace, inputs=inputs, lock=False) as tmp:
        for log in logs:
            if log.is_dir():
                shutil.copytree(log, tmp / log.name)
            elif log.is_file():
                shutil.copy2(log, tmp / log.name)
        if target.fmt == "beats":  # the official layout, and a safetensors copy
            from safetensors.torch import save_file

            from mamcli.beats import save_checkpoint

            save_checkpoint(tmp / target.files[0].name, am.model, state, target.extras)
            save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
        else:
            clean_model = type(am.model)(am.model.config)  # no parametrizations: an ordinary model
            clean_model.load_state_dict(state)
            if clean_model.can_generate():  # Whisper: the checkpoint's decoding settings, not the defaults
                clean_model.generation_config = copy.deepcopy(am.model.generation_config)
            clean_model.save_pretrained(tmp)
            am.features.save_pretrained(tmp)
            if am.tokenizer is not None:
                am.tokenizer.save_pretrained(tmp)
        if lams is not None:
            write_json(tmp / "lams.json", {**lams, "trajectory": trajectory})
        write_card(tmp, report, command)
        report["outputs"] = {"hashes": hash_tree(tmp)}  # what `mam verify` checks
        write_json(tmp / REPORT_FILE, report)
