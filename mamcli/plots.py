"""Optional figures (matplotlib is an optional dependency: `pip install 'mamcli[plot]'`)."""

from __future__ import annotations

import textwrap
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING

from mamcli.errors import MamError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Series = dict[str, tuple[list[float], list[float]]]


def line_figure(series: Series, xlabel: str, ylabel: str, title: str, *, integer_x: bool | None = None) -> Figure:
    """One line per series, laid out to be read: the figure `line_plot` writes, apart so tests can measure it.

    Layer numbers are whole: with ``integer_x`` (by default, when every x is an integer, as layer indices are)
    ticks fall on integers only, never 2.5. The legend stands right of the axes, so no line or point is ever
    hidden under it, however the data fall.
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
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, label=textwrap.fill(name, 32))
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
              integer_x: bool | None = None) -> None:
    """Draw `line_figure` into a PNG, written atomically so a failed plot leaves no half file."""
    fig = line_figure(series, xlabel, ylabel, title, integer_x=integer_x)  # first: it says when matplotlib is absent
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=120)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MamError(f"cannot write plot {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
