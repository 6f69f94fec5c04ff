"""The `mam` command line: a thin layer over the Python API.

Results go to stdout (JSON/CSV/table), progress and messages to stderr. Any bad input ends
with one line on stderr and a non-zero exit code, never a traceback (set MAM_DEBUG=1 for one).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from typer._click.core import ParameterSource
from typer._click.exceptions import NoArgsIsHelpError

from mamcli.errors import Interrupted, MamError
from mamcli.metrics import NORMALISERS, RANK_METRICS
from mamcli.report import printable
from mamcli.tables import (
    FORMATS,
    metric_name,
    race_for_people,
    render,
    sweep_columns,
    sweep_for_files,
    sweep_for_people,
)

if TYPE_CHECKING:
    import torch

    from mamcli.data import Dataset
    from mamcli.families import Family
    from mamcli.merge import MergeOptions, MergePlan
    from mamcli.splits import Corpus

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="Multimodal Attention Merging: interpolate text/image attention Q/K/V into speech/audio models.")


class _Stderr(Console):
    """stderr. A path given with a byte that is not UTF-8 shows it as \\xNN: such text would fail the write."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(printable(o) if isinstance(o, str) else o for o in objects), **kwargs)


err = _Stderr(stderr=True, highlight=False, soft_wrap=True)  # a line per message: logs stay grep-able

ArchMapOpt = Annotated[list[Path] | None, typer.Option("--arch-map", help="Extra architecture family (JSON/TOML).")]
PartsOpt = Annotated[str, typer.Option("--parts", help="Comma list of q,k,v,o.")]
BiasOpt = Annotated[bool, typer.Option("--bias", help="Merge biases too.")]
LayerMapOpt = Annotated[str | None, typer.Option("--layer-map",
                                                 help="Source layer per target layer: stride|first|last|LIST.")]


def _align(value: str | None) -> str | None:
    """``--align``: none | weights | activations, or a stored mam_align.json (a usage error otherwise, exit 2)."""
    from mamcli.schemas import check_align

    try:
        return None if value is None else check_align(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


AlignOpt = Annotated[str, typer.Option("--align", callback=_align,
                                       help="Re-index the source to match the target before interpolating: none | "
                                       "weights (data-free) | activations (paired clips and transcripts of --data) "
                                       "| PATH/mam_align.json to replay (docs/align.md).")]


FastOpt = Annotated[bool, typer.Option("--fast", help="Whisper on CPU: int8 encoder, float32 decoder whose next word "
                                      "int8 shortlists (bfloat16 where the CPU has it), greedy only; faster, NOT "
                                      "exact (hypotheses differ on some clips).")]


def _choices(name: str, *values: str) -> Any:
    """A closed set of option values: Typer lists them in --help and refuses others (exit 2)."""
    return StrEnum(name, {v: v for v in values})


Format = _choices("Format", *FORMATS)
Task = _choices("Task", "auto", "asr", "aec")
Metric = _choices("Metric", *RANK_METRICS, "all")
Split = _choices("Split", "all", "dev", "test")
TextField = _choices("TextField", "normalized", "raw")
Noise = _choices("Noise", "source", "target", "normal")  # merge.NOISE_KINDS (merge imports torch: --help stays fast)
Normalizer = _choices("Normalizer", *NORMALISERS)


NormalizerOpt = Annotated[Normalizer, typer.Option("--normalizer", help="Text normaliser of references and "
                                                   "hypotheses: auto = whisper (Whisper's English normaliser) for "
                                                   "sequence-to-sequence models, basic (lower case, no punctuation) "
                                                   "for CTC.")]
BeamsOpt = Annotated[int, typer.Option("--beams", min=1, help="Whisper: 1 is greedy decoding (the default), more "
                                      "is beam search (transformers' ASR pipeline uses 5).")]
LabelMapOpt = Annotated[Path | None, typer.Option("--label-map", help="JSON {dataset label: model label}.")]
LanguageOpt = Annotated[str | None, typer.Option("--language", help="Multilingual Whisper: the language spoken "
                                                 "(e.g. en); refused for English-only checkpoints.")]


OutDtype = _choices("OutDtype", "fp32", "fp16", "bf16")  # merge.OUT_DTYPES
MixedPrecision = _choices("MixedPrecision", "no", "fp16", "bf16")  # finetune.MIXED_PRECISION (Accelerate's)
LogWith = _choices("LogWith", "tensorboard")  # finetune.TRACKERS


def _finite(value: float | None) -> float | None:
    """Typer's ranges let NaN through (every comparison with NaN is false): refuse NaN and ±inf here."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, not {value}")
    return value


CacheGbOpt = Annotated[float, typer.Option("--cache-gb", min=0.0, callback=_finite,
                                           help="Memory for replaying unmerged layers in a sweep or race "
                                           "(about 2 GB per hour of audio); batches beyond it run in full.")]


def _size(value: str | None) -> str | None:
    """A size like 2GB, checked where it is parsed (a usage error, exit 2)."""
    from mamcli.writer import parse_size

    if value is not None:
        try:
            parse_size(value)
        except MamError as e:
            raise typer.BadParameter(str(e)) from None
    return value


def _positive(value: float | None) -> float | None:
    if _finite(value) is not None and value <= 0:  # type: ignore[operator]
        raise typer.BadParameter(f"must be greater than 0, not {value}")
    return value


def _share(value: float | None) -> float | None:
    """A share of the clips: 0 < x < 1 (the dev split) — typer has no open bounds."""
    if _finite(value) is not None and not 0 < value < 1:  # type: ignore[operator]
        raise typer.BadParameter(f"must lie strictly between 0 and 1, not {value}")
    return value


def _fraction(value: float | None) -> float | None:
    if _finite(value) is not None and not 0 < value <= 1:  # type: ignore[operator]
        raise typer.BadParameter(f"must lie in (0, 1], not {value}")
    return value


FormatOpt = Annotated[Format, typer.Option("--format", help="What stdout gets: a table for people, CSV/TSV for "
                                                             "spreadsheets, JSON for scripts.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress on stderr (errors still show).")]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", help="More on stderr: transformers' own warnings "
                                                                  "and progress too.")]


def _logging(verbose: bool, quiet: bool) -> None:
    """transformers' logging follows -v/-q (warnings by default), unless TRANSFORMERS_VERBOSITY says otherwise."""
    if verbose and quiet:
        raise typer.BadParameter("-v and -q contradict each other; give one")
    import transformers

    if not os.environ.get("TRANSFORMERS_VERBOSITY"):
        transformers.logging.set_verbosity_error() if quiet else (
            transformers.logging.set_verbosity_info() if verbose else transformers.logging.set_verbosity_warning())
    if verbose:
        transformers.utils.logging.enable_progress_bar()
    else:  # mam draws its own progress
        transformers.utils.logging.disable_progress_bar()


def _command_line() -> str:
    from mamcli.card import command_line

    return command_line([printable(a) for a in ARGV])


def _version(value: bool) -> None:
    if value:
        from mamcli import __version__

        print(f"mam {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print mam's version and exit.")] = False) -> None:
    """Multimodal Attention Merging: interpolate text/image attention Q/K/V into speech/audio models.

    Results go to stdout, progress to stderr; exit 0 ok, 1 bad input or a failure of the machine, 2 usage,
    3 a bug, 128 + N on signal N.
    """


