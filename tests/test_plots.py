"""--plot figures: whole-number layer ticks, a legend that covers no data, an atomic PNG."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from matplotlib.image import imread
from matplotlib.transforms import Bbox

from conftest import SHARED
from mamcli.errors import MamError
from mamcli.plots import line_figure, line_plot

LJ = f"ljspeech:{SHARED}/ljspeech-385/LJSpeech-1.1"
LAYERS = list(range(24))
# three metrics that sweep the whole plot area, corners included: wherever a legend went inside the axes,
# it would cover data
RANK = {"swd": (LAYERS, [float((i % 2) * 10) for i in LAYERS]),
        "euclidean": (LAYERS, [10 - 10 * i / 23 for i in LAYERS]),
        "inner": (LAYERS, [10 * i / 23 for i in LAYERS])}


def _draw(series, **kw):
    fig = line_figure(series, "target layer", "score", "per-layer similarity", **kw)
    fig.canvas.draw()
    return fig, fig.axes[0], fig.canvas.get_renderer()


def _shown_xticks(ax) -> list[tuple[float, str]]:
    lo, hi = ax.get_xlim()
    return [(t.get_position()[0], t.get_text()) for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]


@pytest.mark.parametrize("n_layers", [2, 4, 7, 24])
def test_layer_ticks_are_whole_numbers(n_layers):
    layers = list(range(n_layers))
    _, ax, _ = _draw({"swd": (layers, [0.1 * i for i in layers]), "inner": (layers, [3.0 - i for i in layers])})
    ticks = _shown_xticks(ax)
    assert len(ticks) >= min(n_layers, 4)
    for pos, text in ticks:
        assert pos == int(pos) and text == str(int(pos)), ticks


def test_float_x_keeps_fractional_ticks_unless_asked():
    lams = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    series = {"bert (layers 8-15)": (lams, [0.5, 0.48, 0.47, 0.5, 0.6, 0.7])}
    _, ax, _ = _draw(series)
    assert any(pos != int(pos) for pos, _ in _shown_xticks(ax))
    _, ax, _ = _draw({"layers": ([0.0, 1.0, 2.0, 3.0, 4.5], [1, 2, 3, 4, 5])}, integer_x=True)
    assert all(pos == int(pos) for pos, _ in _shown_xticks(ax))


@pytest.mark.parametrize("n_series", [3, 20])
def test_legend_covers_no_data_and_stays_in_the_figure(n_series):
    series = dict(RANK)
    for k in range(n_series - len(series)):  # many sweep columns with long names, as evaluate draws them
        series[f"/some/long/path/to/a/source/model-{k} (layers {k}-{k + 7})"] = (LAYERS, [(i * k) % 11 for i in LAYERS])
    fig, ax, renderer = _draw(series)
    legend = ax.get_legend().get_window_extent(renderer)
    marker = 4 * fig.dpi / 72  # marker size in pixels
    grown = Bbox.from_extents(legend.x0 - marker, legend.y0 - marker, legend.x1 + marker, legend.y1 + marker)
    for line in ax.get_lines():
        pts = ax.transData.transform(line.get_xydata())
        # the points and the straight segments between them, sampled every 1/50 of a segment
        steps = np.linspace(0.0, 1.0, 51)[:, None, None]
        path = (pts[:-1] * (1 - steps) + pts[1:] * steps).reshape(-1, 2)
        assert not grown.count_contains(pts), line.get_label()
        assert not legend.count_contains(path), line.get_label()
    figure = fig.bbox
    assert figure.x0 <= legend.x0 and legend.x1 <= figure.x1 and figure.y0 <= legend.y0 and legend.y1 <= figure.y1
    lo, hi = ax.get_xlim()
    labels = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    assert len(labels) >= 4
    assert all(a.x1 <= b.x0 for a, b in itertools.pairwise(labels)), "x tick labels overlap"


def test_line_plot_writes_a_png_atomically(tmp_path):
    out = tmp_path / "rank.png"
    line_plot(RANK, "target layer", "score", "per-layer similarity", out)
    image = imread(out)
    assert image.shape[:2] == (math.ceil(4.5 * 120), 8 * 120)
    assert image[..., :3].std() > 0.05  # drawn, not blank
    assert [p.name for p in tmp_path.iterdir()] == ["rank.png"]
    with pytest.raises(MamError, match=r"^cannot write plot .*missing/rank.png"):
        line_plot(RANK, "target layer", "score", "t", tmp_path / "missing" / "rank.png")
    assert [p.name for p in tmp_path.iterdir()] == ["rank.png"]


def test_rank_layers_plot_from_the_cli(tiny, mam, tmp_path, monkeypatch):
    """`mam rank-layers --plot` as the user runs it: whole-number layer ticks, legend clear of the axes."""
    import mamcli.plots

    drawn = []
    build = mamcli.plots.line_figure
    monkeypatch.setattr(mamcli.plots, "line_figure", lambda *a, **k: drawn.append(build(*a, **k)) or drawn[-1])
    r = mam("rank-layers", tiny("bert", layers=4), tiny("hubert-ctc", layers=4), "--data", LJ, "--limit", "2",
            "--metric", "all", "--plot", tmp_path / "rank.png", "-q")
    assert r.code == 0, r.err
    assert imread(tmp_path / "rank.png").shape[:2] == (math.ceil(4.5 * 120), 8 * 120)
    (fig,) = drawn
    fig.canvas.draw()
    ax = fig.axes[0]
    assert [text for _, text in _shown_xticks(ax)] == ["0", "1", "2", "3"]
    assert not ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())


def test_evaluate_plot_shows_percent_intervals_split_and_metric(tiny, mam, tmp_path, monkeypatch):
    """`mam evaluate --plot`: WER in percent against λ, each point with its paired 95 % interval as a bar
    (the baseline's WER + the interval of Δ), and the axes name the metric and the split."""
    import json

    import mamcli.plots

    drawn = []
    build = mamcli.plots.line_figure
    monkeypatch.setattr(mamcli.plots, "line_figure", lambda *a, **k: drawn.append(build(*a, **k)) or drawn[-1])
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    r = mam("evaluate", tgt, "--data", LJ, "--limit", "4", "--split", "test", "--dev-fraction", "0.5", "--source",
            src, "--lam", "0,0.4,0.8", "--noise", "normal", "-o", tmp_path / "r.json", "--plot", tmp_path / "p.png",
            "-q")
    assert r.code == 0, r.err
    assert imread(tmp_path / "p.png").shape[:2] == (math.ceil(4.5 * 120), 8 * 120)
    report = json.loads((tmp_path / "r.json").read_text())
    (fig,) = drawn
    ax = fig.axes[0]
    assert ax.get_ylabel() == "WER on the test split (%)" and ax.get_xlabel() == "λ"
    assert "95 % paired interval" in ax.get_title() and "Δ to λ = 0" in ax.get_title()
    base = 100 * report["baseline"]["wer"]
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert sorted(lines) == [f"{src.name} (layers all)", "noise:normal (layers all)"]
    bars = [c for c in ax.collections if c.get_segments()]  # one set of vertical bars per line
    assert len(bars) == 2
    for (name, line), bar in zip(lines.items(), bars, strict=True):
        column = name.removesuffix(" (layers all)")
        points = [p for p in report["points"] if p["column"] == column]
        assert list(line.get_xdata()) == [0.0, 0.4, 0.8]
        assert list(line.get_ydata()) == pytest.approx([base, *(100 * p["wer"] for p in points)])
        ends = [(seg[0][1], seg[1][1]) for seg in bar.get_segments()]
        assert ends[0] == pytest.approx((base, base))
        assert ends[1:] == [pytest.approx((base + 100 * p["delta_lo"], base + 100 * p["delta_hi"])) for p in points]
