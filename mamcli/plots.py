"""Optional figures (matplotlib is an optional dependency: `pip install 'mamcli[plot]'`)."""

from __future__ import annotations

import textwrap
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mamcli.errors import MamError
from mamcli.report import write_file

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Series = dict[str, tuple[list[float], list[float]]]
Intervals = dict[str, tuple[list[float], list[float]]]  # per series: each point's (low, high)


def line_figure(series: Series, xlabel: str, ylabel: str, title: str, *, integer_x: bool | None = None,
                intervals: Intervals | None = None) -> Figure:
    """One line per series, laid out to be read: the figure `line_plot` writes, apart so tests can measure it.

    Layer numbers are whole: with ``integer_x`` (by default, when every x is an integer, as layer indices are)
    ticks fall on integers only, never 2.5. The legend stands right of the axes, so no line or point is ever
    hidden under it, however the data fall. ``intervals``: each point's interval, drawn as an error bar in its
    line's colour.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise MamError("--plot needs matplotlib: pip install 'mamcli[plot]'") from None
    if integer_x is None:
        integer_x = all(isinstance(x, Integral) for xs, _ in series.values() for x in xs)
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")  # constrained layout keeps room for the legend
    for name, (xs, ys) in series.items():
        (line,) = ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, label=textwrap.fill(name, 32))
        if intervals and name in intervals:
            lo, hi = intervals[name]
            ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo, strict=True)],
                                      [b - y for y, b in zip(ys, hi, strict=True)]],
                        fmt="none", ecolor=line.get_color(), elinewidth=1, capsize=3, alpha=0.7)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.set_title(title, fontsize=12)
    ax.tick_params(labelsize=10)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=9, frameon=False,
                  ncols=1 + (len(series) - 1) // 16)
    return fig


def line_plot(series: Series, xlabel: str, ylabel: str, title: str, path: Path, *,
              integer_x: bool | None = None, intervals: Intervals | None = None) -> None:
    """Draw `line_figure` into a PNG, written atomically so a failed plot leaves no half file."""
    # first: it says when matplotlib is absent
    fig = line_figure(series, xlabel, ylabel, title, integer_x=integer_x, intervals=intervals)
    import matplotlib.pyplot as plt

    try:
        write_file(path, lambda p: fig.savefig(p, dpi=120, format="png"), "plot ")
    finally:
        plt.close(fig)


def sweep_plot(result: dict[str, Any], metric: str, split: str, path: Path) -> None:
    """An evaluate sweep: the error in percent against λ, one line per source/noise column and layer set, each
    point with its paired 95 % interval as a bar. A point's interval is the baseline's error plus the interval
    of the paired difference (``delta_lo``, ``delta_hi``), so bars that clear the baseline's level mark a
    difference the data show, and the axes name the split and the metric."""
    series: Series = {}
    bars: Intervals = {}
    base = 100 * result["baseline"]["error"]
    for p in result["points"]:
        if p["column"] == "target":
            continue
        name = f"{p['column']} (layers {p['layers']})"
        xs, ys = series.setdefault(name, ([0.0], [base]))
        lo, hi = bars.setdefault(name, ([base], [base]))
        ref = 100 * (p["error"] - p["delta"])  # the baseline's error: Δ = this point − the baseline
        xs.append(p["lam"])
        ys.append(100 * p["error"])
        lo.append(ref + 100 * p["delta_lo"])
        hi.append(ref + 100 * p["delta_hi"])
    baseline = result.get("paired_statistics", {}).get("baseline", "target")
    against = "λ = 0" if baseline == "target" else baseline
    from mamcli.tables import metric_name

    name = metric_name(metric)
    where = "all clips" if split == "all" else f"the {split} split"
    line_plot(series, "λ", f"{name} on {where} (%)", f"{name} against λ\nbars: 95 % paired interval, the baseline's "
              f"{name} + the interval of Δ to {against}", path, intervals=bars)
