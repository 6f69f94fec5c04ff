"""mam search on the real pair: its cost against the full grid, its answer, and a positive control at the same budget.

1. real: all-MiniLM-L6-v2 into whisper-tiny.en on LJ Speech (385 clips, --dev-fraction 0.3, seed 0), λ ∈ {0.05,
   0.1, 0.2, 0.3} × layers {all, 0, 1, 2, 3}, --layer-map stride (MiniLM layers 0,1,3,4 → Whisper 0-3), as
   benchmarks/results.sh runs the grid. Targets (issue 25): the default budget spends ≤ 0.3× the full grid's dev
   clip evaluations, and the answer agrees with the grid (no merge helps there: `none`, or `inconclusive`).
2. control: the same pair and grid at the same budget, with a known answer. The target is whisper-tiny.en whose
   encoder Q/K/V weights W were damaged by Gaussian noise E (``--damage`` × each tensor's std); the source is MiniLM
   holding W − 9E in the tensors the merge maps onto them, so λ = 0.1 on all layers restores W (0.1 (W − 9E) +
   0.9 (W + E) = W), a point of the same grid. Target: the search finds it and test confirms it (`helps`).

Per part: verdict, sentence, pick, cost (clip evaluations against the full grid), how many candidates each round
dropped and why, and wall time. Results: benchmarks/results/search_bench.json (each part replaces its own key).
CPU-heavy (Whisper decodes greedily, up to its token bound on a looping merge): run one thread per process on a
shared machine. Per-clip results are kept (MAM_CACHE_DIR), so an interrupted run resumes.
Usage: OMP_NUM_THREADS=1 python benchmarks/search_bench.py [--part real|control|all] [--damage 0.5]
       [--budget-clips N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work" / "search"
OUT = HERE / "results" / "search_bench.json"
TARGET = ROOT.parent / "shared" / "models" / "whisper-tiny.en"
SOURCE = ROOT / ".cache" / "models" / "all-MiniLM-L6-v2"
LJ = f"ljspeech:{ROOT.parent}/shared/data/ljspeech-385/LJSpeech-1.1"
LAMS, LAYERS, LAYER_MAP = [0.05, 0.1, 0.2, 0.3], ["all", "0", "1", "2", "3"], "stride"
RESTORES = 0.1  # the control's λ that gives back the undamaged weights


def build_control(damage: float, seed: int = 0) -> tuple[Path, Path]:
    """(damaged target W + E, source holding W − (1 − λ*)/λ* · E where the merge maps it, λ* = RESTORES), written
    under benchmarks/work/."""
    from safetensors.torch import load_file, save_file

    from mamcli.checkpoint import resolve
    from mamcli.merge import MergeOptions, plan_merge

    target, source = WORK / f"whisper-damaged-{damage}", WORK / f"minilm-fix-{damage}"
    with resolve(str(SOURCE)) as s, resolve(str(TARGET)) as t:
        pairs = [(p.source, p.target) for p in plan_merge(s, t, MergeOptions(lam=0.5, layer_map=LAYER_MAP)).pairs]
    weights = load_file(TARGET / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    noise = {tn: damage * weights[tn].float().std() * torch.randn(weights[tn].shape, generator=g) for _, tn in pairs}
    for folder, base in ((target, TARGET), (source, SOURCE)):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(base, folder)
    damaged = {k: (v.float() + noise[k]).to(v.dtype) if k in noise else v for k, v in weights.items()}
    save_file(damaged, target / "model.safetensors", metadata={"format": "pt"})
    src = load_file(SOURCE / "model.safetensors")
    for sn, tn in pairs:
        src[sn] = (weights[tn].float() - (1 - RESTORES) / RESTORES * noise[tn]).to(src[sn].dtype)
    save_file(src, source / "model.safetensors", metadata={"format": "pt"})
    return target, source


def run(target: Path, source: Path, budget: int | None, device: str) -> dict[str, Any]:
    from mamcli.checkpoint import resolve
    from mamcli.data import load_dataset, select
    from mamcli.evaluate import EvalOptions
    from mamcli.search import SearchOptions, search

    lj = load_dataset(LJ)
    dev, test = select(lj, "dev", 0.3, 0), select(lj, "test", 0.3, 0)
    opts = SearchOptions(lams=LAMS, layers=LAYERS, layer_map=LAYER_MAP, seed=0, budget_clips=budget)
    started = time.perf_counter()
    with resolve(str(target)) as t, resolve(str(source)) as s:
        rep = search(t, [s], dev, test, EvalOptions(device=device), opts,
                     progress=lambda m: print(m, file=sys.stderr, flush=True))
    dropped = Counter((r["left_round"], r["reason"].split(":")[0].split(" than ")[0]) for r in rep["rounds"]
                      if r["left_round"] is not None)
    return {"verdict": rep["verdict"], "summary": rep["summary"], "picked": rep["picked"], "test": rep["test"],
            "noise_control": rep["noise_control"], "source_vs_noise": rep["source_vs_noise"], "cost": rep["cost"],
            "race": rep["race"], "dropped_per_round": [{"round": r, "reason": why, "candidates": n}
                                                       for (r, why), n in sorted(dropped.items())],
            "rounds": [{k: v for k, v in r.items() if k != "trace"} for r in rep["rounds"]],
            "wall_s": round(time.perf_counter() - started, 1), "versions": rep["versions"]}


def save(path: Path, part: str, result: dict[str, Any]) -> None:
    """Replace one part's key, reading the file just before: parts run side by side keep each other's results."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[part] = result
    path.write_text(json.dumps(results, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("real", "control", "all"), default="all")
    ap.add_argument("--damage", type=float, default=0.5, help="noise E as a multiple of each tensor's std")
    ap.add_argument("--budget-clips", type=int, default=None, help="default: mam search's (0.3× the full grid)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    if a.part in ("real", "all"):
        real = run(TARGET, SOURCE, a.budget_clips, a.device)
        save(a.out, "real", {**real, "targets": {"share_of_full_grid_at_most": 0.3,
                                                 "verdict_in": ["none", "inconclusive"]}})
    if a.part in ("control", "all"):
        target, source = build_control(a.damage)
        save(a.out, "control", {"damage": a.damage, **run(target, source, a.budget_clips, a.device),
                                "targets": {"verdict": "helps", "picked": {"layers": "all", "lam": RESTORES}}})
    results = json.loads(a.out.read_text())
    for part in ("real", "control"):
        if part in results:
            print(f"{part}: {results[part]['summary']} ({results[part]['wall_s']} s)")


if __name__ == "__main__":
    main()
