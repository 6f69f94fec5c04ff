"""Reading tensors back for assertions; mam under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors directory."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def torchrun(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`mam ARGS` as two CPU processes (gloo) under torchrun."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "mamcli.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=240)


def timeless(report: object) -> object:
    """A report without its clock readings (keys naming seconds or wall time), which two runs never share."""
    if isinstance(report, dict):
        return {k: timeless(v) for k, v in report.items() if "second" not in k and "wall" not in k
                and k not in ("peak_rss_mib", "timing", "versions", "processes", "clips_per_process")}
    if isinstance(report, list):
        return [timeless(v) for v in report]
    return report
