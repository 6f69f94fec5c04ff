"""The merge itself: plan which tensors meet, interpolate them, and stream the result to disk.

Per target layer i and part p: ``W = λ_i · W_source + (1 − λ_i) · W_target`` computed in float32
exactly as written (so tests can check it to the bit), then cast to the output dtype. Every
tensor that is not merged is copied as the target's raw bytes. With ``align`` the source (or the
noise standing in for it) is first re-indexed by permutations (:mod:`mamcli.align`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mamcli.align import (
    ALIGN_FILE,
    ALIGN_MODES,
    ActivationStats,
    Alignment,
    check_alignable,
    gather_layers,
    load_alignment,
    solve_activations,
    solve_weights,
)
from mamcli.card import write_card
from mamcli.checkpoint import Checkpoint, TensorInfo, iter_copyable_files
from mamcli.errors import MamError
from mamcli.families import FAMILIES, KINDS, PARTS, Arch, Family, check_compatible, check_roles
from mamcli.layers import check_lam, load_lams, parse_layer_map, parse_layers, uniform_lams
from mamcli.recipe import RECIPE_FILE, dump_recipe
from mamcli.report import peak_rss_mib, versions, write_json
from mamcli.writer import REPORT_FILE, OutTensor, SafetensorsWriter, atomic_output_dir, hash_tree, tensor_bytes

NOISE_KINDS = ("source", "target", "normal")
OUT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --out-dtype names


class TensorStore(Protocol):
    """What the planner needs from a model: a checkpoint on disk or a model in memory."""

    spec: str
    config: dict[str, Any]
    infos: Mapping[str, TensorInfo]

    def get(self, name: str) -> torch.Tensor: ...

    def arch(self, families: tuple[Family, ...] = FAMILIES) -> Arch: ...


@dataclass
class MergeOptions:
    """What to merge. ``lam`` + ``layers`` (Eq. 1/2), or ``lams_file``/``lams`` (per layer, per part)."""

    lam: float | None = None
    layers: str | None = None
    lams_file: str | Path | None = None
    lams: dict[int, dict[str, float]] | None = None
    parts: tuple[str, ...] = ("q", "k", "v")
    bias: bool = False
    noise: str | None = None
    seed: int = 0
    layer_map: str | None = None
    # none | weights | activations, or a mam_align.json to replay; activations read ``align_data``
    align: str | Path = "none"
    align_data: ActivationStats | None = None

    def resolve_lams(self, num_layers: int) -> dict[int, dict[str, float]]:
        given = [x is not None for x in (self.lam, self.lams_file, self.lams)]
        if sum(given) != 1:
            raise MamError("give exactly one of --lam or --lams")
        if self.lams_file is not None:
            if self.layers is not None:
                raise MamError("--layers and --lams do not mix: the λ file already sets every layer")
            return load_lams(self.lams_file, num_layers, self.parts)
        if self.lams is not None:
            for i, per_part in self.lams.items():
                if not 0 <= i < num_layers:
                    raise MamError(f"layer {i} is out of range: the target has layers 0-{num_layers - 1}")
                for part, lam in per_part.items():
                    check_lam(lam, f"λ of layer {i} part {part}")
            return self.lams
        assert self.lam is not None
        return uniform_lams(self.lam, parse_layers(self.layers, num_layers), self.parts)

    def validate(self) -> None:
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise MamError(f"--parts takes a comma list of {', '.join(PARTS)}; got {','.join(self.parts) or 'nothing'}")
        if self.noise is not None and self.noise not in NOISE_KINDS:
            raise MamError(f"--noise must be one of {', '.join(NOISE_KINDS)}; got {self.noise!r}")
        if isinstance(self.align, str) and self.align not in ALIGN_MODES and not self.align.endswith(".json"):
            raise MamError(f"--align must be one of {', '.join(ALIGN_MODES)} or a {ALIGN_FILE}; got {self.align!r}")
        if self.align == "activations" and self.align_data is None:
            raise MamError("--align activations needs paired data (speech clips with transcripts): give --data")


@dataclass(frozen=True)
class Pair:
    """One merged logical tensor: target layer/part/kind fed by a source tensor (rows for fused qkv)."""

    layer: int
    source_layer: int
    part: str
    kind: str
    lam: float
    source: str
    source_rows: tuple[int, int] | None
    target: str
    target_rows: tuple[int, int] | None
    shape: tuple[int, ...]


@dataclass
class MergePlan:
    source: Arch
    target: Arch
    options: MergeOptions
    layer_map: list[int]
    lams: dict[int, dict[str, float]]
    pairs: list[Pair]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    alignment: Alignment | None = None  # solved (or read) once, by the first MergedTensors of this plan

    def lam_table(self) -> dict[str, list[float]]:
        """Per part, λ of every target layer (0 = untouched): what ``--lams`` reads back."""
        return {p: [self.lams.get(i, {}).get(p, 0.0) for i in range(self.target.num_layers)]
                for p in self.options.parts}

    def by_target(self) -> dict[str, list[Pair]]:
        groups: dict[str, list[Pair]] = {}
        for p in self.pairs:
            groups.setdefault(p.target, []).append(p)
        return groups

    def recipe(self) -> dict[str, Any]:
        o = self.options
        recipe = {"parts": list(o.parts), "bias": o.bias, "noise": o.noise, "seed": o.seed,
                  "layers": sorted(self.lams), "layer_map": self.layer_map, "lams": self.lam_table(),
                  "formula": "W = lam * W_source + (1 - lam) * W_target (float32)"}
        if self.alignment is not None:  # absent when unaligned, so unaligned outputs keep their bytes
            recipe.update(align=self.alignment.mode, align_file=ALIGN_FILE,
                          formula="W = lam * W_source[rows][:, hidden] + (1 - lam) * W_target (float32)")
        return recipe


def _ref(store: TensorStore, arch: Arch, i: int, part: str, kind: str) -> tuple[str, tuple[int, int] | None] | None:
    name = arch.tensor(i, part, kind)
    if name not in store.infos:
        return None
    if not arch.fused_part(part):
        return name, None
    rows = store.infos[name].shape[0] // 3
    j = ("q", "k", "v").index(part)
    return name, (j * rows, (j + 1) * rows)


def _logical_shape(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, ...]:
    return info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])


def plan_merge(source: TensorStore, target: TensorStore, options: MergeOptions,
               families: tuple[Family, ...] = FAMILIES) -> MergePlan:
    """Check compatibility and list every (source → target) tensor pair with its λ."""
    options.validate()
    src, tgt = source.arch(families), target.arch(families)
    if options.noise not in ("target", "normal"):  # those noises take only shapes from the source
        check_roles(src, tgt, source.spec, target.spec)
    notes = check_compatible(src, tgt, source.spec, target.spec)
    layer_map = parse_layer_map(options.layer_map, src.num_layers, tgt.num_layers)
    lams = options.resolve_lams(tgt.num_layers)
    kinds = KINDS if options.bias else ("weight",)
    pairs: list[Pair] = []
    skipped: list[dict[str, Any]] = []
    for i in sorted(lams):
        j = layer_map[i]
        for part in options.parts:
            lam = lams[i].get(part, 0.0)
            if lam == 0.0:
                continue
            for kind in kinds:
                s_ref = _ref(source, src, j, part, kind)
                t_ref = _ref(target, tgt, i, part, kind)
                if s_ref is None or t_ref is None:
                    if kind == "weight":
                        missing = src.tensor(j, part, kind) if s_ref is None else tgt.tensor(i, part, kind)
                        raise MamError(f"tensor {missing} is missing, so part {part} cannot be merged")
                    skipped.append({"layer": i, "part": part, "kind": kind,
                                    "reason": "source has no bias" if s_ref is None else "target has no bias"})
                    continue
                s_shape = _logical_shape(source.infos[s_ref[0]], s_ref[1])
                t_shape = _logical_shape(target.infos[t_ref[0]], t_ref[1])
                if s_shape != t_shape:
                    raise MamError(f"shapes differ: source {s_ref[0]} is {list(s_shape)}, target {t_ref[0]} is "
                                   f"{list(t_shape)}")
                pairs.append(Pair(i, j, part, kind, lam, s_ref[0], s_ref[1], t_ref[0], t_ref[1], t_shape))
    plan = MergePlan(src, tgt, options, layer_map, lams, pairs, skipped, unmapped_attention(target, tgt, options),
                     notes)
    if options.align != "none":
        check_alignable(plan)
    return plan


def unmapped_attention(target: TensorStore, arch: Arch, options: MergeOptions) -> list[str]:
    """Target attention tensors that the chosen parts/bias never touch, whatever the layers."""
    kinds = KINDS if options.bias else ("weight",)
    mapped = {arch.tensor(i, p, k) for i in range(arch.num_layers) for p in options.parts for k in kinds}
    prefixes = tuple(arch.attention_prefix(i) for i in range(arch.num_layers))
    return [n for n in target.infos if n.startswith(prefixes) and n not in mapped]


# ---- the arithmetic -------------------------------------------------------------------------

def interpolate(source: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 1 in float32: ``lam * s + (1 - lam) * t``, the same IEEE operations with one temporary fewer."""
    merged = source.to(torch.float32).mul(lam)
    return merged.add_(target.to(torch.float32).mul(1.0 - lam))


