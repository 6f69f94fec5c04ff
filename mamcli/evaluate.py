"""Evaluation: WER/CER of speech models (CTC, or Whisper's bounded ``generate()``) and error of audio-event
models, for one model or a sweep. What differs per kind of head lives in :mod:`mamcli.tasks`.

A sweep evaluates every (layers, λ, source-or-noise) point on one loaded target: only the merged
Q/K/V tensors are swapped in and out, the feature extractor runs once per clip, and the outputs of
everything before the first merged layer are computed once per batch and replayed.

Under a launcher (:mod:`mamcli.distributed`) every process loads the model once and runs every point on
its share of the batches (its replay cache its own); the predictions of each point are gathered to every
process, so each scores the union exactly as one process would (and ``--pick-on-dev`` picks the same point
everywhere). Only the main process reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mamcli.align import ActivationStats, Alignment
from mamcli.checkpoint import Checkpoint
from mamcli.data import Dataset, Item
from mamcli.distributed import ALONE, Processes, read_batches
from mamcli.errors import MamError
from mamcli.families import FAMILIES, Family
from mamcli.layers import layers_spec, parse_layers
from mamcli.merge import NOISE_KINDS, MergeOptions, MergePlan, TensorStore, solve_alignment
from mamcli.metrics import normaliser
from mamcli.models import (
    AudioModel,
    InMemoryMerger,
    ModelStore,
    PrefixCache,
    compute_dtype,
    default_batch_size,
    load_audio_model,
    stored_dtype,
)
from mamcli.report import peak_rss_mib, versions
from mamcli.stats import COLUMNS, RESAMPLES, add_paired_columns, method
from mamcli.tasks import Task, TaskOptions, make


@dataclass
class EvalOptions:
    task: str = "auto"  # asr | aec | auto (from the model's head)
    normalizer: str = "auto"  # auto (whisper for sequence-to-sequence, basic for CTC) | whisper | basic | none
    batch_size: int | None = None  # default: 8 on an accelerator; on CPU 1, or 8 for sequence-to-sequence (16 --fast)
    strict: bool = False
    label_map: Path | None = None
    device: str = "cpu"
    cache_gb: float = 4.0  # replay cache of a sweep (PrefixCache): beyond it, batches run in full
    beams: int = 1  # sequence-to-sequence: 1 is greedy decoding, more is beam search
    language: str | None = None  # multilingual Whisper: the language to transcribe (default: detected)
    dtype: str | None = None  # compute dtype (--dtype); None: float32 on CPU, the stored dtype on a GPU
    fast: bool = False  # Whisper on CPU: int8 encoder, float32 decoder, greedy only; NOT exact (mamcli.whisper_engine)

    def task_options(self) -> TaskOptions:
        return TaskOptions(beams=self.beams, language=self.language, normalizer=self.normalizer,
                           label_map=self.label_map, fast=self.fast)


@dataclass
class SweepOptions:
    lams: list[float] = field(default_factory=lambda: [0.0])
    layers: str | None = None
    blocks: int | None = None
    noises: list[str] = field(default_factory=list)
    with_source: bool = True
    seed: int = 0
    parts: tuple[str, ...] = ("q", "k", "v")
    bias: bool = False
    layer_map: str | None = None
    baseline: str = "target"  # the details key paired statistics compare with (λ = 0)
    resamples: int = RESAMPLES  # paired bootstrap resamples (WER; classification error is tested exactly)
    align: str | Path = "none"  # none | weights | activations (align_data) | a mam_align.json: MergeOptions.align
    align_data: ActivationStats | None = None  # --align activations: pooled from dev clips, never test

    def layer_sets(self, num_layers: int) -> list[tuple[str, list[int]]]:
        """(label, layers) per block: ``--blocks N`` cuts the depth into consecutive blocks of N."""
        if self.blocks is not None and self.layers is not None:
            raise MamError("--layers and --blocks do not mix")
        if self.blocks is not None:
            if not 1 <= self.blocks <= num_layers:
                raise MamError(f"--blocks must lie in 1..{num_layers}; got {self.blocks}")
            return [(f"{s}-{min(s + self.blocks, num_layers) - 1}", list(range(s, min(s + self.blocks, num_layers))))
                    for s in range(0, num_layers, self.blocks)]
        layers = parse_layers(self.layers, num_layers)
        if self.layers is not None and self.layers.strip().startswith("top:"):  # show which layers won
            return [(layers_spec(layers), layers)]
        return [(self.layers or "all", layers)]


class Evaluator:
    """One loaded model and one set of clips, evaluated as often as a sweep needs."""

    def __init__(self, target: Checkpoint, ds: Dataset, opts: EvalOptions,
                 progress: Callable[[str], None] | None = None, am: AudioModel | None = None,
                 ticker: Callable[[int, int], None] | None = None, processes: Processes = ALONE) -> None:
        """``progress`` gets a line per stage; ``ticker(done, total)`` clips read, then batches scored (both on
        the main process only). ``processes``: under a launcher, this process scores its share of the batches."""
        self.opts = opts
        self.processes = processes
        self.ticker = ticker if processes.main else None
        self.progress = progress if processes.main else None
        self.ds = ds
        if opts.cache_gb < 0:
            raise MamError(f"--cache-gb must be 0 or more; got {opts.cache_gb}")
        # a loaded model's own task (finetune's dev evaluation builds it once), else one for these options
        self.task: Task = am.task if am is not None and getattr(am, "task", None) is not None else \
            make(opts.task, target.config, opts.task_options(), target.spec)
        device = processes.device(opts.device)
        self.am: AudioModel = am or load_audio_model(target, self.task, device,
                                                     dtype=compute_dtype(opts.dtype, device))
        if am is not None:
            self.task.bind(am)
        self.task.check(ds)  # bound first: labels are matched against the model's head
        if self.progress:
            self.progress(f"reading {len(ds.items)} clips at {self.am.rate} Hz")
        self.batch_size = opts.batch_size or default_batch_size(self.am.model, self.task)
        shard = read_batches(ds, self.am, self.batch_size, processes, opts.strict, self.ticker)
        self.bad = shard.bad
        if not shard.items:
            raise MamError(f"no usable clip in {ds.spec!r}" + (f" ({self.bad[0]['error']})" if self.bad else ""))
        self.items = shard.items  # every process's clips: the union is scored
        self.order = shard.order
        self.clips_per_process = shard.clips_per_process
        self.inputs = [self.am.inputs([c.audio for c in b]) for b in shard.batches]  # features once per clip
        self.samples = [[len(c.audio) for c in b] for b in shard.batches]
        self.batches: list[list[Item]] = [[c.item for c in b] for b in shard.batches]  # the audio is not kept
        del shard
        self.store = ModelStore(self.am.model, target.spec, stored_dtype(target))
        self.cache: PrefixCache | None = None
        self.seconds = 0.0
        self.at_bound: list[str] = []  # clips of the last predict() whose decoding stopped at the token bound

    def _forward(self, k: int) -> AbstractContextManager[Any]:
        """Batch ``k`` through the prefix cache: replayed, recorded, or (no cache, over budget) run in full."""
        if self.cache is None:
            return nullcontext()
        if k in self.cache.store:
            return self.cache.replay(k)
        return nullcontext() if self.cache.full else self.cache.record(k)

    @torch.inference_mode()
    def predict(self, which: Sequence[int] | None = None) -> dict[str, str]:
        """Clip id → hypothesis (ASR) or dataset label (audio events) of every process's clips, in batch
        order, using the prefix cache if set. Under a launcher the wall time includes waiting for the others.
        ``which``: this process's batches to run (a round of ``mam search``; default all); every process calls
        it, with its own share, as the predictions are gathered."""
        started = time.perf_counter()
        out: dict[str, str] = {}
        at_bound: list[str] = []
        model = self.am.model
        was_training = model.training
        model.eval()  # no dropout while scoring, also mid-training
        todo = list(range(len(self.batches))) if which is None else list(which)
        for n, k in enumerate(todo, 1):
            batch, inputs, samples = self.batches[k], self.inputs[k], self.samples[k]
            with self._forward(k):
                pred = self.task.predict(self.am, inputs, samples)
            out.update({item.id: t for item, t in zip(batch, pred.texts, strict=True)})
            at_bound += [item.id for item, hit in zip(batch, pred.at_bound, strict=True) if hit]
            if self.ticker:
                self.ticker(n, len(todo))
        model.train(was_training)
        parts = self.processes.all_gather((out, at_bound))
        found = {k: t for texts, _ in parts for k, t in texts.items()}
        hit = {k for _, ids in parts for k in ids}
        self.at_bound = [k for k in self.order if k in hit]
        self.seconds += time.perf_counter() - started
        return {k: found[k] for k in self.order if k in found}

    def score(self, preds: dict[str, str], at_bound: set[str] | None = None) -> dict[str, Any]:
        """Scores of the clips in ``preds`` (all of them after a full ``predict()``), in clip-id order."""
        items = sorted((i for i in self.items if i.id in preds), key=lambda i: i.id)
        return self.task.score(items, preds, set(self.at_bound) if at_bound is None else at_bound)

    def evaluate(self, label: str = "") -> dict[str, Any]:
        """Predict and score; ``label`` names the sweep point in the note about clips stopped at the token bound."""
        scores = self.score(self.predict())
        if scores.get("hit_token_bound") and self.progress:
            self.progress(f"{scores['hit_token_bound']} of {scores.get('scored', len(self.at_bound))} clip(s) "
                          f"stopped at the token bound{label} (the decoder was still going: likely repeating)")
        return scores

    def describe(self) -> dict[str, Any]:
        model = self.am.model
        dtype = next(model.parameters()).dtype
        stored = stored_dtype(self.am.ckpt)
        info: dict[str, Any] = {**self.task.describe(), "device": str(model.device), "rate": self.am.rate,
                                "dtype": str(dtype).removeprefix("torch."),
                                "stored_dtype": str(stored).removeprefix("torch.") if stored else "mixed",
                                "batch_size": self.batch_size, "padding_safe_batching": self.am.padding_safe,
                                "clips": len(self.items), "skipped_clips": len(self.bad), "bad_clips": self.bad,
                                "processes": self.processes.size, "clips_per_process": self.clips_per_process}
        if "normalizer" in info:
            info["normalizer"]["text_field"] = self.ds.text_field
        return info


def _summary(scores: dict[str, Any]) -> dict[str, Any]:
    keys = ("error", "wer", "cer", "substitutions", "insertions", "deletions", "accuracy", "hit_token_bound")
    return {k: scores[k] for k in keys if k in scores}


def sweep(ev: Evaluator, source: Checkpoint | None, opts: SweepOptions,
          families: tuple[Family, ...] = FAMILIES,
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate the target (λ = 0) and every merge point; returns the paper-style table and details (on every
    process of a launch, which all run this with the same arguments)."""
    progress = progress if ev.processes.main else None
    for lam in opts.lams:
        if not 0.0 <= lam <= 1.0:
            raise MamError(f"λ must lie in [0, 1], got {lam}")
    bad_noise = [n for n in opts.noises if n not in NOISE_KINDS]
    if bad_noise:
        raise MamError(f"--noise takes a comma list of {', '.join(NOISE_KINDS)}; got {bad_noise[0]!r}")
    arch = ev.store.arch(families)
    sets = opts.layer_sets(arch.num_layers)
    lams = sorted({lam for lam in opts.lams if lam > 0})
    if source is None and lams and not (opts.noises and not opts.with_source):
        raise MamError("a sweep with λ > 0 needs --source (or --noise-only with --noise target|normal)")
    if source is None and "source" in opts.noises:
        raise MamError("--noise source takes its statistics from --source; give one")
    columns: list[tuple[str, str | None]] = ([(source.name, None)] if source and opts.with_source else [])
    columns += [(f"noise:{n}", n) for n in opts.noises]
    points = [(label, layers, lam, col, noise) for label, layers in sets for lam in lams for col, noise in columns]
    donor: TensorStore = source if source is not None else ev.store  # target/normal noise only need shapes
    merger = InMemoryMerger(ev.store, families)
    plans = []
    solved: dict[Hashable, Alignment] = {}
    for label, _, lam, _, noise in points:  # plan everything first: bad input fails before any work
        o = MergeOptions(lam=lam, layers=label, parts=opts.parts, bias=opts.bias, noise=noise, seed=opts.seed,
                         layer_map=opts.layer_map, align=opts.align, align_data=opts.align_data)
        plans.append(merger.plan(donor, o))
        share_alignment(plans[-1], (label, noise), donor, ev.store, solved)
    first = min((min(p.lams) for p in plans if p.lams), default=0)
    ev.cache = PrefixCache(ev.am.model, arch, first, int(ev.opts.cache_gb * 2**30)) if plans else None
    if progress:
        progress(f"baseline (λ = 0), then {len(points)} merge point(s)")
    base = ev.evaluate()
    base_t = ev.seconds
    results = [{"layers": None, "lam": 0.0, "column": "target", "seconds": round(base_t, 3), **_summary(base)}]
    details = {"target": base}
    for n, ((label, _, lam, col, noise), plan) in enumerate(zip(points, plans, strict=True)):
        if progress:
            progress(f"[{n + 1}/{len(points)}] layers {label}, λ = {lam}, {col}")
        before = ev.seconds
        with merger.applied(donor, plan):
            scores = ev.evaluate(f" at layers {label}, λ = {lam}, {col}")
        key = f"{label}|{lam}|{col}"
        details[key] = scores
        results.append({"layers": label, "lam": lam, "column": col, "noise": noise,
                        "seconds": round(ev.seconds - before, 3), **_summary(scores),
                        **({"alignment": plan.alignment.summary()} if plan.alignment is not None else {})})
    norm = normaliser(getattr(ev.task, "normalizer", "basic"), getattr(ev.task, "spelling", None))
    cache = None
    if ev.cache is not None:  # each process replays its own batches: the report counts them all
        parts = ev.processes.all_gather(ev.cache.describe(len(ev.batches)))
        cache = {**parts[0], **{k: sum(p[k] for p in parts) for k in ("used_bytes", "batches_replayed", "batches")}}
    add_paired_columns(results, details, opts.baseline, norm, opts.resamples, opts.seed)
    classification = "clips_detail" in base
    return {"baseline": _summary(base), "points": results, "details": details,
            "paired_statistics": {"baseline": opts.baseline, "resamples": opts.resamples, "seed": opts.seed,
                                  "method": method(classification, opts.resamples),
                                  "comparisons": len(results) - 1,  # each interval at 95 % on its own
                                  "note": f"{len(results) - 1} comparison(s) with the baseline, each at 95 % on its "
                                          "own: about one in twenty excludes 0 by chance"},
            "table": paper_table(results, [c for c, _ in columns]) if columns else
            [{"layers": "-", "lam": 0.0, **_summary(base)}], "first_merged_layer": first,
            "timing": {"baseline_s": round(base_t, 3), "total_s": round(ev.seconds, 3)},
            "replay_cache": cache, **alignment_report(opts.align, opts.align_data, len(solved))}


