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


def _numeric(v: Any) -> bool:
    """A number, or a number already formatted for people ("6.88", "+0.50"): aligned right."""
    if isinstance(v, str):
        try:
            float(v)
        except ValueError:
            return False
        return True
    return isinstance(v, int | float)


def render(rows: Sequence[dict[str, Any]], fmt: str, title: str | None = None, width: int = 200) -> str:
    """Render rows with the union of their keys as columns, in first-seen order; a table is at most ``width``
    characters wide (long cells fold)."""
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
        numeric = all(_numeric(r.get(c)) for r in rows if r.get(c) not in (None, ""))
        table.add_column(c, overflow="fold", justify="right" if numeric else "left")
    for r in rows:
        table.add_row(*[_cell(r.get(c), digits=4) for c in columns])
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]



# evaluate's tables. A plain evaluation has one row of rates (evaluate._summary); a sweep has one row per (layers,
# λ) with, per source/noise column ("bert", "noise:normal"), its error and the statistics paper_table puts beside it
KEYS = ("split", "layers", "lam")
SWEEP_STATS = ("rel.red.", "delta", "delta_lo", "delta_hi", "better", "worse", "same")  # stats.COLUMNS and more
RATES = ("error", "wer", "cer", "accuracy")  # fractions of 1 in a plain evaluation's row


def metric_name(metric: str) -> str:
    """How a table or figure names the metric: WER for speech, error (classification error) for audio events."""
    return metric.upper() if metric in ("wer", "cer") else metric


def sweep_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The source/noise columns of a sweep table, in order; none for a plain evaluation."""
    if any("error" in r for r in rows):
        return []
    found: list[str] = []
    for r in rows:
        found.extend(k for k in r if k not in KEYS and k not in found
                     and not any(k.endswith(f" {s}") and k[:-len(s) - 1] in r for s in SWEEP_STATS))
    return found


def sweep_for_files(rows: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """CSV, TSV and JSON keep every number apart and a fraction of 1 (0.06875, not 6.875 %), and the name of
    each error column says so: ``bert wer_fraction`` in a sweep, ``wer_fraction`` in a plain evaluation.
    ``rel.red.`` and the ``delta`` columns are fractions too (0.01 is one percentage point)."""
    named = {c: f"{c} {metric}_fraction" for c in sweep_columns(rows)} or {k: f"{k}_fraction" for k in RATES}
    return [{named.get(k, k): v for k, v in r.items()} for r in rows]


def _pct(v: float | None, sign: str = "") -> str:
    return "" if v is None else f"{100 * v:{sign}.2f}"


def _pct_number(v: float) -> str:
    """A rate in percent with two decimals (0.06875 → 6.88), as people read WER; the table aligns it right."""
    return f"{100 * v:.2f}"


def sweep_for_people(rows: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """evaluate's table on a terminal, in percent. A sweep gets one row per model (λ, layers, source or noise)
    instead of one per (λ, layers) with every column side by side, so it keeps eight columns and fits 120
    characters however many sources and noises are swept: the error, its relative reduction, Δ in percentage
    points with its 95 % interval in one cell, and the clips better/worse in another. The split is a column
    only when there are two (``--pick-on-dev``)."""
    columns = sweep_columns(rows)
    two_splits = len({r.get("split") for r in rows}) > 1
    head = f"{metric_name(metric)} %"
    out: list[dict[str, Any]] = []
    for r in rows:
        lead = {**({"split": r.get("split")} if two_splits else {}), "layers": r["layers"], "λ": r["lam"]}
        if not columns:  # a plain evaluation: its rates in percent; "error" repeats the WER of speech
            rates = [k for k in RATES if k in r and (k != "error" or metric == "error")]
            out.append({**lead, **{f"{metric_name(k)} %": _pct_number(r[k]) for k in rates},
                        **{k: v for k, v in r.items() if k not in (*KEYS, *RATES)}})
            continue
        merged = [c for c in columns if f"{c} rel.red." in r]
        if not merged:  # λ = 0: the target's one error, which the wide table repeats in every column
            out.append({**lead, "model": "target", head: _pct_number(r[columns[0]])})
        for c in merged:
            lo, hi, delta = (r.get(f"{c} {k}") for k in ("delta_lo", "delta_hi", "delta"))
            out.append({**lead, "model": c, head: _pct_number(r[c]), "rel. red. %": _pct(r[f"{c} rel.red."], "+"),
                        "Δ pp [95 % CI]": "" if delta is None else f"{_pct(delta, '+')} [{_pct(lo, '+')}, "
                                                                   f"{_pct(hi, '+')}]",
                        "better/worse": f"{r[f'{c} better']}/{r[f'{c} worse']}" if f"{c} better" in r else ""})
    return out


def race_for_people(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """search's race (``search.race_rows``) on a terminal: the running error in percent and the bound on the
    difference to the best candidate in percentage points, in one cell; the round and reason a candidate left."""
    out = []
    for r in rows:
        bound = "" if r["bound_lo"] is None else f"[{_pct(r['bound_lo'], '+')}, {_pct(r['bound_hi'], '+')}]"
        out.append({"candidate": r["candidate"], "clips": r["clips"],
                    "error %": "" if r["error"] is None else _pct_number(r["error"]),
                    "bound pp (vs best)": bound, "left in round": r["left_round"] or "", "reason": r["reason"]})
    return out