def noise_seed(seed: int, key: str) -> int:
    """A per-tensor seed, so noise does not depend on the order tensors are visited."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def noise_like(kind: str, source: torch.Tensor | None, target: torch.Tensor, seed: int, key: str) -> torch.Tensor:
    """Noise standing in for the source: N(0,1), or with exactly the mean/std of the source or target tensor."""
    g = torch.Generator().manual_seed(noise_seed(seed, key))
    z = torch.randn(target.shape, generator=g, dtype=torch.float32)
    if kind == "normal":
        return z
    ref = (source if kind == "source" else target)
    assert ref is not None
    ref32 = ref.to(torch.float32)
    if z.numel() > 1:
        z = (z - z.mean()) / z.std()
        return z * ref32.std() + ref32.mean()
    return z + ref32.mean()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a32, b32 = a.reshape(-1).to(torch.float32), b.reshape(-1).to(torch.float32)
    denom = float(a32.norm()) * float(b32.norm())
    return float(torch.dot(a32, b32)) / denom if denom > 0 else 0.0


def _finite(t: torch.Tensor, name: str, model: str) -> None:
    """NaN or Inf in a tensor the formula reads would spread into every merged weight: refuse, naming it."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise MamError(f"{model}: tensor {name} holds {bad} NaN/Inf value(s); mam will not merge it")


