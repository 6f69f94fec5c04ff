"""Rows of results rendered for people (table) or for spreadsheets and scripts (csv, tsv, json)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

FORMATS = ("table", "csv", "tsv", "json")


def _cell(v: Any, digits: int | None = None) -> str:
    """Floats in full (shortest round-trip) for spreadsheets; ``digits`` significant ones for people."""
    if isinstance(v, float):
        return repr(v) if digits is None else f"{v:.{digits}g}"
    if isinstance(v, list | tuple):
        return " ".join(map(str, v))
    return "" if v is None else str(v)


def render(rows: Sequence[dict[str, Any]], fmt: str, title: str | None = None) -> str:
    """Render rows with the union of their keys as columns, in first-seen order."""
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    if fmt == "json":
        return json.dumps(list(rows), indent=2, ensure_ascii=False, default=str) + "\n"
    if fmt in ("csv", "tsv"):
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        w.writerow(columns)
        w.writerows([[_cell(r.get(c)) for c in columns] for r in rows])
        return buf.getvalue()
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for c in columns:
        numeric = all(isinstance(r.get(c), int | float) for r in rows if r.get(c) is not None)
        table.add_column(c, overflow="fold", justify="right" if numeric else "left")
    for r in rows:
        table.add_row(*[_cell(r.get(c), digits=4) for c in columns])
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]
