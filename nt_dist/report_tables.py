"""Results as the paper's tables: cells of mean ± std over seeds with the change against their
reference, rows and columns in the paper's order, labels checked against what the runs trained,
shrunk cells marked †; as Markdown and CSV, and the overrides against the paper's recipe."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

from nt_dist.formatting import mean_spread, signed
from nt_dist.pipeline import BASELINE_ROW, TEACHER_COLUMN
from nt_dist.report_collect import Result
from nt_dist.report_paper import paper_cell, series_label
from nt_dist.report_recipes import SHRUNK_NOTE, override_text

NOTE = ("final-epoch top-1, mean ± sample std over {n} seed(s); in brackets: the change against the student "
        "baseline (a nasty teacher: against its normal teacher)")
PARTIAL_NOTE = ("; n=k: a cell over k seeds, or (in brackets) a change over the k seeds the two cells "
                "compared have in common")
PAPER_NOTE = "; paper: the published figure, best test epoch of one run"
Point = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Cell:
    values: tuple[float, ...]
    delta: float | None = None
    paired: int = 0  # the seeds ``delta`` is over: those this cell shares with the one it is compared with

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """The sample std; None for one seed (a spread of one value is not 0, it is unknown)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self, seeds: int = 0) -> str:
        """``mean ± std (change)``; ``n=k`` where the cell has other than the table's ``seeds``
        seeds, and in the brackets where its change is over fewer seeds than the cell."""
        delta = ""
        if self.delta is not None:
            over = f", n={self.paired}" if self.paired != len(self.values) else ""
            delta = f" ({signed(self.delta)}{over})"
        count = f" · n={len(self.values)}" if seeds and len(self.values) != seeds else ""
        return f"{mean_spread(list(self.values))}{delta}{count}"


@dataclass(frozen=True)
class Table:
    title: str
    point: Point
    rows: list[str]  # "student baseline" first, then teacher rows
    columns: list[str]  # "teacher", then the students
    cells: dict[tuple[str, str], Cell]
    seeds: int
    shrunk: frozenset[tuple[str, str]] = frozenset()  # cells with a run trained on less than the paper's recipe
    labels: dict[tuple[str, str], str] = field(default_factory=dict)  # ("row"|"column", label) -> shown

    def row_label(self, row: str) -> str:
        return self.labels.get(("row", row), row)

    def column_label(self, column: str) -> str:
        return self.labels.get(("column", column), column)


# ----------------------------------------------------------------------------- building


def sweep_points(results: list[Result]) -> list[Point]:
    """Every combination of the swept values seen (``[()]`` without a sweep)."""
    keys: dict[str, list[str]] = {}
    for r in results:
        for k, v in r.sweep:
            if v not in keys.setdefault(k, []):
                keys[k].append(v)
    points: list[Point] = [()]
    for key, values in keys.items():
        points = [(*p, (key, v)) for p in points for v in sorted_values(values)]
    return points