def _rows(t: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return t if rows is None else t[rows[0]:rows[1]]


class MergedTensors:
    """Computes merged float32 tensors for a plan, one target tensor at a time."""

    def __init__(self, plan: MergePlan, source: TensorStore, target: TensorStore) -> None:
        self.plan, self.source, self.target = plan, source, target
        self.groups = plan.by_target()
        self._cache: tuple[str, torch.Tensor] | None = None  # fused source tensors serve three parts
        self.stats: list[dict[str, Any]] = []
        if plan.options.align != "none" and plan.alignment is None:
            plan.alignment = self._solve_alignment()

    def _source(self, name: str) -> torch.Tensor:
        if self._cache is None or self._cache[0] != name:
            self._cache = (name, self.source.get(name))
        return self._cache[1]

    def donor(self, p: Pair, t: torch.Tensor) -> torch.Tensor:
        """What the formula reads as the source for ``p``: the source's rows, or noise in their place."""
        noise = self.plan.options.noise
        s_real = None if noise in ("target", "normal") else \
            _rows(self._source(p.source), p.source_rows).to(t.device)
        _finite(t, p.target, self.target.spec)
        if s_real is not None:
            _finite(s_real, p.source, self.source.spec)
        if noise is None:
            assert s_real is not None
            return s_real
        return noise_like(noise, s_real, t.cpu(), self.plan.options.seed, f"{p.layer}.{p.part}.{p.kind}").to(t.device)

    def _solve_alignment(self) -> Alignment:
        """Permutations for the donor actually merged, so noise donors are aligned by the same procedure."""
        o = self.plan.options
        heads = check_alignable(self.plan)
        if o.align not in ("weights", "activations"):
            return load_alignment(Path(o.align), self.plan)

        def pair_tensors(p: Pair) -> tuple[torch.Tensor, torch.Tensor]:
            t = _rows(self.target.get(p.target).to(torch.float32), p.target_rows)
            return t, self.donor(p, t)

        layers = gather_layers(self.plan, pair_tensors)
        if o.align == "weights":
            return solve_weights(layers, heads)
        assert o.align_data is not None
        return solve_activations(layers, heads, o.align_data)

    def compute(self, name: str, target_tensor: torch.Tensor | None = None) -> torch.Tensor:
        pairs = self.groups[name]
        t_full = (self.target.get(name) if target_tensor is None else target_tensor).to(torch.float32)
        out = t_full.clone() if pairs[0].target_rows is not None else None
        noise, alignment = self.plan.options.noise, self.plan.alignment
        for p in pairs:
            t = _rows(t_full, p.target_rows)
            s = self.donor(p, t)
            if alignment is not None:
                s = alignment.apply(p, s)
            merged = interpolate(s, t, p.lam)
            self.stats.append({"target": p.target, "source": p.source if noise is None else f"noise:{noise}",
                               "layer": p.layer, "source_layer": p.source_layer, "part": p.part, "kind": p.kind,
                               "lam": p.lam, "delta_norm": float((merged - t).norm()), "cosine": cosine(s, t)})
            if out is None:
                out = merged
            else:
                out[p.target_rows[0]:p.target_rows[1]] = merged  # type: ignore[index]
        assert out is not None
        return out


def solve_alignment(plan: MergePlan, source: TensorStore, target: TensorStore) -> Alignment | None:
    """The plan's alignment, solved now if ``align`` asks for one: for code that reads source tensors itself
    (L-MAM's λ parametrizations) and must apply ``plan.alignment.apply(pair, tensor)`` to them."""
    if plan.options.align != "none" and plan.alignment is None:
        MergedTensors(plan, source, target)
    return plan.alignment


# ---- to disk --------------------------------------------------------------------------------

@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """The merge arithmetic is element-wise and memory-bound: a second torch thread only takes the core
    the hashing thread needs (measured: about 30% faster merges on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _output_order(target: Checkpoint) -> list[TensorInfo]:
    """Target tensors in on-disk order, so untouched bytes are read sequentially."""
    order = {p: k for k, p in enumerate(target.files)}
    return sorted(target.infos.values(), key=lambda t: (order[t.file], t.start or 0))


def merge_to_dir(source: Checkpoint, target: Checkpoint, options: MergeOptions, out: Path, *,
                 force: bool = False, shard_size: int | None = None, out_dtype: torch.dtype | None = None,
                 families: tuple[Family, ...] = FAMILIES,
                 progress: Callable[[int, int], None] | None = None,
                 note: Callable[[str], None] | None = None,
                 recipe_extra: Mapping[str, Any] | None = None, command: str | None = None) -> dict[str, Any]:
    """Merge and write ``out`` atomically: safetensors weights, target's config/processor files, report.
    ``force`` replaces only an earlier mam output, never an input (:func:`mamcli.writer.check_replaceable`).
    Beside the weights: ``mam_recipe.yaml``, which ``mam merge --config`` replays to the same bytes, and a
    model card (README.md) naming ``command``."""
    started = time.perf_counter()
    plan = plan_merge(source, target, options, families)
    infos = _output_order(target)
    dtype_of = {t.name: out_dtype if out_dtype is not None and t.dtype.is_floating_point else t.dtype for t in infos}
    planned = [OutTensor(t.name, dtype_of[t.name], t.shape) for t in infos]
    total = sum(t.nbytes for t in planned)
    merged = MergedTensors(plan, source, target)  # solves the alignment, which the recipe names
    recipe = plan.recipe()
    refs = {"source": model_ref(source), "target": model_ref(target)}
    metadata = {"format": "pt", "mam_recipe": json.dumps({**refs, **recipe}, separators=(",", ":"))}
    with _one_torch_thread(), ThreadPoolExecutor(max_workers=1) as pool, \
            atomic_output_dir(out, force, (source.root, target.root), note=note) as tmp:
        # hashing the inputs overlaps the writes (hashlib releases the GIL)
        hashes = {"source": pool.submit(source.weight_hashes), "target": pool.submit(target.weight_hashes)}
        writer = SafetensorsWriter(tmp, planned, metadata, shard_size)
        try:
            done = 0
            for info in infos:
                if info.name in merged.groups:
                    data = tensor_bytes(merged.compute(info.name).to(dtype_of[info.name]))
                elif dtype_of[info.name] != info.dtype:
                    data = tensor_bytes(target.get(info.name).to(dtype_of[info.name]))
                else:
                    data = target.raw(info.name)
                writer.write(info.name, data)
                done += info.nbytes
                if progress:
                    progress(done, total)
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        for f in iter_copyable_files(target.root) if target.fmt != "beats" else ():  # never a mam_align.json
            shutil.copy2(f, tmp / f.name)
        align = _write_alignment(plan, tmp, out)
        if target.fmt == "beats":  # the official layout too, loadable by the release's own code
            files[target.files[0].name] = write_beats_pt(tmp / target.files[0].name, tmp, target)
        (tmp / RECIPE_FILE).write_text(dump_recipe({
            **refs, "lams": plan.lam_table(), "parts": list(options.parts), "bias": options.bias,
            "noise": options.noise, "seed": options.seed, "layer_map": plan.layer_map,
            "out_dtype": {v: k for k, v in OUT_DTYPES.items()}[out_dtype] if out_dtype else None,
            "shard_size": shard_size, **align, **(recipe_extra or {})}), encoding="utf-8")
        if out_dtype is not None and (tmp / "config.json").is_file():
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["dtype" if "dtype" in cfg else "torch_dtype"] = str(out_dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        report = {
            "command": "merge",
            "inputs": {"source": _describe(source, plan.source, hashes["source"].result()),
                       "target": _describe(target, plan.target, hashes["target"].result())},
            "recipe": recipe,
            "tensors": merged.stats,
            "skipped": plan.skipped,
            "unmapped_target_attention": plan.unmapped,
            "notes": plan.notes,
            **({"alignment": plan.alignment.summary()} if plan.alignment is not None else {}),
            "outputs": {"files": files, "dtype": str(out_dtype).removeprefix("torch.") if out_dtype else "target"},
            "versions": versions(),
            "wall_time_s": round(time.perf_counter() - started, 3),
            "peak_rss_mib": peak_rss_mib(),
        }
        write_card(tmp, report, command)
        report["outputs"]["copied"] = sorted(p.name for p in tmp.iterdir() if p.name not in files)
        report["outputs"]["hashes"] = hash_tree(tmp, known=files)
        write_json(tmp / REPORT_FILE, report)
    report["output_dir"] = str(out)
    return report


def _write_alignment(plan: MergePlan, tmp: Path, out: Path) -> dict[str, str]:
    """``mam_align.json`` beside the weights, and the recipe entry that replays it (the stored permutations, no
    solve and no data), so ``merge --config`` writes the same bytes."""
    if plan.alignment is None:
        return {}
    (tmp / ALIGN_FILE).write_text(plan.alignment.dumps(), encoding="utf-8")
    return {"align": str(out.expanduser().absolute() / ALIGN_FILE)}


def model_ref(ckpt: Checkpoint) -> str:
    """An exact reference to a model: a hub id pinned to its commit, or an absolute path (recipes, metadata)."""
    if ckpt.hub_id:
        return f"{ckpt.hub_id}@{ckpt.revision}" if ckpt.revision else ckpt.hub_id
    return str(Path(ckpt.spec).expanduser().absolute())


def write_beats_pt(path: Path, directory: Path, target: Checkpoint) -> str:
    """``{"cfg": …, "model": …}`` plus the target's other entries, from the safetensors just written."""
    from safetensors.torch import load_file

    from mamcli.checkpoint import sha256_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    cfg = {k: v for k, v in target.config.items() if k != "model_type"}
    torch.save({**target.extras, "cfg": cfg, "model": state}, path)
    return sha256_file(path, use_cache=False)


def _describe(ckpt: Checkpoint, arch: Arch, hashes: dict[str, str]) -> dict[str, Any]:
    return {**ckpt.describe(), "sha256": hashes, "family": arch.family.name, "model_type": arch.model_type,
            "layers": arch.num_layers, "hidden": arch.hidden, "heads": arch.heads, "prefix": arch.prefix}


def verify_dir(out: Path) -> dict[str, Any]:
    """Recompute the sha256 of every file a mam output holds (weights, config, tokenizer, λ file) and compare
    with its report; a file the report names that is gone is "missing", a file it does not name "extra"."""
    report_path = out / REPORT_FILE
    try:
        report = json.loads(report_path.read_text())
        outputs = report["outputs"]
        expected: dict[str, str] = outputs.get("hashes") or outputs["files"]
        if not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values()):
            raise TypeError
    except FileNotFoundError:
        raise MamError(f"{report_path} does not exist: is {out} a mam output?") from None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise MamError(f"{report_path} is not a mam report (no outputs.hashes)") from None
    except OSError as e:
        raise MamError(f"cannot read {report_path}: {e.strerror}") from None
    actual = hash_tree(out)
    results = {}
    for name, digest in expected.items():
        got = actual.get(name)
        status = "ok" if got == digest else ("missing" if got is None else "hash mismatch")
        results[name] = {"expected": digest, "actual": got, "ok": status == "ok", "status": status}
    extra = sorted(set(actual) - set(expected)) if "hashes" in outputs else []
    return {"dir": str(out), "ok": all(r["ok"] for r in results.values()) and not extra, "files": results,
            "extra": extra}