def share_alignment(plan: MergePlan, group: Hashable, donor: TensorStore, target: TensorStore,
                    solved: dict[Hashable, Alignment]) -> None:
    """Solve ``plan``'s alignment now, or reuse the one solved for its ``group`` (the same donor, noise and layer
    set, differing only in λ): the permutations match the donor to the target whatever λ is, so a sweep solves
    once per layer set and donor. Solving here, while planning, also refuses what cannot be aligned before any
    clip is scored."""
    if plan.options.align == "none":
        return
    if group not in solved:
        found = solve_alignment(plan, donor, target)
        assert found is not None
        solved[group] = found
    plan.alignment = solved[group]


def alignment_report(align: str | Path, data: ActivationStats | None, solved: int) -> dict[str, Any]:
    """The report's ``alignment`` entry: the mode, how many alignments were solved (one per layer set and donor;
    each point's own summary says how well it matched) and, for activations, the clips they were pooled from."""
    if align == "none":
        return {}
    return {"alignment": {"mode": str(align), "solved": solved,
                          **({"data": data.data} if data is not None else {})}}


def paper_table(points: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    """One row per (layers, λ); per source/noise column its error, the relative error reduction vs λ = 0, and
    the paired difference to the baseline with its 95 % interval and the clips that got better / worse."""
    base = next(p["error"] for p in points if p["column"] == "target")
    rows: list[dict[str, Any]] = [{"layers": "-", "lam": 0.0, **dict.fromkeys(columns, base)}]
    found: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for p in points:
        if p["column"] != "target":
            found.setdefault((p["layers"], p["lam"]), {})[p["column"]] = p
    for (layers, lam), by_column in found.items():
        row: dict[str, Any] = {"layers": layers, "lam": lam}
        for c in columns:
            if c in by_column:
                p = by_column[c]
                row[c] = p["error"]
                row[f"{c} rel.red."] = (base - p["error"]) / base if base else 0.0
                row.update({f"{c} {k}": p[k] for k in COLUMNS if k in p})
        rows.append(row)
    return rows


def evaluate_report(target: Checkpoint, ds: Dataset, ev: Evaluator, result: dict[str, Any], started: float,
                    source: Checkpoint | None = None) -> dict[str, Any]:
    """The report, on the main process; on the others ``{"command": "evaluate", "process": rank}`` (the CLI
    prints and writes nothing there)."""
    if not ev.processes.main:
        return {"command": "evaluate", "process": ev.processes.rank}
    return {"command": "evaluate", "inputs": {"target": target.describe(),
                                              "source": source.describe() if source else None,
                                              "data": ds.describe()},
            "evaluation": ev.describe(), **result, "versions": versions(),
            "wall_time_s": round(time.perf_counter() - started, 3), "peak_rss_mib": peak_rss_mib()}
