"""Fine-tuning: plain, MAM then fine-tune, and Learnable-MAM (per-layer λ learned with the target).

Three kinds of head train here: CTC (the wav2vec2 family), sequence to sequence (Whisper: cross-entropy
on the transcript tokens after Whisper's decoder prompt) and audio classification; what differs between
them is the task object's (``mamcli.tasks``: targets, clips it cannot learn from, a new classifier head,
what may be frozen). Only encoder attention is ever merged; Whisper's decoder never sees a λ.

The package, by concern: ``options`` (what a run is asked), ``lam`` (L-MAM's λ bank, Eq. 3), ``loop``
(accumulation, schedule, checkpoints and resume, logging, stop requests), ``state`` (the resumable run
folder ``.DIR.mam-run/``), ``progress`` and ``stop`` (stderr and signals), ``output`` (DIR, written once,
whole, at the end, with ``metrics.jsonl``: an existing DIR (``--force``) is replaced only then). This
module wires them: check, prepare the model, train, report.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamcli.align import ALIGN_FILE, ActivationStats, collect_activations
from mamcli.checkpoint import Checkpoint
from mamcli.data import Clip, Dataset, iter_clips
from mamcli.errors import MamError
from mamcli.evaluate import EvalOptions, Evaluator
from mamcli.families import FAMILIES, Family
from mamcli.finetune.lam import LAM_MODULE, LamBank, LamMerge, attach_learnable, baked_state_dict, lam_table
from mamcli.finetune.loop import TrainingLoop, make_accelerator, tracker_missing
from mamcli.finetune.options import MIXED_PRECISION, RESUME_MAY_CHANGE, TRACKERS, FinetuneOptions
from mamcli.finetune.output import BEST_FILE, WriteError, save_best, write_output, writing
from mamcli.finetune.progress import quiet
from mamcli.finetune.state import METRICS_FILE, RUN_FILE, TENSORBOARD_DIR, RunState, ours, run_dir
from mamcli.merge import MergeOptions, MergePlan, plan_merge, solve_alignment
from mamcli.models import AudioModel, InMemoryMerger, ModelStore, stored_dtype
from mamcli.report import peak_rss_mib, versions
from mamcli.tasks import Task, TaskOptions, make
from mamcli.writer import check_output_dir, output_lock

__all__ = [
    "LAM_MODULE",
    "METRICS_FILE",
    "MIXED_PRECISION",
    "RESUME_MAY_CHANGE",
    "RUN_FILE",
    "TENSORBOARD_DIR",
    "TRACKERS",
    "FinetuneOptions",
    "LamBank",
    "LamMerge",
    "RunState",
    "TrainingLoop",
    "WriteError",
    "attach_learnable",
    "baked_state_dict",
    "finetune",
    "lam_table",
    "run_dir",
]


def _check_sources(opts: FinetuneOptions, source: Checkpoint | None) -> None:
    if opts.learnable_lam and source is None:
        raise MamError("--learnable-lam needs --source")
    if opts.lam_init is not None and source is None:
        raise MamError("--lam-init needs --source (the model whose attention is merged in)")
    if source is not None and opts.lam_init is None:
        raise MamError("with --source give --lam-init (the fixed λ of MAM, or L-MAM's starting λ)")
    if opts.align != "none" and source is None:
        raise MamError("--align needs --source (the model it re-indexes to match the target)")


def _check_run_folder(work: Path, out: Path, resume: bool, force: bool) -> None:
    if resume and not (work / RUN_FILE).is_file():
        raise MamError(f"nothing to resume for {out}: no saved run in {work}")
    if not resume and work.exists():
        if not force:
            raise MamError(f"an unfinished run for {out} is kept in {work}: pass --resume to continue it or "
                           "--force to start over")
        if not work.is_dir() or not all(ours(p) for p in work.iterdir()):
            raise MamError(f"{work} holds files mam did not write; remove it yourself")


def _open_run_folder(work: Path, resume: bool) -> bool:
    """Make the run folder (dropping an unfinished run's on --force); whether this run created it."""
    if not resume and work.exists():
        shutil.rmtree(work)  # --force: the unfinished run is dropped (its folder holds only RUN_FILES)
    created = not work.exists()
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MamError(f"cannot create {work}: {e.strerror}") from None
    return created


def finetune(target: Checkpoint, train: Dataset, dev: Dataset | None, opts: FinetuneOptions, out: Path,
             source: Checkpoint | None = None, *, resume: bool = False, force: bool = False,
             families: tuple[Family, ...] = FAMILIES, progress: Callable[[str], None] | None = None,
             command: str | None = None) -> dict[str, Any]:
    """Train, evaluate on dev after each epoch, keep the best, and write a loadable checkpoint to ``out``
    with a model card (README.md) naming ``command``. ``opts.task`` "auto": the head the target was saved
    with; ``opts.lr`` None: that task's ``default_lr``.

    ``force`` replaces an earlier mam output (never an input or a folder mam did not write), and only
    once the new output is complete; ``resume`` continues the run kept beside ``out``. A write the machine
    refuses (a full disk) leaves nothing this call made."""
    started = time.perf_counter()
    _check_sources(opts, source)
    task = make(opts.task, target.config, TaskOptions(beams=opts.beams, language=opts.language,
                                                      normalizer=opts.normalizer), spec=target.spec)
    opts = replace(opts, task=task.name, lr=task.default_lr if opts.lr is None else opts.lr)
    out = out.expanduser().absolute()
    work = run_dir(out)
    inputs = [target.root, *([source.root] if source else []), train.root, *([dev.root] if dev else [])]
    # every process checks before any process changes anything; only the main process changes files
    missing = tracker_missing(opts.log_with) if opts.log_with else None
    if missing:
        raise MamError(f"--log-with {opts.log_with} needs the {missing} package (pip install {missing})")
    acc = make_accelerator(opts, work)
    if opts.mixed_precision == "fp16" and acc.device.type == "cpu":  # Accelerate would train in float32 unasked
        raise MamError("--mixed-precision fp16 needs a GPU and this run trains on the CPU; use bf16 or no")
    main = acc.is_main_process
    _check_run_folder(work, out, resume, force)
    replace_out = force or resume  # a resumed run was allowed to replace DIR when it started
    check_output_dir(out, replace_out, inputs)
    with output_lock(out) if main else nullcontext():
        acc.wait_for_everyone()
        created = _open_run_folder(work, resume) if main else False
        acc.wait_for_everyone()
        run = _Run(target, source, task, train, dev, opts, out, work, inputs, replace_out, acc, command,
                   progress if progress is not None and main else quiet, progress is not None and main)
        try:
            return run.go(resume, families, started)
        except BaseException as e:
            # failed before any progress, or the disk refused a write: leave nothing this call made
            if created and main and (isinstance(e, WriteError) or not (work / RUN_FILE).is_file()):
                shutil.rmtree(work, ignore_errors=True)
            raise


class _Run:
    """One call's inputs and where it writes; ``go()`` prepares the model, trains and writes the output."""

    def __init__(self, target: Checkpoint, source: Checkpoint | None, task: Task, train: Dataset,
                 dev: Dataset | None, opts: FinetuneOptions, out: Path, work: Path, inputs: list[Path],
                 replace_out: bool, acc: Any, command: str | None, say: Callable[[str], None],
                 show_bar: bool) -> None:
        self.target, self.source, self.task, self.train, self.dev, self.opts = target, source, task, train, dev, opts
        self.out, self.work, self.inputs, self.replace_out, self.acc, self.command = \
            out, work, inputs, replace_out, acc, command
        self.say, self.show_bar = say, show_bar
        self.bad: list[dict[str, str]] = []

    def go(self, resume: bool, families: tuple[Family, ...], started: float) -> dict[str, Any]:
        opts, acc, work = self.opts, self.acc, self.work
        torch.manual_seed(opts.seed)
        np.random.seed(opts.seed)  # transformers' SpecAugment time masks use numpy's global RNG
        am, store, plan, bank = self._prepare(families, resume)
        clips = self._read_clips(am)
        num_layers = store.arch().num_layers

        def keep_best() -> None:
            save_best(work, am.model, bank, plan, num_layers)

        loop = TrainingLoop(acc, am, bank, clips, opts, work, self.say, self.show_bar, keep_best)
        if resume:
            loop.resume()
        dev_opts = EvalOptions(task=opts.task, normalizer=opts.normalizer, beams=opts.beams, language=opts.language)
        evaluator = Evaluator(self.target, self.dev, dev_opts, am=am) if self.dev is not None else None
        loop.run(evaluator)
        if not acc.is_main_process:  # the main process writes the output and the report
            return {"command": "finetune", "status": "done", "process": acc.process_index}
        if evaluator is None or not (work / BEST_FILE).is_file():
            keep_best()
        report = self._report(loop, bank, plan, started)
        write_output(self.out, self.replace_out, self.inputs, self.target, am, report, loop.st.trajectory,
                     self.command, work, [loop.metrics, work / TENSORBOARD_DIR, work / ALIGN_FILE])
        shutil.rmtree(work, ignore_errors=True)
        report["output_dir"] = str(self.out)
        return report

    def _prepare(self, families: tuple[Family, ...], resume: bool) -> tuple[AudioModel, ModelStore,
                                                                            MergePlan | None, LamBank | None]:
        """The target loaded to train, frozen where asked, merged (MAM) or reparametrised (L-MAM), with the
        source aligned first where asked."""
        opts, target, source = self.opts, self.target, self.source
        am = self.task.load_for_training(target, self.train.all_labels, opts.device)
        self.task.check(self.train)
        store = ModelStore(am.model, target.spec, round_to=stored_dtype(target))  # MAM's start equals `mam merge`'s
        self.task.freeze(am, store.arch(), feature_encoder=opts.freeze_feature_encoder, decoder=opts.freeze_decoder)
        if source is None:
            return am, store, None, None
        assert opts.lam_init is not None
        merger = InMemoryMerger(store, families)
        plan = merger.plan(source, self._merge_options(self._alignment(store, families, resume)))
        if opts.learnable_lam:  # the λ parametrizations read the source themselves: the permutations first
            solve_alignment(plan, source, store)
            return am, store, plan, attach_learnable(am.model, plan, source, opts.lam_init, opts.per_part)
        merger.apply(source, plan)  # MAM, then plain fine-tuning: the merged weights are the starting point
        return am, store, plan, None

    def _merge_options(self, align: str, align_data: ActivationStats | None = None) -> MergeOptions:
        opts = self.opts
        return MergeOptions(lam=opts.lam_init, layers=opts.layers, parts=opts.parts, layer_map=opts.layer_map,
                            align=align, align_data=align_data)

    def _alignment(self, store: ModelStore, families: tuple[Family, ...], resume: bool) -> str:
        """``none``, or the run folder's ``mam_align.json``: solved once, by the main process, against the target
        as loaded (so it is what ``mam merge --align`` finds for the pair), and read by every process, so all
        merge alike; a resumed run reads the permutations it started with. ``activations`` pools the training
        clips with their transcripts (the dev clips stay unseen)."""
        opts, acc, saved = self.opts, self.acc, self.work / ALIGN_FILE
        if opts.align == "none":
            return "none"
        if acc.is_main_process and not (resume and saved.is_file()):
            assert self.source is not None
            data = None
            if opts.align == "activations":
                self.say(f"--align activations: pooling {len(self.train.items)} training clips and their transcripts")
                data = collect_activations(self.source, self.target, self.train, families, device=str(acc.device),
                                           batch_size=opts.batch_size)
            plan = plan_merge(self.source, store, self._merge_options(opts.align, data), families)
            alignment = solve_alignment(plan, self.source, store)
            assert alignment is not None
            tmp = saved.with_name(f"{ALIGN_FILE}.tmp")
            with writing(self.work):
                tmp.write_text(alignment.dumps(), encoding="utf-8")
                tmp.replace(saved)
        acc.wait_for_everyone()
        return str(saved)

    def _read_clips(self, am: AudioModel) -> list[Clip]:
        """Training clips; unreadable ones, those the model's front end cannot take (too short, too long) and
        those the head cannot learn from are named in ``bad`` and skipped, as evaluate and rank-layers skip them."""
        train, bad = self.train, self.bad
        self.say(f"reading {len(train.items)} training clips")
        clips = []
        for clip in iter_clips(train, am.rate, False, bad, usable=am.usable):
            why = self.task.unlearnable(am, clip)
            if why is None:
                clips.append(clip)
            else:
                bad.append({"id": clip.item.id, "path": str(clip.item.path), "error": f"{clip.item.path}: {why}"})
        if not clips:
            raise MamError(f"no usable training clip in {train.spec!r}" + (f" (first problem: {bad[0]['error']})"
                                                                          if bad else ""))
        return sorted(clips, key=lambda c: c.item.id)

    def _report(self, loop: TrainingLoop, bank: LamBank | None, plan: MergePlan | None,
                started: float) -> dict[str, Any]:
        opts, st, source = self.opts, loop.st, self.source
        return {
            "command": "finetune", "status": "done",
            "inputs": {"target": self.target.describe(), "source": source.describe() if source else None,
                       "train": self.train.describe(), "dev": self.dev.describe() if self.dev else None},
            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
            "mode": "l-mam" if bank is not None else ("mam+finetune" if source is not None else "finetune"),
            **({"alignment": plan.alignment.summary()} if plan is not None and plan.alignment is not None else {}),
            "task": self.task.describe(), "epochs": st.history, "best_dev_error": st.best, "steps": st.step,
            "bad_clips": self.bad, "versions": versions(), "wall_time_s": round(time.perf_counter() - started, 3),
            "peak_rss_mib": peak_rss_mib(),
        }
