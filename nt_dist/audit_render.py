"""The audit's report from the battery's results: margins, verdicts, the bottom line, and the
Markdown, CSV and PNG that ``nt-dist audit`` writes (pure functions of the results; no training).

What is compared: for each attack, the student stolen from a row (the teacher under audit, or
the reference served through a defence) against the student the **same attack** steals from the
reference, a normal teacher of the same architecture::

    margin(row, attack) = top1(student ← reference, attack) − top1(student ← row, attack)

positive: the row withholds that much of what the attack takes from a normal teacher; zero or
negative: it withholds nothing. Measuring against the same attack keeps a weak attack from
looking like a strong defence: a data-free student that lands far below the student trained
alone on real data does so from the normal teacher too. The student alone is reported beside
each margin for scale, never as the bar. The verdict per attack reads the margin of the teacher
under audit against the threshold (points): at least the threshold, protected; above zero,
weak; otherwise not protected. The bottom line counts the verdicts.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nt_dist.formatting import mean_spread, signed

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from nt_dist.audit import AuditPlan

REFERENCE = "reference"
AUDITED = "under audit"
ALONE = "alone"
PROTECTED, WEAK, NOT_PROTECTED, NO_RESULT = "protected", "weak", "not protected", "no result yet"


@dataclass(frozen=True)
class Protection:
    """One attack's students: trained alone, and stolen from each row (top-1 per seed)."""

    attack: str
    alone: list[float]
    stolen: dict[str, list[float]]  # row label -> the stolen student's top-1 per seed

    def mean(self, row: str) -> float | None:
        values = self.stolen.get(row)
        return statistics.fmean(values) if values else None

    @property
    def alone_mean(self) -> float | None:
        """The student trained alone on the real data (for scale; not the margin's bar)."""
        return statistics.fmean(self.alone) if self.alone else None

    def margin(self, row: str) -> float | None:
        """The student this attack steals from the reference minus the one it steals from
        ``row`` (None for the reference itself, or where either is missing)."""
        reference, stolen = self.mean(REFERENCE), self.mean(row)
        if row == REFERENCE or reference is None or stolen is None:
            return None
        return reference - stolen


def protections(results: list[Any], columns: list[str]) -> list[Protection]:
    """One :class:`Protection` per attack column, from the pipeline's results
    (:class:`nt_dist.report.Result`: ``kind``, ``row``, ``column``, ``top1``)."""
    alone = [r.top1 for r in results if r.kind == "baseline" and r.column == ALONE]
    out = []
    for column in columns:
        stolen: dict[str, list[float]] = {}
        for r in results:
            if r.kind == "student" and r.column == column:
                stolen.setdefault(r.row, []).append(r.top1)
        out.append(Protection(column, alone, stolen))
    return out


def standing(p: Protection, threshold: float, row: str = AUDITED) -> str:
    """``protected`` (margin ≥ threshold), ``weak`` (0 < margin < threshold), ``not protected``
    (margin ≤ 0) or ``no result yet``."""
    margin = p.margin(row)
    if margin is None:
        return NO_RESULT
    return PROTECTED if margin >= threshold else WEAK if margin > 0 else NOT_PROTECTED


def verdict(p: Protection, threshold: float, row: str = AUDITED) -> str:
    """One line: the standing, the margin against the same attack on the reference, the two
    students it compares and the student alone."""
    state = standing(p, threshold, row)
    if state == NO_RESULT:
        return state
    margin, reference, stolen, alone = p.margin(row), p.mean(REFERENCE), p.mean(row), p.alone_mean
    assert margin is not None and reference is not None and stolen is not None
    beside = f"{stolen:.2f} vs {reference:.2f}" + ("" if alone is None else f"; the student alone: {alone:.2f}")
    if state == PROTECTED:
        return f"protected: {margin:.2f} points below the same attack on the reference ({beside})"
    if state == WEAK:
        return f"weak: only {margin:.2f} points below the same attack on the reference ({beside}; threshold {threshold:g})"
    if margin == 0:
        return f"not protected: level with the same attack on the reference ({beside})"
    return f"not protected: {-margin:.2f} points above the same attack on the reference ({beside})"


def bottom_line(table: list[Protection], threshold: float, row: str = AUDITED) -> str:
    """``protected against N of M attacks; weak against A, B`` (``none``), each attack column
    counted once; weak lists every attack under the threshold, not protected included; columns
    without results are named after ``no result yet:``."""
    states = [(p.attack, standing(p, threshold, row)) for p in table]
    protected = sum(state == PROTECTED for _, state in states)
    weak = [attack for attack, state in states if state in (WEAK, NOT_PROTECTED)]
    missing = [attack for attack, state in states if state == NO_RESULT]
    line = (f"protected against {protected} of {len(table)} attack{'' if len(table) == 1 else 's'}; "
            f"weak against {', '.join(weak) or 'none'}")
    return line + (f"; no result yet: {', '.join(missing)}" if missing else "")