def _families(arch_map: list[Path] | None) -> tuple[Family, ...]:
    from mamcli.families import all_families, load_family_file

    return all_families([f for p in arch_map or [] for f in load_family_file(p)])


def _parts(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    from mamcli.merge import OUT_DTYPES

    return OUT_DTYPES[name]


def _plan_rows(plan: MergePlan, with_lam: bool) -> list[dict[str, Any]]:
    rows = [{"layer": p.layer, "source_layer": p.source_layer, "part": p.part, "kind": p.kind,
             **({"lam": p.lam} if with_lam else {}),
             "source": p.source + (f"[{p.source_rows[0]}:{p.source_rows[1]}]" if p.source_rows else ""),
             "target": p.target + (f"[{p.target_rows[0]}:{p.target_rows[1]}]" if p.target_rows else ""),
             "shape": "x".join(map(str, p.shape))} for p in plan.pairs]
    rows += [{"layer": s["layer"], "part": s["part"], "kind": s["kind"], "source": "(skipped)",
              "target": s["reason"]} for s in plan.skipped]
    return rows


def _print_plan(plan: MergePlan, fmt: str, with_lam: bool) -> None:
    _out(render(_plan_rows(plan, with_lam), fmt, title="source → target tensor pairs"))
    if fmt in ("table",):
        err.print(f"source: {plan.source.describe()}")
        err.print(f"target: {plan.target.describe()}")
        for n in plan.notes:
            err.print(f"note: {n}")
        if plan.unmapped:
            err.print(f"target attention tensors left unmapped ({len(plan.unmapped)}):")
            for n in plan.unmapped:
                err.print(f"  {n}")


@app.command("merge", epilog="Example: mam merge bert-large hubert-large --lam 0.1 --layers 12-19 -o out/")
def merge_cmd(
    ctx: typer.Context,
    source: Annotated[str | None, typer.Argument(help="Source (text/image) model: directory, file, alias or hub id "
                                                 "(NAME@REV pins a revision).", show_default=False)] = None,
    target: Annotated[str | None, typer.Argument(help="Target (speech/audio) model.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Output directory.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="A YAML recipe holding any of these options "
                                                "(an output's mam_recipe.yaml replays that merge); flags given "
                                                "here win.")] = None,
    lam: Annotated[float | None, typer.Option("--lam", min=0.0, max=1.0, callback=_finite,
                                              help="λ for every selected layer, in [0,1].")] = None,
    lams: Annotated[Path | None, typer.Option("--lams", help="Per-layer λ file (lams.json, report, list).")] = None,
    layers: Annotated[str | None, typer.Option("--layers", help="12-19 | 0,3,5 | top:K:ranking.json[:metric].")] = None,
    parts: PartsOpt = "q,k,v",
    bias: BiasOpt = False,
    noise: Annotated[Noise | None, typer.Option("--noise", help="Noise as the source, with the statistics of the "
                                                "source or target tensors, or N(0,1).")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the noise.")] = 0,
    layer_map: LayerMapOpt = None,
    align: AlignOpt = "none",
    data: Annotated[str | None, typer.Option("--data", help="--align activations: the paired data (speech clips "
                                             "with transcripts), as rank-layers reads it.")] = None,
    limit: LimitOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = "auto",
    shard_size: Annotated[str | None, typer.Option("--shard-size", callback=_size,
                                                   help="Shard past this size, e.g. 2GB.")] = None,
    out_dtype: Annotated[OutDtype | None, typer.Option("--out-dtype", help="Output dtype (default: target's).")]
    = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier mam output (never anything else).")]
    = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the tensor pairs; write nothing.")] = False,
    fmt: FormatOpt = Format.table,
    json_out: Annotated[bool, typer.Option("--json", help="Same as --format json: the whole report.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Default hub revision (branch, tag or commit) "
                                                 "for models without their own @REV.")] = None,
    arch_map: ArchMapOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Interpolate the source's attention Q/K/V into the target and write a loadable checkpoint.

    stdout: the merged tensors (λ, change, cosine) as a table, CSV or TSV, or the whole report as JSON.
    """
    from mamcli.checkpoint import resolve
    from mamcli.merge import MergeOptions, merge_to_dir, plan_merge
    from mamcli.report import dumps
    from mamcli.writer import parse_size

    _logging(verbose, quiet)
    fmt = Format.json if json_out else fmt
    flags = {"source": source, "target": target, "out": out, "lam": lam, "lams": lams, "layers": layers,
             "parts": parts, "bias": bias, "noise": noise.value if noise else None, "seed": seed,
             "layer_map": layer_map, "shard_size": shard_size, "out_dtype": out_dtype.value if out_dtype else None,
             "revision": revision, "arch_map": arch_map, "align": align}
    if config is None:
        o = {**flags, "lam_table": None}
    else:
        from mamcli.recipe import load_recipe, overlay

        o = overlay(load_recipe(config), flags,
                    given={k for k in flags if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE})
    if o["source"] is None or o["target"] is None:
        raise typer.BadParameter("give SOURCE and TARGET, or a --config recipe that names them")
    out = o["out"]
    if out is None and not dry_run:
        raise MamError("give an output directory with -o DIR (or --dry-run)")
    options = MergeOptions(lam=o["lam"], layers=o["layers"], lams_file=o["lams"], lams=o["lam_table"],
                           parts=_parts(o["parts"]), bias=o["bias"], noise=o["noise"], seed=o["seed"],
                           layer_map=o["layer_map"], align=o["align"])
    pairs = _align_pairs(options, data, limit)  # the data is read (and refused) before any model is
    families = _families(o["arch_map"])
    size = parse_size(o["shard_size"]) if o["shard_size"] else None
    dtype = _dtype(o["out_dtype"])
    extra = {"arch_map": [str(p.expanduser().absolute()) for p in o["arch_map"]]} if o["arch_map"] else {}
    with ExitStack() as stack:
        src = stack.enter_context(resolve(o["source"], o["revision"]))
        tgt = stack.enter_context(resolve(o["target"], o["revision"]))
        if dry_run:  # the pairs and whether they can be aligned; no clip is read for activations
            _print_plan(plan_merge(src, tgt, replace(options, align=_without_data(options.align)), families), fmt,
                        with_lam=True)
            return
        assert out is not None
        if pairs is not None:
            from mamcli.align import collect_activations

            if not quiet:
                _note(f"--align activations: pooling {len(pairs.items)} clips and their transcripts")
            options.align_data = collect_activations(src, tgt, pairs, families, device=device, batch_size=batch_size)
        report = _with_progress(lambda cb: merge_to_dir(src, tgt, options, out, force=force, shard_size=size,
                                                        out_dtype=dtype, families=families, progress=cb,
                                                        note=None if quiet else _note, recipe_extra=extra,
                                                        command=_command_line()),
                                "merging", quiet)
    for n in report["notes"] if not quiet else ():
        _note(f"note: {n}")
    if not quiet:
        _note(f"wrote {out} ({len(report['tensors'])} tensors merged, {report['wall_time_s']} s, "
              f"peak {report['peak_rss_mib']} MiB)")
    rows = [{k: t[k] for k in ("layer", "source_layer", "part", "kind", "lam", "delta_norm", "cosine", "target")}
            for t in report["tensors"]]
    _out(dumps(report) if fmt == Format.json else render(rows, fmt, title=f"merged into {out}"))


def _align_pairs(options: MergeOptions, data: str | None, limit: int | None) -> Dataset | None:
    """Check the options; for ``--align activations`` the paired clips of ``--data`` (every clip, as rank-layers'
    ``--split all`` reads them), else None."""
    replace(options, align=_without_data(options.align)).validate()
    if options.align != "activations":
        if data is not None:
            raise MamError("--data is read only by --align activations (paired clips for the permutations)")
        return None
    if data is None:
        raise MamError("--align activations needs paired data (speech clips with transcripts): give --data")
    return _corpus(data, TextField.normalized, None, None, None, 0.1, None, limit, 0).part("all")


def _without_data(align: str | Path) -> str | Path:
    """The data-free mode in place of activations, which checks the same (parts, heads) before any clip is read:
    the first checks, and a dry run's plan."""
    return "weights" if align == "activations" else align


def _with_progress(work: Callable[[Callable[[int, int], None] | None], T], label: str, quiet: bool) -> T:
    """Run ``work(progress_callback)`` under a byte progress bar on stderr."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    if quiet or not err.is_terminal:  # a bar in a log file is noise
        return work(None)
    with Progress(TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=err,
                  transient=True) as bar:
        task = bar.add_task(label, total=None)
        return work(lambda done, total: bar.update(task, completed=done, total=total))


DataOpt = Annotated[str, typer.Option("--data", help="ljspeech:PATH | vctk:PATH | esc50:PATH | folders:PATH | fsdd:PATH"
                                                   " | librispeech:PATH | commonvoice:PATH | hf:PATH | parquet:PATH | "
                                                   "manifest .csv/.tsv/.jsonl/.json (docs/datasets.md)")]
SplitOpt = Annotated[Split, typer.Option("--split", help="Which part of the seeded dev/test split.")]
DevFracOpt = Annotated[float, typer.Option("--dev-fraction", callback=_share, help="Share of clips in the dev split.")]
FoldsOpt = Annotated[str | None, typer.Option("--folds", help="Comma list of folds to use (ESC-50, ESC-10).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="Use at most N clips (quick runs).")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="An unreadable clip is fatal.")]
TextFieldOpt = Annotated[TextField, typer.Option("--text-field", help="LJ Speech transcript column.")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", min=1,
                                              help="Clips per forward (default: 8 on GPU; on CPU 1, but 8 for "
                                              "Whisper, whose batch shares each decoder step, 16 with --fast).")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Also draw a PNG figure here.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present) | cpu | cuda | cuda:N.")]
Dtype = _choices("Dtype", "float32", "bfloat16", "float16")  # models.COMPUTE_DTYPES
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Compute dtype (the report says which); float16 needs a "
                                                         "GPU.")]


SubsetOpt = Annotated[str | None, typer.Option("--subset", help="The corpus's own split: LibriSpeech test-clean, a "
                                               "Common Voice tsv (default test), a Hugging Face split.")]
TextColumnOpt = Annotated[str | None, typer.Option("--text-column", help="Transcript column (HF dataset, manifest).")]
LabelColumnOpt = Annotated[str | None, typer.Option("--label-column", help="Label column (HF dataset, manifest).")]


def _corpus(spec: str, text_field: TextField, subset: str | None, text_column: str | None,
            label_column: str | None, dev_fraction: float, folds: str | None, limit: int | None,
            seed: int) -> Corpus:
    from mamcli.splits import Corpus

    return Corpus(spec, text_field.value, subset, text_column, label_column, dev_fraction, folds, limit, seed)


def _note(msg: str) -> None:
    err.print(msg, markup=False)


class _Stages:
    """Progress on stderr: a line per stage and, on a terminal, a bar over the stage's clips or batches."""

    def __init__(self, quiet: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.quiet = quiet
        self.bar = None if quiet or not err.is_terminal else Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=err, transient=True)
        self.task: Any = None

    def __enter__(self) -> _Stages:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    @property
    def note(self) -> Callable[[str], None] | None:
        return None if self.quiet else self._note

    @property
    def tick(self) -> Callable[[int, int], None] | None:
        return None if self.bar is None else self._tick

    def _note(self, msg: str) -> None:
        if self.bar is None:
            _note(msg)
        else:
            self.bar.console.print(msg, markup=False)
            if self.task is None:
                self.task = self.bar.add_task(msg, total=None)
            self.bar.reset(self.task, description=msg, total=None)

    def _tick(self, done: int, total: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=done, total=total)


@app.command("rank-layers", epilog="Example: mam rank-layers bert-base hubert-base --data ljspeech:LJSpeech-1.1 "
             "--fraction 0.1 --metric all -o ranking.json")
def rank_cmd(
    source: Annotated[str, typer.Argument(help="Source (text) model, with its tokenizer.")],
    target: Annotated[str, typer.Argument(help="Target (speech or audio) model, with its feature extractor: CTC, "
                                          "Whisper (its encoder's layers) or an audio-event classifier.")],
    data: DataOpt,
    metric: Annotated[Metric, typer.Option("--metric", help="Similarity metric, or all three.")] = Metric.swd,
    fraction: Annotated[float | None, typer.Option("--fraction", callback=_fraction,
                                                   help="Share of the data to use (paper: 0.1).")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="How many layers to pick (default 8).")] = None,
    n_projections: Annotated[int, typer.Option("--n-projections", min=1, help="SWD projections.")] = 200,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the split, fraction and SWD projections.")] = 0,
    split: SplitOpt = Split.all,
    dev_fraction: DevFracOpt = 0.1,
    folds: FoldsOpt = None,
    limit: LimitOpt = None,
    strict: StrictOpt = False,
    text_field: TextFieldOpt = TextField.normalized,
    subset: SubsetOpt = None,
    text_column: TextColumnOpt = None,
    label_column: LabelColumnOpt = None,
    batch_size: BatchOpt = None,
    layer_map: LayerMapOpt = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Write the JSON report here.")] = None,
    fmt: FormatOpt = Format.table,
    plot: PlotOpt = None,
    arch_map: ArchMapOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.float32,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Rank layers by how alike the source's text and the target's speech representations are."""
    from mamcli.checkpoint import resolve
    from mamcli.distributed import launched
    from mamcli.rank import RankOptions, rank_layers, ranking_rows
    from mamcli.report import dumps, write_json

    procs = launched()  # under torchrun / accelerate launch: this process encodes its share of the clips
    _logging(verbose and procs.main, quiet or not procs.main)
    opts = RankOptions(metric=metric.value, top_k=top_k, n_projections=n_projections, seed=seed,
                       batch_size=batch_size, layer_map=layer_map, strict=strict, device=device, dtype=dtype.value)
    opts.metrics()
    _check_report_paths(out, plot)
    ds = _corpus(data, text_field, subset, text_column, label_column, dev_fraction, folds, limit, seed).part(
        split.value, fraction)
    with resolve(source) as src, resolve(target) as tgt, _Stages(quiet or not procs.main) as stages:
        report = rank_layers(src, tgt, ds, opts, _families(arch_map), progress=stages.note, ticker=stages.tick,
                             processes=procs)
    if "process" in report:  # under a launcher, only the main process reports
        return
    for b in report["bad_clips"]:
        _note(f"skipped clip {b['id']}: {b['error']}")
    rows = ranking_rows(report)
    _out(render(rows, fmt) if fmt != "json" else dumps(report))  # first: a failed write loses nothing
    for m, r in report["metrics"].items() if not quiet else ():
        _note(f"{m} ({r['orientation']}): top {report['top_k']} layers {','.join(map(str, r['top_k']))}")
    if out is not None:
        write_json(out, report)
    if plot is not None:
        from mamcli.plots import line_plot

        layers = list(range(len(report["layer_map"])))
        line_plot({m: (layers, r["scores"]) for m, r in report["metrics"].items()}, "target layer", "score",
                  "per-layer similarity", plot)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MamError(f"{what} takes a comma list of numbers; got {text!r}") from None


@app.command("evaluate", epilog="Example: mam evaluate whisper-small --data ljspeech:LJSpeech-1.1 --source "
             "bert-base --lam 0,0.05,0.1 --pick-on-dev --format csv -o eval.json")
def evaluate_cmd(
    target: Annotated[str, typer.Argument(help="Model to evaluate: speech recognition, CTC (wav2vec 2.0, HuBERT) "
                                          "or sequence-to-sequence (Whisper), or an audio-event classifier (AST, "
                                          "BEATs).")],
    data: DataOpt,
    task: Annotated[Task, typer.Option("--task", help="asr: speech recognition (CTC or Whisper), aec: audio-event "
                                       "classification, auto: from the model's head.")] = Task.auto,
    source: Annotated[str | None, typer.Option("--source", help="Source model for a λ sweep.")] = None,
    lam: Annotated[str, typer.Option("--lam", help="Comma list of λ, e.g. 0,0.05,0.1.")] = "0",
    layers: Annotated[str | None, typer.Option("--layers", help="Layers merged at each point.")] = None,
    blocks: Annotated[int | None, typer.Option("--blocks", min=1, help="Sweep consecutive blocks of N layers.")]
    = None,
    noise: Annotated[str | None, typer.Option("--noise", help="Noise columns: source,target,normal.")] = None,
    noise_only: Annotated[bool, typer.Option("--noise-only", help="Only the noise columns, no source.")] = False,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the split and the noise.")] = 0,
    parts: PartsOpt = "q,k,v",
    bias: BiasOpt = False,
    layer_map: LayerMapOpt = None,
    split: SplitOpt = Split.all,
    pick_on_dev: Annotated[bool, typer.Option("--pick-on-dev", help="Sweep on dev, report the best point on test.")]
    = False,
    dev_fraction: DevFracOpt = 0.1,
    folds: FoldsOpt = None,
    limit: LimitOpt = None,
    strict: StrictOpt = False,
    text_field: TextFieldOpt = TextField.normalized,
    subset: SubsetOpt = None,
    text_column: TextColumnOpt = None,
    label_column: LabelColumnOpt = None,
    normalizer: NormalizerOpt = Normalizer.auto,
    beams: BeamsOpt = 1,
    language: LanguageOpt = None,
    label_map: LabelMapOpt = None,
    batch_size: BatchOpt = None,
    baseline: Annotated[str, typer.Option("--baseline", help="The row the paired statistics compare with: "
                                          "target (λ = 0) or LAYERS|λ|COLUMN of a sweep point.")] = "target",
    resamples: Annotated[int, typer.Option("--resamples", min=1, help="Paired bootstrap resamples of the 95 % "
                                           "interval.")] = 10000,
    cache_gb: CacheGbOpt = 4.0,
    align: AlignOpt = "none",
    fast: FastOpt = False,
    fmt: FormatOpt = Format.table,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Write the full JSON report here.")] = None,
    plot: PlotOpt = None,
    arch_map: ArchMapOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.float32,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Word error rate (CTC or Whisper) or classification error (audio events), optionally over a merge sweep.

    stdout: each model's error (λ, layers, source or noise; percent on the table, a fraction in CSV, TSV and
    JSON), its relative reduction, and the paired difference to the baseline with its 95 % interval.
    """
    import time

    from mamcli.checkpoint import resolve
    from mamcli.distributed import launched
    from mamcli.evaluate import EvalOptions, Evaluator, SweepOptions, evaluate_report, sweep
    from mamcli.report import write_evaluation
    from mamcli.search import pick_on_dev as pick

    started = time.perf_counter()
    procs = launched()  # under torchrun / accelerate launch: this process scores its share of the clips
    _logging(verbose and procs.main, quiet or not procs.main)
    opts = EvalOptions(task=task.value, normalizer=normalizer.value, batch_size=batch_size, strict=strict,
                       label_map=label_map, device=device, cache_gb=cache_gb, beams=beams, language=language,
                       dtype=dtype.value, fast=fast)
    sw = SweepOptions(lams=_floats(lam, "--lam"), layers=layers, blocks=blocks,
                      noises=[n.strip() for n in noise.split(",")] if noise else [], with_source=not noise_only,
                      seed=seed, parts=_parts(parts), bias=bias, layer_map=layer_map, baseline=baseline,
                      resamples=resamples, align=align)
    families = _families(arch_map)
    if pick_on_dev and split != Split.all:
        raise MamError("--pick-on-dev makes its own dev/test split; leave --split out")
    _check_report_paths(out, plot)
    with ExitStack() as stack:
        tgt = stack.enter_context(resolve(target))
        src = stack.enter_context(resolve(source)) if source else None
        if src is not None:  # wrong roles are known before any clip is read
            from mamcli.families import check_roles

            check_roles(src.arch(families), tgt.arch(families), src.spec, tgt.spec)
        first = "dev" if pick_on_dev else split.value
        corpus = _corpus(data, text_field, subset, text_column, label_column, dev_fraction, folds, limit, seed)
        sw.align_data = _activations(align, [src] if src else [], tgt, corpus, families, opts, quiet or not procs.main)
        stages = stack.enter_context(_Stages(quiet or not procs.main))
        if pick_on_dev:  # the selection is search's (one procedure): sweep on dev, the best point once on test
            ds = corpus.part("dev")
            result, ev, bad_clips = pick(tgt, src, ds, corpus.part("test"), opts, sw, families, progress=stages.note,
                                         ticker=stages.tick, processes=procs)
            rows = [{"split": part, **r} for part in ("dev", "test") for r in result[part]["table"]]
        else:
            ds = corpus.part(first)
            ev = Evaluator(tgt, ds, opts, progress=stages.note, ticker=stages.tick, processes=procs)
            bad_clips = list(ev.bad)
            result = sweep(ev, src, sw, families, progress=stages.note)
            rows = [{"split": first, **r} for r in result["table"]]
        report = evaluate_report(tgt, ds, ev, result, started, src)
    if "process" in report:  # under a launcher, only the main process reports
        return
    for b in bad_clips:
        _note(f"skipped clip {b['id']}: {b['error']}")
    sweep_result = result["dev"] if pick_on_dev else result
    metric = "wer" if "wer" in sweep_result["baseline"] else "error"
    people = fmt == Format.table
    _out(render(sweep_for_people(rows, metric) if people else sweep_for_files(rows, metric), fmt, width=120,
                title=_evaluate_title(metric, first, pick_on_dev, sw.baseline, sweep=bool(sweep_columns(rows)))))
    if out is not None:  # after the results: a full disk or a vanished folder loses no result
        write_evaluation(out, report, tgt.root)
    if plot is not None:
        from mamcli.plots import sweep_plot

        sweep_plot(sweep_result, metric, first, plot)


@app.command("search", epilog="Example: mam search whisper-tiny.en --source all-MiniLM-L6-v2 --data "
             "ljspeech:LJSpeech-1.1 --lam 0.05,0.1,0.2 --layers all --layers 0 --layer-map stride -o search.json")
def search_cmd(
    target: Annotated[str, typer.Argument(help="Speech or audio model to improve (CTC, Whisper or an audio-event "
                                          "classifier).")],
    data: DataOpt,
    source: Annotated[list[str], typer.Option("--source", help="Source model; give it several times and the "
                                              "sources race in one search (text and image alike).")],
    lam: Annotated[str, typer.Option("--lam", help="Comma list of λ in (0, 1]; λ = 0 always races.")]
    = "0.05,0.1,0.2,0.3",
    layers: Annotated[list[str] | None, typer.Option("--layers", help="One layer set per use: all | 12-19 | 0,3 | "
                                                     "top:K:ranking.json[:metric] (default: all).")] = None,
    blocks: Annotated[int | None, typer.Option("--blocks", min=1, help="Race consecutive blocks of N layers.")]
    = None,
    noise: Annotated[str | None, typer.Option("--noise", help="Noise columns that race too: source,target,normal "
                                              "(the test's control is noise:source either way).")] = None,
    parts: PartsOpt = "q,k,v",
    bias: BiasOpt = False,
    layer_map: LayerMapOpt = None,
    align: AlignOpt = "none",
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the split, the clip order, the noise and the "
                                      "bootstrap.")] = 0,
    dev_fraction: DevFracOpt = 0.3,
    budget_clips: Annotated[int | None, typer.Option("--budget-clips", min=1, help="Dev clip evaluations the race "
                                                     "may spend (default: 0.3× the full grid's, every candidate on "
                                                     "every dev clip; the first round always runs).")] = None,
    alpha: Annotated[float, typer.Option("--alpha", callback=_finite, help="Error rate of the race's drops "
                                         "together, and of the test comparison.")] = 0.05,
    folds: FoldsOpt = None,
    limit: LimitOpt = None,
    strict: StrictOpt = False,
    text_field: TextFieldOpt = TextField.normalized,
    subset: SubsetOpt = None,
    text_column: TextColumnOpt = None,
    label_column: LabelColumnOpt = None,
    normalizer: NormalizerOpt = Normalizer.auto,
    beams: BeamsOpt = 1,
    language: LanguageOpt = None,
    label_map: LabelMapOpt = None,
    fast: FastOpt = False,
    batch_size: BatchOpt = None,
    cache_gb: CacheGbOpt = 4.0,
    write: Annotated[Path | None, typer.Option("--write", help="On `helps`, write the picked merge here, as mam "
                                               "merge would; otherwise nothing is written.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier mam output in --write.")] = False,
    fmt: FormatOpt = Format.table,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Write the full JSON report here.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw each candidate's running error and bound "
                                              "against dev clips seen (PNG).")] = None,
    arch_map: ArchMapOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.float32,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Race merges on dev, confirm the pick once on test: helps, inconclusive or none (each exits 0).

    stdout: the verdict in one sentence, then each candidate's clips seen, running error, bound and the round it
    left (docs/search.md); CSV/TSV the same rows, JSON the whole report.
    """
    from mamcli.checkpoint import resolve
    from mamcli.distributed import launched
    from mamcli.evaluate import EvalOptions
    from mamcli.families import check_roles
    from mamcli.search import SearchOptions, search

    procs = launched()
    _logging(verbose and procs.main, quiet or not procs.main)
    opts = EvalOptions(normalizer=normalizer.value, batch_size=batch_size, strict=strict, label_map=label_map,
                       device=device, cache_gb=cache_gb, beams=beams, language=language, dtype=dtype.value,
                       fast=fast)
    so = SearchOptions(lams=_floats(lam, "--lam"), layers=layers or ["all"], blocks=blocks,
                       noises=[n.strip() for n in noise.split(",")] if noise else [], parts=_parts(parts), bias=bias,
                       layer_map=layer_map, seed=seed, alpha=alpha, budget_clips=budget_clips, align=align)
    replace(so, align=_without_data(so.align)).validate()  # the pooled states come later, from dev
    if blocks is not None and layers:
        raise MamError("--layers and --blocks do not mix")
    families = _families(arch_map)
    _check_report_paths(out, plot)  # every output is known writable before minutes of work
    if write is not None:
        from mamcli.writer import check_output_dir

        check_output_dir(write, force)
    corpus = _corpus(data, text_field, subset, text_column, label_column, dev_fraction, folds, limit, seed)
    with ExitStack() as stack:
        tgt = stack.enter_context(resolve(target))
        srcs = [stack.enter_context(resolve(s)) for s in source]
        for s in srcs:  # wrong roles are known before any clip is read
            check_roles(s.arch(families), tgt.arch(families), s.spec, tgt.spec)
        so.align_data = _activations(align, srcs, tgt, corpus, families, opts, quiet or not procs.main)
        with _Stages(quiet or not procs.main) as stages:  # closed before stdout: a live bar would take it
            report = search(tgt, srcs, corpus.part("dev"), corpus.part("test"), opts, so, families,
                            progress=stages.note, ticker=stages.tick, processes=procs)
        if not procs.main:  # under a launcher, only the main process reports and writes
            return
        _search_outputs(report, tgt, srcs, so, families, fmt, out, plot, write, force, quiet)


def _search_outputs(report: dict[str, Any], tgt: Any, srcs: list[Any], so: Any, families: tuple[Family, ...],
                    fmt: Any, out: Path | None, plot: Path | None, write: Path | None, force: bool,
                    quiet: bool) -> None:
    """stdout (the verdict first), then the merge on `helps`, the JSON report and the figure."""
    from mamcli.report import dumps, write_json
    from mamcli.search import race_intervals, race_rows, race_series, write_pick

    written = None
    if write is not None:
        written = write_pick(report, tgt, srcs, write, families, force, _command_line(), align_data=so.align_data)
        report["written"] = str(write) if written is not None else None
    if fmt == Format.json:
        _out(dumps(report))
    elif fmt == Format.table:
        _out(report["summary"] + "\n" + render(race_for_people(race_rows(report)), fmt, width=120,
                                                title="the race on dev"))
    else:
        _out(render(race_rows(report), fmt))
    if write is not None and not quiet:
        _note(f"wrote {write}" if written is not None else
              f"verdict {report['verdict']}: no merge written to {write}")
    if out is not None:
        write_json(out, report)
    if plot is not None:
        from mamcli.plots import line_plot

        line_plot(race_series(report), "dev clips seen", "running error", "mam search: the race on dev", plot,
                  intervals=race_intervals(report))


def _evaluate_title(metric: str, split: str, pick_on_dev: bool, baseline: str, sweep: bool) -> str:
    name = metric_name(metric)
    where = "on dev (the sweep) and test (the best point on dev)" if pick_on_dev else \
        "on all clips" if split == "all" else f"on the {split} split"
    if not sweep:
        return f"{name} in percent {where}"
    against = "λ = 0" if baseline == "target" else baseline
    return (f"{name} in percent {where}; rel. red.: relative error reduction; Δ: paired difference to {against} "
            "in percentage points, 95 % interval")


def _activations(align: str | Path, sources: list[Any], target: Any, corpus: Corpus, families: tuple[Family, ...],
                 opts: Any, quiet: bool) -> Any:
    """``--align activations`` of evaluate and search: the source's and target's pooled states on the dev clips
    (never test: what the merge is solved on must not be what confirms it); None for the other modes."""
    if align != "activations":
        return None
    if len(sources) != 1:
        raise MamError("--align activations pools one source's states: give exactly one --source (or --align "
                       "weights, which takes several)")
    from mamcli.align import collect_activations

    dev = corpus.part("dev")
    if not quiet:
        _note(f"--align activations: pooling {len(dev.items)} dev clips and their transcripts")
    stats = collect_activations(sources[0], target, dev, families, device=opts.device, batch_size=opts.batch_size,
                                dtype=opts.dtype, strict=opts.strict)
    stats.data = {**stats.data, "split": "dev"}  # the report says which clips the permutations saw
    return stats


def _check_report_paths(*paths: Path | None) -> None:
    """-o and --plot files must be writable before minutes of work, not found unwritable after them."""
    from mamcli.writer import check_writable

    for path in paths:
        if path is not None:
            check_writable(path)


@app.command("finetune", epilog="Example: mam finetune hubert-large --data ljspeech:LJSpeech-1.1 --source "
             "bert-large --learnable-lam --lam-init 0.1 -o ft-lmam/")
def finetune_cmd(
    target: Annotated[str, typer.Argument(help="Model to fine-tune: speech recognition, CTC (wav2vec 2.0, HuBERT) "
                                          "or sequence-to-sequence (Whisper), or an audio-event classifier (AST, "
                                          "BEATs).")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory (checkpoint, lams.json, report).")],
    task: Annotated[Task, typer.Option("--task", help="asr: speech recognition (CTC or Whisper), aec: audio-event "
                                       "classification, auto: from the model's head.")] = Task.auto,
    source: Annotated[str | None, typer.Option("--source", help="Source model: MAM or L-MAM.")] = None,
    learnable_lam: Annotated[bool, typer.Option("--learnable-lam", help="L-MAM: learn λ per layer.")] = False,
    lam_init: Annotated[float | None, typer.Option("--lam-init", min=0.0, max=1.0, callback=_finite,
                                                   help="Fixed λ (MAM) or starting λ (L-MAM).")] = None,
    layers: Annotated[str | None, typer.Option("--layers", help="Layers merged (default: all).")] = None,
    per_part: Annotated[bool, typer.Option("--per-part", help="Separate λ for Q, K and V.")] = False,
    layer_map: LayerMapOpt = None,
    parts: PartsOpt = "q,k,v",
    align: AlignOpt = "none",
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 1,
    lr: Annotated[float | None, typer.Option("--lr", callback=_positive,
                                             help="Default per head: 1e-5 for speech recognition, 1e-4 for audio "
                                             "events (measured: docs/finetune.md).")] = None,
    lam_lr: Annotated[float, typer.Option("--lam-lr", callback=_positive,
                                          help="Learning rate of the λ logits.")] = 1e-2,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1)] = 1,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Linear warm-up steps.")] = 0,
    freeze_feature_encoder: Annotated[bool, typer.Option("--freeze-feature-encoder")] = False,
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="Train for N optimizer steps, past "
                                                  "--epochs if need be (as transformers' Trainer); resumable.")]
    = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints.")]
    = 50,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run kept beside DIR (.DIR.mam-run).")]
    = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier mam output in DIR, once the new one "
                                        "is complete.")] = False,
    dev_fraction: DevFracOpt = 0.1,
    folds: FoldsOpt = None,
    limit: LimitOpt = None,
    text_field: TextFieldOpt = TextField.normalized,
    subset: SubsetOpt = None,
    text_column: TextColumnOpt = None,
    label_column: LabelColumnOpt = None,
    normalizer: NormalizerOpt = Normalizer.auto,
    freeze_decoder: Annotated[bool, typer.Option("--freeze-decoder", help="Whisper: train the encoder only.")]
    = False,
    language: LanguageOpt = None,
    beams: Annotated[int, typer.Option("--beams", min=1, help="Whisper: beam width of the dev decoding.")] = 1,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", min=0.0, callback=_finite,
                                                 help="Clip the gradients' total norm to this before each "
                                                 "optimizer step (0: no clipping).")] = 1.0,
    mixed_precision: Annotated[MixedPrecision, typer.Option("--mixed-precision", help="Accelerate's autocast of "
                                                            "the forward passes; fp16 needs a GPU, bf16 also runs "
                                                            "on the CPU.")] = MixedPrecision.no,
    log_with: Annotated[LogWith | None, typer.Option("--log-with", help="Also log every step to this tracker "
                                                     "(Accelerate's; needs its package).")] = None,
    device: DeviceOpt = "auto",
    fmt: FormatOpt = Format.table,
    arch_map: ArchMapOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune the target: plain, after MAM (--source --lam-init), or with learned λ (--learnable-lam).

    stdout: one row per epoch (loss, dev error), or the whole report with --format json.
    """
    from mamcli.checkpoint import resolve
    from mamcli.finetune import FinetuneOptions, finetune
    from mamcli.report import dumps

    _logging(verbose, quiet)
    with ExitStack() as stack:
        tgt = stack.enter_context(resolve(target))
        src = stack.enter_context(resolve(source)) if source else None
        opts = FinetuneOptions(task=task.value, lam_init=lam_init, learnable_lam=learnable_lam, layers=layers,
                               layer_map=layer_map, per_part=per_part, parts=_parts(parts), align=align,
                               epochs=epochs, lr=lr, lam_lr=lam_lr,  # lr None: the task's measured default
                               batch_size=batch_size, grad_accum=grad_accum, warmup=warmup,
                               freeze_feature_encoder=freeze_feature_encoder, seed=seed, max_steps=max_steps,
                               checkpoint_every=checkpoint_every, device=device, normalizer=normalizer.value,
                               freeze_decoder=freeze_decoder, language=language, beams=beams,
                               max_grad_norm=max_grad_norm, mixed_precision=mixed_precision.value,
                               log_with=log_with.value if log_with else None)
        corpus = _corpus(data, text_field, subset, text_column, label_column, dev_fraction, folds, limit, seed)
        train, dev = corpus.part("train"), corpus.part("dev")
        report = finetune(tgt, train, dev, opts, out, src, resume=resume, force=force,
                          families=_families(arch_map), progress=None if quiet else _note,
                          command=_command_line())
    if "process" not in report:  # under a launcher, only the main process reports
        rows = report.get("epochs") or [{k: report.get(k) for k in ("status", "step", "epoch", "resume")}]
        _out(dumps(report) if fmt == Format.json else render(rows, fmt, title=f"fine-tuned into {out}"))