def sorted_values(values: list[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def _at(results: list[Result], point: Point) -> list[Result]:
    """Results that belong to ``point``: a stage the swept key does not reach belongs to every value."""
    fixed = dict(point)
    return [r for r in results if all(fixed.get(k) == v for k, v in r.sweep)]


def label_place(r: Result) -> tuple[str, str]:
    """Which label a run's architecture answers for: a teacher's its row, a student's its column."""
    return ("row", r.row) if r.kind in ("teacher", "nasty") else ("column", r.column)


def ran_labels(results: Iterable[Result]) -> dict[tuple[str, str], str]:
    """Labels whose runs trained another architecture than the label names, as shown:
    ``ResNet-18 (ran: cifar_cnn)``."""
    ran: dict[tuple[str, str], set[str]] = {}
    for r in results:
        if r.ran:
            ran.setdefault(label_place(r), set()).add(r.ran)
    return {place: f"{place[1]} (ran: {', '.join(sorted(names))})" for place, names in ran.items()}


def build_table(results: list[Result], title: str, point: Point = (), row_order: Iterable[str] = (),
                column_order: Iterable[str] = ()) -> Table:
    here = _at(results, point)
    groups: dict[tuple[str, str], list[float]] = {}
    by_seed: dict[tuple[str, str], dict[int, float]] = {}
    reference: dict[str, str] = {}
    for r in here:
        groups.setdefault((r.row, r.column), []).append(r.top1)
        by_seed.setdefault((r.row, r.column), {})[r.seed] = r.top1
        if r.kind == "nasty" and r.reference_row:
            reference[r.row] = r.reference_row
    students = list(dict.fromkeys(r.column for r in here if r.kind in ("student", "baseline")))
    order = list(column_order)
    students.sort(key=lambda c: order.index(c) if c in order else len(order))  # stable: the rest as they came
    with_students = {r.row for r in here if r.kind == "student"}
    rows = [r.row for r in here if r.kind == "nasty" or (r.kind == "teacher" and (r.row in with_students or not students))]
    rows += [r.row for r in here if r.kind == "student"]  # rows served from a given model or through a defence
    rows = _order(list(dict.fromkeys(rows)), reference, list(row_order))
    cells: dict[tuple[str, str], Cell] = {}

    def cell(key: tuple[str, str], base: tuple[str, str] | None) -> Cell:
        return _paired(groups[key], by_seed[key], by_seed.get(base) if base else None)

    for column in students:
        if (BASELINE_ROW, column) in groups:
            cells[BASELINE_ROW, column] = Cell(tuple(groups[BASELINE_ROW, column]))
    self_reference = {r.row: r.reference_row for r in here if r.kind == "student" and r.reference_row}
    for row in rows:
        if (row, TEACHER_COLUMN) in groups:
            cells[row, TEACHER_COLUMN] = cell((row, TEACHER_COLUMN),
                                              (reference[row], TEACHER_COLUMN) if row in reference else None)
        for column in students:
            if (row, column) not in groups:
                continue
            base: tuple[str, str] | None = (BASELINE_ROW, column)
            if base not in groups and row in self_reference:  # a `self` column: against the row's normal teacher
                base = (self_reference[row], TEACHER_COLUMN)
            if base not in groups and row in reference:  # no baseline (Table 6): against the normal teacher's student
                base = (reference[row], column)
            cells[row, column] = cell((row, column), base if base in groups else None)
    seeds = len({r.seed for r in here})
    shrunk = frozenset((r.row, r.column) for r in here if r.shrunk)
    return Table(title, point, [BASELINE_ROW, *rows], [TEACHER_COLUMN, *students], cells, seeds, shrunk,
                 ran_labels(here))


def _paired(values: list[float], mine: dict[int, float], base: dict[int, float] | None) -> Cell:
    """A cell and its change against ``base`` (seed -> top-1): the mean of the differences over
    the seeds both have, no change when they share none. With a seed missing from one of them,
    a difference of the means would set one seed's luck against another's (a nasty teacher's
    seed 0 against its normal teacher's two-seed mean)."""
    common = sorted(set(mine) & set(base or {}))
    if base is None or not common:
        return Cell(tuple(values))
    return Cell(tuple(values), statistics.fmean(mine[s] - base[s] for s in common), len(common))


def _order(rows: list[str], reference: dict[str, str], paper: list[str]) -> list[str]:
    """The rows the paper lists in its order; after them the others, each normal teacher followed
    by the nasty teachers trained against it."""
    known = sorted((r for r in rows if r in paper), key=paper.index)
    rest = [r for r in rows if r not in paper]
    ordered: list[str] = []
    for row in rest:
        if row not in reference:
            ordered += [row, *[n for n in rest if reference.get(n) == row]]
    return known + ordered + [r for r in rest if r not in ordered]


# ----------------------------------------------------------------------------- writing


def markdown(table: Table, paper: str = "") -> str:
    heading = table.title + ("" if not table.point else " — " + ", ".join(f"{k} = {v}" for k, v in table.point))
    header = ["Teacher", "Teacher top-1", *[f"Student {table.column_label(c)}" for c in table.columns[1:]]]
    lines = [f"### {heading}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    marked = False
    for row in table.rows:
        empty = not any((row, c) in table.cells or (paper and paper_cell(paper, row, c)) for c in table.columns)
        if row == BASELINE_ROW and empty:  # no baseline trained and none printed (Table 6)
            continue
        cells = []
        for column in table.columns:
            cell = table.cells.get((row, column))
            text = cell.text(table.seeds) if cell else "–"
            if cell and (row, column) in table.shrunk:
                text, marked = text + "†", True
            figure = paper_cell(paper, row, column) if paper else None
            if figure is not None:
                delta = f" ({signed(figure[1])})" if figure[1] is not None else ""
                text += f" · paper {figure[0]:.2f}{delta}"
            cells.append(text)
        lines.append(f"| {table.row_label(row)} | " + " | ".join(cells) + " |")
    partial = any(len(c.values) != table.seeds or (c.delta is not None and c.paired != len(c.values))
                  for c in table.cells.values())
    lines += ["", NOTE.format(n=table.seeds) + (PARTIAL_NOTE if partial else "") + (PAPER_NOTE if paper else "")]
    if marked:
        lines += ["", SHRUNK_NOTE]
    return "\n".join(lines)


def overrides_markdown(results: list[Result], places: list[tuple[str, str]], against: str) -> str:
    """What the runs changed against the paper's recipe (``against`` names it): one line per
    override with the cells whose runs have it (``every run``, ``every run but ...``, or the cells;
    ``(k of n runs)`` where not all of a cell's runs have it); "" where no run was held against a
    paper recipe."""
    compared = [r for r in results if r.compared]
    if not compared:
        return ""
    places = [p for p in dict.fromkeys([*places, *((r.row, r.column) for r in compared)])
              if any((r.row, r.column) == p for r in compared)]
    having: dict[str, dict[tuple[str, str], int]] = {}  # override -> cell -> its runs that have it
    for r in compared:
        for text in dict.fromkeys(override_text(o) for o in r.overrides):
            cells = having.setdefault(text, {})
            cells[r.row, r.column] = cells.get((r.row, r.column), 0) + 1
    runs = {p: sum((r.row, r.column) == p for r in compared) for p in places}
    lines = [f"#### Overrides against the paper's recipe ({against})", ""]
    keys = list(dict.fromkeys(text.split(":", 1)[0] for text in having))
    for text, cells in sorted(having.items(), key=lambda item: keys.index(item[0].split(":", 1)[0])):
        whole = [p for p in places if cells.get(p) == runs[p]]
        part = [f"{series_label(*p)} ({cells[p]} of {runs[p]} runs)" for p in places if 0 < cells.get(p, 0) < runs[p]]
        if len(whole) == len(places):
            where = "every run"
        elif len(whole) > len(places) / 2 and not part:
            where = "every run but " + ", ".join(series_label(*p) for p in places if p not in whole)
        else:
            where = ", ".join([*(series_label(*p) for p in whole), *part])
        lines.append(f"- {text}: {where}")
    if not having:
        lines.append("none: every run trained the paper's recipe")
    left = list(dict.fromkeys(series_label(r.row, r.column) for r in results if not r.compared))
    if left:
        lines.append("- not compared (no recorded recipe, or none in the paper for the cell): " + ", ".join(left))
    return "\n".join(lines)


def csv_text(tables: list[Table], paper: str = "") -> str:
    """One line a cell. ``std`` is empty for one seed; ``delta_n``: the seeds ``delta`` is over;
    ``shrunk``: 1 where a run of the cell trained on less than the paper's recipe (†)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["table", "sweep", "row", "column", "n", "mean", "std", "delta", "delta_n", "paper",
                     "paper_delta", "values", "shrunk"])
    for t in tables:
        sweep = ";".join(f"{k}={v}" for k, v in t.point)
        for (row, column), cell in t.cells.items():
            figure = paper_cell(paper, row, column) if paper else None
            writer.writerow([t.title, sweep, row, column, len(cell.values),
                             f"{cell.mean:.4f}", "" if cell.std is None else f"{cell.std:.4f}",
                             "" if cell.delta is None else f"{cell.delta:.4f}",
                             "" if cell.delta is None else cell.paired,
                             "" if figure is None else figure[0], "" if figure is None or figure[1] is None else figure[1],
                             " ".join(f"{v:.2f}" for v in cell.values), int((row, column) in t.shrunk)])
    return out.getvalue()