def markdown(plan: AuditPlan, student: str, dataset: str, teachers: dict[str, float], rows: list[str],
             table: list[Protection], seeds: int) -> str:
    """The report: the bottom line first, the teachers as released, then one line per attack."""
    reference = teachers.get(REFERENCE)
    lines = [bottom_line(table, plan.threshold), "",
             f"### Protection audit: {plan.teacher} (under audit) vs {plan.reference} (reference)", "",
             f"Student `{student}` on `{dataset}`, {seeds} seed(s); test top-1 in percent, mean ± sample std over "
             "seeds. Margin: the student an attack steals from the reference minus the student the same attack "
             f"steals from the row (positive: protected; verdict threshold {plan.threshold:g} points). The student "
             "alone, trained on the real data without a teacher, is shown for scale.", "",
             "| teacher | top-1 as released | cost vs reference |", "|---|---|---|"]
    for row in rows:
        top1 = teachers.get(row)
        cost = None if top1 is None or reference is None or row == REFERENCE else top1 - reference
        lines.append(f"| {row} | {'–' if top1 is None else f'{top1:.2f}'} | {signed(cost)} |")
    protected = [r for r in rows if r != REFERENCE]
    header = ["attack", "student alone", f"from {REFERENCE}"]
    for row in protected:
        header += [f"from {row}", f"margin ({row})"]
    header.append("verdict (under audit)")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in table:
        cells = [p.attack, mean_spread(p.alone), mean_spread(p.stolen.get(REFERENCE))]
        for row in protected:
            cells += [mean_spread(p.stolen.get(row)), signed(p.margin(row))]
        cells.append(verdict(p, plan.threshold))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *[f"- **{p.attack}**: {verdict(p, plan.threshold)}" for p in table]]
    return "\n".join(lines) + "\n"


def csv_text(teachers: dict[str, float], rows: list[str], table: list[Protection]) -> str:
    """One line per teacher and per (attack, row); ``margin``: against the same attack on the reference."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["attack", "row", "n", "mean", "std", "margin", "values"])
    for row in rows:
        if row in teachers:
            writer.writerow(["(teacher)", row, 1, f"{teachers[row]:.4f}", "0.0000", "", f"{teachers[row]:.2f}"])
    for p in table:
        entries = [(ALONE, p.alone), *[(row, p.stolen.get(row, [])) for row in rows]]
        for row, values in entries:
            if not values:
                continue
            margin = p.margin(row) if row != ALONE else None
            writer.writerow([p.attack, row, len(values), f"{statistics.fmean(values):.4f}",
                             f"{statistics.stdev(values) if len(values) > 1 else 0.0:.4f}",
                             "" if margin is None else f"{margin:.4f}", " ".join(f"{v:.2f}" for v in values)])
    return out.getvalue()


# ----------------------------------------------------------------------------- the bar chart


def bar_figure(table: list[Protection], rows: list[str], title: str, summary: str = "") -> Figure:
    """Grouped bars: per attack, the student alone and the student stolen from each row (a
    missing result draws no bar). The y axis starts at 0; the legend sits outside the axes, to
    their right; ``summary`` (the bottom line) is the title's second line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nan = float("nan")
    series = [(ALONE, [nan if p.alone_mean is None else p.alone_mean for p in table])]
    series += [(row, [nan if p.mean(row) is None else p.mean(row) for p in table]) for row in rows]
    figure = Figure(figsize=(max(6.0, 1.3 * len(table) + 2), 4.4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        axes.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(table))], values, width,
                 label=f"student {label}" if label == ALONE else f"from {label}")
    axes.set_xticks(range(len(table)), [p.attack for p in table], rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("stolen student's test top-1 (%)")
    axes.set_ylim(bottom=0, top=100.0)  # from 0: bar heights read as accuracies, not as differences
    axes.set_title(f"{title}\n{summary}" if summary else title, fontsize=9)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    axes.grid(axis="y", alpha=0.3)
    return figure


def legend_placement(figure: Figure) -> str:
    """Where the first axes' legend is drawn relative to those axes, measured on the rendered
    figure: ``outside, right`` / ``outside, below`` / ``outside, above`` / ``outside, left`` /
    ``overlapping the axes`` / ``none``."""
    axes = figure.axes[0]
    legend = axes.get_legend()
    if legend is None:
        return "none"
    renderer = figure.canvas.get_renderer()
    box, frame = legend.get_window_extent(renderer), axes.get_window_extent(renderer)
    for side, outside in (("right", box.x0 >= frame.x1), ("below", box.y1 <= frame.y0),
                          ("above", box.y0 >= frame.y1), ("left", box.x1 <= frame.x0)):
        if outside:
            return f"outside, {side}"
    return "overlapping the axes"


def bar_chart(table: list[Protection], rows: list[str], path: Path, title: str, summary: str = "") -> Path:
    """Write :func:`bar_figure` as the PNG ``path`` (cropped to what is drawn); its metadata
    (``PIL.Image.open(path).text``) holds ``Title``, ``Description`` (``summary``),
    ``YAxisBottom`` and ``Legend`` (:func:`legend_placement`). Returns ``path``."""
    from nt_dist.plots import save_png

    figure = bar_figure(table, rows, title, summary)
    figure.canvas.draw()
    metadata = {"Title": title, "Description": summary, "YAxisBottom": f"{figure.axes[0].get_ylim()[0]:g}",
                "Legend": legend_placement(figure)}
    return save_png(figure, path, metadata=metadata, tight=True)
