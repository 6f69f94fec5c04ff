"""Run metadata shared by every command's report: versions, timing, memory, JSON output."""

from __future__ import annotations

import json
import platform
import re
import resource
import sys
from collections.abc import Callable
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


_UNDECODED = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8, as os.fsdecode keeps it (PEP 383)


def printable(text: str, *, in_json: bool = False) -> str:
    """``text`` with each byte that is not UTF-8 shown as ``\\xNN``, as a file name given on the command line
    may hold: such text cannot be written to a UTF-8 stream or file as it is. ``in_json``: the backslash is
    escaped, for text inside a JSON string."""
    slash = "\\\\" if in_json else "\\"
    return _UNDECODED.sub(lambda m: f"{slash}x{ord(m[0]) - 0xDC00:02x}", text)


def dumps(obj: Any) -> str:
    return printable(json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False, default=str), in_json=True) + "\n"


def write_file(path: Path, write: Callable[[Path], None], what: str = "") -> None:
    """Call ``write`` on a temporary sibling and rename it over ``path``, so a reader never sees half a file.
    A ``path`` that exists and is no regular file (``/dev/stdout``, a FIFO, ``/dev/full``) is written in place:
    a rename would put a regular file where the device or pipe was (as root, even in /dev)."""
    from mamcli.errors import MamError

    special = path.exists() and not path.is_file() and not path.is_dir()
    tmp = path if special else path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        if not special:
            tmp.replace(path)
    except OSError as e:
        if not special:
            tmp.unlink(missing_ok=True)
        raise MamError(f"cannot write {what}{path}: {e.strerror or e}") from None


def write_json(path: Path, obj: Any) -> None:
    """Write a JSON report whole (see :func:`write_file`)."""
    from mamcli.errors import MamError

    text = dumps(obj)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # a report's folder is made; a plot's must exist
    except OSError as e:
        raise MamError(f"cannot write {path}: {e.strerror or e}") from None
    write_file(path, lambda p: p.write_text(text))


def write_evaluation(path: Path, report: dict[str, Any], model: Path) -> None:
    """Write an evaluate report to ``path``. When that is the evaluated model folder's ``mam_eval.json`` and the
    folder is a mam output with a model card, the card shows the measured table too (its hash in
    mam_report.json follows, so `mam verify` stays green): the card says what the model scores, where it lives."""
    from mamcli.card import CARD_FILE, EVAL_FILE, add_evaluation

    write_json(path, report)
    if path.resolve() == (model / EVAL_FILE).resolve() and (model / CARD_FILE).is_file():
        add_evaluation(model, report)
