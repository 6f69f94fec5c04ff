"""Layer selections and per-layer λ schedules, as users write them on the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mamcli.errors import MamError
from mamcli.schemas import LAMS, LamsFile, Ranking, check, read_json, read_text


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """``None``/``all`` → every layer; ``12-19``; ``0,3,5``; mixes like ``0-3,8``; ``top:K:FILE[:METRIC]``."""
    if spec is None or spec.strip() == "all":
        return list(range(num_layers))
    spec = spec.strip()
    if spec.startswith("top:"):
        return top_layers(spec, num_layers)
    layers: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not m:
            raise MamError(f"bad layer spec {spec!r}: use a block like 12-19, a list like 0,3,5, or top:K:ranking.json")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if lo > hi:
            raise MamError(f"bad layer spec {spec!r}: block {lo}-{hi} runs backwards")
        layers.extend(range(lo, hi + 1))
    bad = [i for i in layers if i >= num_layers]
    if bad:
        raise MamError(f"layer {bad[0]} is out of range: the target has layers 0-{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise MamError(f"bad layer spec {spec!r}: a layer is listed twice")
    return sorted(layers)


def layers_spec(layers: list[int]) -> str:
    """The shortest spec ``parse_layers`` reads back: ``[0, 1, 2, 5]`` → ``0-2,5``."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def top_layers(spec: str, num_layers: int) -> list[int]:
    """``top:K:ranking.json[:metric]`` → the K best layers of a ``mam rank-layers`` report."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or not parts[1].isdigit() or int(parts[1]) < 1:
        raise MamError(f"bad layer spec {spec!r}: use top:K:ranking.json[:metric] with K ≥ 1")
    k, path = int(parts[1]), Path(parts[2])
    report = check(Ranking, read_json(path, "ranking file"), path, "ranking file (a `mam rank-layers` report)")
    metrics = report.metrics
    metric = parts[3] if len(parts) == 4 else report.primary_metric or next(iter(metrics))
    if metric not in metrics:
        raise MamError(f"{path} has no metric {metric!r} (it has {', '.join(metrics)})")
    order = metrics[metric].order
    if k > len(order):
        raise MamError(f"top:{k} asks for more layers than {path} ranks ({len(order)})")
    chosen = sorted(order[:k])
    if chosen and chosen[-1] >= num_layers:
        raise MamError(f"{path} ranks layer {chosen[-1]}, but the target has layers 0-{num_layers - 1}")
    return chosen


def parse_layer_map(spec: str | None, n_source: int, n_target: int) -> list[int]:
    """Source layer feeding each target layer. Equal depths map i→i; other depths need a spec."""
    if spec is None:
        if n_source != n_target:
            raise MamError(f"the source has {n_source} layers and the target {n_target}; say which source layer "
                           "feeds which target layer with --layer-map stride|first|last|LIST")
        return list(range(n_target))
    spec = spec.strip()
    if spec == "stride":  # spread the source depth evenly over the target depth
        return [min(n_source - 1, (i * n_source) // n_target) for i in range(n_target)]
    if spec in ("first", "last"):
        if n_target > n_source:
            raise MamError(f"--layer-map {spec} needs a source at least as deep as the target "
                           f"({n_source} < {n_target}); use stride or a list")
        offset = 0 if spec == "first" else n_source - n_target
        return [i + offset for i in range(n_target)]
    try:
        mapping = [int(x) for x in spec.split(",")]
    except ValueError:
        raise MamError(f"bad --layer-map {spec!r}: use stride, first, last or a comma list of source layers") from None
    if len(mapping) != n_target:
        raise MamError(f"--layer-map lists {len(mapping)} source layers but the target has {n_target}")
    bad = [i for i in mapping if not 0 <= i < n_source]
    if bad:
        raise MamError(f"--layer-map names source layer {bad[0]}, but the source has layers 0-{n_source - 1}")
    return mapping


def check_lam(lam: float, what: str = "λ") -> float:
    if not 0.0 <= lam <= 1.0 or lam != lam:
        raise MamError(f"{what} must lie in [0, 1], got {lam}")
    return float(lam)


def uniform_lams(lam: float, layers: list[int], parts: tuple[str, ...]) -> dict[int, dict[str, float]]:
    """Eq. 1 on the listed layers (Eq. 2: λ = 0, i.e. untouched, elsewhere)."""
    check_lam(lam)
    return {i: dict.fromkeys(parts, lam) for i in layers}


def load_lams(path: str | Path, num_layers: int, parts: tuple[str, ...]) -> dict[int, dict[str, float]]:
    """Per-layer λ from a file: ``lams.json`` of ``mam finetune``, a JSON list, or one number per line.

    JSON forms: ``[λ0, λ1, …]``, ``{"lams": [...]}``, ``{"lams": {"q": [...], "k": [...], "v": [...]}}``,
    or a ``mam_report.json`` (its ``recipe.lams``).
    """
    p = Path(path)
    text = read_text(p, "λ file")
    try:
        data: Any = json.loads(text)
    except ValueError:
        try:
            data = [float(x) for x in text.split()]
        except ValueError:
            raise MamError(f"λ file {p}: expected JSON or one λ per line") from None
    parsed = check(LAMS, data, p, "λ file")
    table = parsed if isinstance(parsed, list) else (
        parsed.lams if isinstance(parsed, LamsFile) else parsed.recipe.lams)
    if isinstance(table, list):
        per_part: dict[str, list[float]] = dict.fromkeys(parts, table)
    else:
        missing = [q for q in parts if q not in table]
        if missing:
            raise MamError(f"{p}: no λ list for part(s) {', '.join(missing)}")
        per_part = {q: table[q] for q in parts}  # type: ignore[index]
    lams: dict[int, dict[str, float]] = {}
    for part, values in per_part.items():
        if len(values) != num_layers:
            raise MamError(f"{p}: {len(values)} λ values for part {part}, but the target has {num_layers} layers")
        for i, lam in enumerate(values):
            if lam:
                lams.setdefault(i, {})[part] = float(lam)
    return lams
