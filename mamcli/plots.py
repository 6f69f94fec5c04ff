"""Optional figures (matplotlib is an optional dependency: `pip install 'mamcli[plot]'`)."""

from __future__ import annotations

from pathlib import Path

from mamcli.errors import MamError


def line_plot(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str,
              path: Path) -> None:
    """One line per series; written atomically so a failed plot leaves no half file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MamError("--plot needs matplotlib: pip install 'mamcli[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        fig.savefig(tmp)
        tmp.replace(path)
    except OSError as e:
        raise MamError(f"cannot write plot {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