@app.command("map", epilog="Example: mam map distilbert-base hubert-base --layer-map stride --format tsv")
def map_cmd(
    source: Annotated[str, typer.Argument(help="Source model.")],
    target: Annotated[str, typer.Argument(help="Target model.")],
    parts: PartsOpt = "q,k,v",
    bias: BiasOpt = False,
    layer_map: LayerMapOpt = None,
    fmt: FormatOpt = Format.table,
    revision: Annotated[str | None, typer.Option("--revision", help="Default hub revision (branch, tag or commit) "
                                                 "for models without their own @REV.")] = None,
    arch_map: ArchMapOpt = None,
) -> None:
    """Print every source→target tensor pair with shapes, and the target attention tensors left unmapped."""
    from mamcli.checkpoint import resolve
    from mamcli.merge import MergeOptions, plan_merge

    options = MergeOptions(lam=1.0, parts=_parts(parts), bias=bias, layer_map=layer_map)
    with resolve(source, revision) as src, resolve(target, revision) as tgt:
        plan = plan_merge(src, tgt, options, _families(arch_map))
    _print_plan(plan, fmt, with_lam=False)


@app.command("verify", epilog="Example: mam verify out/ --format tsv")
def verify_cmd(directory: Annotated[Path, typer.Argument(help="A `mam merge` or `mam finetune` output folder.")],
               fmt: FormatOpt = Format.table) -> None:
    """Recompute the sha256 of every file in the output and check them against its mam_report.json."""
    from mamcli.merge import verify_dir
    from mamcli.report import dumps

    result = verify_dir(directory)
    rows = [{"file": f, "status": r["status"], "sha256": r["actual"]} for f, r in result["files"].items()]
    rows += [{"file": f, "status": "not in the report", "sha256": None} for f in result["extra"]]
    _out(dumps(result) if fmt == Format.json else render(rows, fmt, title=f"{directory}"))
    if not result["ok"]:
        by_status: dict[str, list[str]] = {}
        for row in rows:
            if row["status"] != "ok":
                by_status.setdefault(row["status"], []).append(row["file"])
        raise MamError(f"{directory}: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in by_status.items()))


@app.command("models", epilog="Example: mam models --format csv")
def models_cmd(fmt: FormatOpt = Format.table) -> None:
    """List the model aliases and the hub ids they stand for."""
    from mamcli.aliases import ALIASES

    rows = [{"alias": a, "hub_id": h, "about": d} for a, (h, d) in ALIASES.items()]
    _out(render(rows, fmt))


@app.command("families", epilog="Example: mam families --arch-map my-family.toml")
def families_cmd(fmt: FormatOpt = Format.table, arch_map: ArchMapOpt = None) -> None:
    """List the architecture families and where they keep Q/K/V."""
    rows = [{"family": f.name, "modality": f.modality, "model_types": ",".join(f.model_types),
             "q_weight": " | ".join(f"{lay.layer}.{lay.module('q')}.weight" for lay in f.layouts),
             "about": f.description} for f in _families(arch_map)]
    _out(render(rows, fmt))


SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
ARGV: list[str] = []  # this run's arguments, for model cards


@contextmanager
def _signals_raise() -> Iterator[None]:
    """Ctrl-C, kill and a closed terminal raise :class:`Interrupted` where the program is, so temporary
    output is removed and a fine-tune saves its state; the exit code is then 128 + the signal's number."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    nums = [getattr(signal, name) for name in SIGNALS if hasattr(signal, name)]
    previous = {n: signal.signal(n, raise_interrupted) for n in nums}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(n, handler)


class StdoutError(MamError):
    """stdout is closed or full: results cannot be delivered."""


def _out(text: str) -> None:
    """Results to stdout, flushed, so a full or closed stdout is an error of its own (exit 1), named."""
    try:
        sys.stdout.write(printable(text))
        sys.stdout.flush()
    except OSError as e:
        with contextlib.suppress(OSError):  # point fd 1 at /dev/null: the exit flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise StdoutError(f"cannot write to standard output: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the Typer app, turning every failure into one line and an exit code:
    1 bad input or a failure of the machine (disk full, read-only), 2 usage, 3 a bug, 128 + N signal N."""
    ARGV[:] = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    command = typer.main.get_command(app)
    debug = bool(os.environ.get("MAM_DEBUG"))
    code = 0
    try:
        with _signals_raise():
            rv = command.main(args=argv, prog_name="mam", standalone_mode=False)
            code = rv if isinstance(rv, int) else 0  # typer.Exit / --help come back as a return value
            _out("")
    except MamError as e:
        if debug:
            raise
        err.print(f"mam: error: {e}", markup=False, soft_wrap=True)
        code = e.exit_code
    except Interrupted as e:
        err.print(f"mam: interrupted by {e}; nothing half-written was left", markup=False)
        code = 128 + e.signum
    except (KeyboardInterrupt, typer.Abort):
        err.print("mam: interrupted; nothing half-written was left", markup=False)
        code = 130
    except typer.Exit as e:
        code = e.exit_code
    except OSError as e:  # the machine, not a bug: disk full, read-only file system, permissions
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        err.print(f"mam: error: {where}{e.strerror or e}", markup=False, soft_wrap=True)
        code = 1
    except Exception as e:
        usage = getattr(e, "format_message", None)
        if callable(usage) and isinstance(getattr(e, "exit_code", None), int):  # usage errors (typer's own click)
            # `mam` or `mam merge` alone: the help itself, not dressed as an error line
            err.print(usage() if isinstance(e, NoArgsIsHelpError) else f"mam: error: {usage()}", markup=False,
                      soft_wrap=True)
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        if debug:  # a bug, not bad input: still one line, with the way to the traceback
            raise
        err.print(f"mam: internal error: {type(e).__name__}: {e} (MAM_DEBUG=1 shows the traceback)",
                  markup=False, soft_wrap=True)
        code = 3
    from mamcli.distributed import leave

    leave(code)  # under a launcher: waits for the other processes, then ends this one (no return)
    if argv is None:  # the console script: the process ends here
        # The interpreter's last garbage collections walk every object torch and transformers made: 1.0-1.4 s
        # after the work is done, a sixth of a one-clip evaluation. Frozen objects are left to the operating
        # system; exit handlers, flushes and module teardown still run (0.24 s).
        gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    main()
