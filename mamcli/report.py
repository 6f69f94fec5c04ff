"""Run metadata shared by every command's report: versions, timing, memory, JSON output."""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    """Versions of what shaped the result (read from package metadata: no heavy imports)."""
    from importlib.metadata import PackageNotFoundError, version

    from mamcli import __version__

    found = {"mam": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "safetensors", "numpy", "pot", "jiwer"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "not installed"
    return found


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False, default=str) + "\n"


def write_json(path: Path, obj: Any) -> None:
    """Write via a temporary sibling so a reader never sees half a report."""
    from mamcli.errors import MamError

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(dumps(obj))
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MamError(f"cannot write {path}: {e.strerror or e}") from None
