"""The report's sweep plots: students' and teachers' top-1 against each swept key, with the
paper's published points beside ours (:func:`nt_dist.report_paper.paper_points`).

The x axis is logarithmic for log-spaced values (ω = 0.001, 0.01, 0.1; τ = 1, 2, 4, 8), linear
for evenly spaced ones (α = 0.1 ... 0.9); a log-spaced sweep that also holds 0 (ω = 0 is plain
cross-entropy) gets a symmetric-log axis, linear between 0 and its smallest positive value. Each
PNG records how it was drawn in its text chunks (``xscale``, ``paper``: the published points
drawn, or ""), which ``PIL.Image.open(path).text`` reads back.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nt_dist.report_collect import Result
from nt_dist.report_paper import paper_points, series_label
from nt_dist.report_tables import sorted_values

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Point = tuple[float, float, float]  # (x, mean, std)

EVEN_RATIO = 1.5  # log-spaced: the largest step's log-ratio within this factor of the smallest's
DECADES = 2.0  # positive values spanning this many decades or more are drawn on a log axis anyway


def x_scale(xs: Sequence[float]) -> str:
    """``log`` for values that are log-spaced (all positive, ratios between neighbours roughly
    constant over at least a factor 4, or spanning >= 2 decades); ``symlog`` for such values
    and 0; ``linear`` otherwise."""
    values = sorted({float(x) for x in xs if math.isfinite(x)})
    positive = [x for x in values if x > 0]
    if len(positive) < 2 or values[0] < 0:
        return "linear"
    steps = [math.log(b / a) for a, b in zip(positive, positive[1:], strict=False)]
    even = len(steps) >= 2 and max(steps) <= EVEN_RATIO * min(steps) and positive[-1] >= 4 * positive[0]
    if not (even or math.log10(positive[-1] / positive[0]) >= DECADES):
        return "linear"
    return "symlog" if 0.0 in values else "log"


def sweep_series(results: list[Result], key: str) -> tuple[dict[str, list[Point]], dict[str, list[Point]]]:
    """For a swept ``key``: (students' series, teachers' series), label -> [(x, mean, std)].
    A stage the key does not reach (a baseline under an ω sweep) is a flat line."""
    values = sorted_values(list(dict.fromkeys(v for r in results for k, v in r.sweep if k == key)))
    students: dict[str, list[Point]] = {}
    teachers: dict[str, list[Point]] = {}
    for value in values:
        here = [r for r in results if dict(r.sweep).get(key, value) == value]
        groups: dict[tuple[bool, str], list[float]] = {}
        for r in here:
            groups.setdefault((r.kind in ("student", "baseline"), series_label(r.row, r.column)), []).append(r.top1)
        for (student, label), vs in groups.items():
            point = (float(value), statistics.fmean(vs), statistics.stdev(vs) if len(vs) > 1 else 0.0)
            (students if student else teachers).setdefault(label, []).append(point)
    return students, teachers


def sweep_figure(*, title: str, xlabel: str, ylabel: str, series: dict[str, list[Point]],
                 paper: dict[str, tuple[float, float]] | None = None, caption: str = "") -> tuple[Figure, str]:
    """One line per series with ±std error bars, and each series' published point (``paper``:
    label -> (x, top-1)) as a star in its colour; returns the figure and its x scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [x for points in series.values() for x, _, _ in points]
    drawn = False
    for label, points in series.items():
        ordered = sorted(points)
        line = ax.errorbar([p[0] for p in ordered], [p[1] for p in ordered], yerr=[p[2] for p in ordered],
                           marker="o", markersize=4, capsize=3, linewidth=1.5, label=label)
        if paper and label in paper:
            ax.plot([paper[label][0]], [paper[label][1]], marker="*", markersize=12, linestyle="none",
                    color=line.lines[0].get_color(), markeredgecolor="black", markeredgewidth=0.5)
            drawn = True
    scale = x_scale(xs)
    if scale == "symlog":
        ax.set_xscale("symlog", linthresh=min(x for x in xs if x > 0))
    elif scale == "log":
        ax.set_xscale("log")
    handles, labels = ax.get_legend_handles_labels()
    if drawn:
        handles.append(Line2D([], [], marker="*", markersize=12, linestyle="none", color="gray",
                              markeredgecolor="black", markeredgewidth=0.5))
        labels.append(f"paper: {caption}")
    if handles:
        ax.legend(handles, labels, fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return fig, scale


def save_png(fig: Figure, path: Path, metadata: dict[str, str], dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG with ``metadata`` in its text chunks, through a temporary file in the
    same folder and a rename (a reader never sees half a picture)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=dpi, metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_plots(results: list[Result], folder: Path, name: str,
                labels: dict[str, str] | None = None) -> list[Path]:
    """A PNG per swept numeric key and side (students, teachers): ``<name>_<key>_<side>.png``.
    ``labels``: series label -> the label shown (a label whose runs trained another network)."""
    paths = []
    for key in dict.fromkeys(k for r in results for k, _ in r.sweep):
        try:
            students, teachers = sweep_series(results, key)
        except ValueError:  # a non-numeric sweep (e.g. a model name) has no axis
            continue
        caption, published = paper_points(name, key)
        for side, series, what in (("students", students, "student top-1 after KD (%)"),
                                   ("teachers", teachers, "teacher top-1 (%)")):
            if not series:
                continue
            shown = {(labels or {}).get(label, label): points for label, points in series.items()}
            paper = {(labels or {}).get(label, label): xy for label, xy in published.items() if label in series}
            fig, scale = sweep_figure(title=f"{name}: {what} against {key}", xlabel=key, ylabel=what, series=shown,
                                      paper=paper, caption=caption)
            paths.append(save_png(fig, folder / f"{name}_{key}_{side}.png",
                                  {"xscale": scale, "paper": caption if paper else "",
                                   "Title": f"{name}: {what} against {key}"}))
    return paths
