"""``nt-dist report``: a pipeline's results as the paper's tables, with the paper beside them.

Results come from the stage folders of a pipeline file (``metrics.json``) or from an MLflow
experiment (the tags ``nt-dist pipeline`` sets: table, row, column, seed, stage, sweep.<key>).
For each point of the sweep, one table in the paper's layout: the student baselines, then each
teacher row with the teacher's top-1 and every student's top-1 after KD, as mean ± std over
seeds with the change against the student baseline (a nasty teacher: against its adversary;
a ``self`` student: against the row's normal teacher), and the paper's published figure beside
each cell (``nt_dist/paper_tables.yaml``). Written as Markdown and CSV, with a PNG per swept key
(students' and teachers' top-1 against the key), to a folder and to MLflow as artifacts.

Our figures are the final epoch's; the paper's are the best test epoch's (the authors keep
``best_model.tar``), which favours the paper by a few tenths.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from nt_dist.errors import UserError
from nt_dist.formatting import mean_spread, signed
from nt_dist.pipeline import BASELINE_ROW, KINDS, TEACHER_COLUMN, Pipeline, Stage
from nt_dist.rundir import RESULTS_FILE
from nt_dist.yamlio import parse_yaml

NOTE = ("final-epoch top-1, mean ± sample std over {n} seed(s); in brackets: the change against the student "
        "baseline (a nasty teacher: against its normal teacher)")
PARTIAL_NOTE = ("; n=k: a cell over k seeds, or (in brackets) a change over the k seeds the two cells "
                "compared have in common")
PAPER_NOTE = "; paper: the published figure, best test epoch of one run"


@dataclass(frozen=True)
class Result:
    kind: str  # teacher | nasty | student | baseline
    row: str
    column: str
    seed: int
    sweep: tuple[tuple[str, str], ...]
    top1: float
    reference_row: str = ""


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
    point: tuple[tuple[str, str], ...]
    rows: list[str]  # "student baseline" first, then teacher rows
    columns: list[str]  # "teacher", then the students
    cells: dict[tuple[str, str], Cell]
    seeds: int


# ----------------------------------------------------------------------------- the paper


@cache
def paper_tables() -> dict[str, Any]:
    """The paper's Tables 1-6 as shipped in the package (``nt_dist/paper_tables.yaml``)."""
    text = resources.files("nt_dist").joinpath("paper_tables.yaml").read_text(encoding="utf-8")
    return parse_yaml(text, "nt_dist/paper_tables.yaml")


def paper_cell(table: str, row: str, column: str) -> tuple[float, float | None] | None:
    entry = paper_tables().get(table, {}).get("rows", {}).get(row, {}).get(column)
    return (float(entry[0]), None if entry[1] is None else float(entry[1])) if entry else None


# ----------------------------------------------------------------------------- collecting


def from_stages(stages: Iterable[Stage]) -> tuple[list[Result], list[str]]:
    """Results of the stages whose folder holds a finished run; and the names of the others."""
    results, missing = [], []
    for stage in stages:
        try:
            final = json.loads((stage.output_dir / RESULTS_FILE).read_text(encoding="utf-8"))["final"]
            top1 = float(final["test_top1"])
        except (OSError, ValueError, KeyError, TypeError):
            missing.append(stage.name)
            continue
        results.append(Result(stage.kind, stage.row, stage.column, stage.seed,
                              tuple((k, str(v)) for k, v in stage.sweep), top1, stage.reference_row))
    return results, missing


def from_mlflow(experiment: str, uri: str, table: str = "",
                timeout_s: float | None = None) -> tuple[list[Result], str, str]:
    """Finished runs of ``experiment`` tagged by a pipeline (of ``table`` when given).
    Returns the results, the pipeline's name and its paper table key. A store that does not
    answer within ``timeout_s`` (default: ``tracking.timeout_s``'s) is one UserError."""
    from mlflow.tracking import MlflowClient

    from nt_dist.reach import check_store, contact, store_errors, timeout_default

    check_store(uri)
    hint = "; start it, or pass --tracking-uri"

    def first_call() -> tuple[Any, Any]:  # a SQLite store is opened (and migrated) with its client
        client = MlflowClient(tracking_uri=uri)
        return client, client.get_experiment_by_name(experiment)

    client, found = contact(uri, timeout_default() if timeout_s is None else timeout_s, first_call, hint)
    if found is None:
        raise UserError(f"--experiment: {experiment!r} not found in {uri}")
    with store_errors(uri, hint):
        return _finished_runs(client, found.experiment_id, experiment, table)


def _finished_runs(client: Any, experiment_id: str, experiment: str, table: str) -> tuple[list[Result], str, str]:
    query = "attributes.status = 'FINISHED' and tags.stage != 'report'"
    if table:
        query += f" and tags.table = '{table}'"
    results, tables, papers, seen = [], set(), set(), set()
    # newest first: a cell trained again (run.resume=never) counts once, with its newest run
    for run in client.search_runs([experiment_id], query, max_results=50_000, order_by=["start_time DESC"]):
        tags, metric = run.data.tags, run.data.metrics.get("test_top1")
        if metric is None or tags.get("stage") not in KINDS:
            continue
        sweep = tuple(sorted((k.removeprefix("sweep."), v) for k, v in tags.items() if k.startswith("sweep.")))
        result = Result(tags["stage"], tags.get("row", ""), tags.get("column", ""), int(tags.get("seed", 0)),
                        sweep, float(metric), tags.get("reference_row", ""))
        cell = (tags.get("table"), result.kind, result.row, result.column, result.seed, result.sweep)
        if cell in seen:
            continue
        seen.add(cell)
        results.append(result)
        tables.add(tags.get("table", ""))
        papers.add(tags.get("paper", ""))
    if not results:
        raise UserError(f"--experiment: {experiment!r} holds no finished pipeline runs"
                        + (f" of table {table!r}" if table else ""))
    if len(tables) > 1:
        raise UserError(f"--experiment: {experiment!r} holds runs of several pipelines ({', '.join(sorted(tables))}); "
                        "pass --table NAME")
    return results, tables.pop(), (papers.pop() if len(papers) == 1 else "")


# ----------------------------------------------------------------------------- tables


def sweep_points(results: list[Result]) -> list[tuple[tuple[str, str], ...]]:
    """Every combination of the swept values seen (``[()]`` without a sweep)."""
    keys: dict[str, list[str]] = {}
    for r in results:
        for k, v in r.sweep:
            if v not in keys.setdefault(k, []):
                keys[k].append(v)
    points: list[tuple[tuple[str, str], ...]] = [()]
    for key, values in keys.items():
        points = [(*p, (key, v)) for p in points for v in _sorted_values(values)]
    return points


def _sorted_values(values: list[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def _at(results: list[Result], point: tuple[tuple[str, str], ...]) -> list[Result]:
    """Results that belong to ``point``: a stage the swept key does not reach belongs to every value."""
    fixed = dict(point)
    return [r for r in results if all(fixed.get(k) == v for k, v in r.sweep)]


def build_table(results: list[Result], title: str, point: tuple[tuple[str, str], ...] = (),
                row_order: Iterable[str] = ()) -> Table:
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
    return Table(title, point, [BASELINE_ROW, *rows], [TEACHER_COLUMN, *students], cells, seeds)


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
    """The paper's order where it lists the rows; else each normal teacher followed by the
    nasty teachers trained against it."""
    if paper and all(r in paper for r in rows):
        return sorted(rows, key=paper.index)
    ordered = []
    for row in rows:
        if row not in reference:
            ordered += [row, *[n for n in rows if reference.get(n) == row]]
    return ordered + [r for r in rows if r not in ordered]


def markdown(table: Table, paper: str = "") -> str:
    heading = table.title + ("" if not table.point else " — " + ", ".join(f"{k} = {v}" for k, v in table.point))
    header = ["Teacher", "Teacher top-1", *[f"Student {c}" for c in table.columns[1:]]]
    lines = [f"### {heading}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        empty = not any((row, c) in table.cells or (paper and paper_cell(paper, row, c)) for c in table.columns)
        if row == BASELINE_ROW and empty:  # no baseline trained and none printed (Table 6)
            continue
        cells = []
        for column in table.columns:
            cell = table.cells.get((row, column))
            text = cell.text(table.seeds) if cell else "–"
            figure = paper_cell(paper, row, column) if paper else None
            if figure is not None:
                delta = f" ({signed(figure[1])})" if figure[1] is not None else ""
                text += f" · paper {figure[0]:.2f}{delta}"
            cells.append(text)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    partial = any(len(c.values) != table.seeds or (c.delta is not None and c.paired != len(c.values))
                  for c in table.cells.values())
    lines += ["", NOTE.format(n=table.seeds) + (PARTIAL_NOTE if partial else "") + (PAPER_NOTE if paper else "")]
    return "\n".join(lines)


def csv_text(tables: list[Table], paper: str = "") -> str:
    """One line a cell. ``std`` is empty for one seed; ``delta_n``: the seeds ``delta`` is over."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["table", "sweep", "row", "column", "n", "mean", "std", "delta", "delta_n", "paper",
                     "paper_delta", "values"])
    for t in tables:
        sweep = ";".join(f"{k}={v}" for k, v in t.point)
        for (row, column), cell in t.cells.items():
            figure = paper_cell(paper, row, column) if paper else None
            writer.writerow([t.title, sweep, row, column, len(cell.values), f"{cell.mean:.4f}",
                             "" if cell.std is None else f"{cell.std:.4f}",
                             "" if cell.delta is None else f"{cell.delta:.4f}",
                             "" if cell.delta is None else cell.paired,
                             "" if figure is None else figure[0], "" if figure is None or figure[1] is None else figure[1],
                             " ".join(f"{v:.2f}" for v in cell.values)])
    return out.getvalue()


# ----------------------------------------------------------------------------- plots


def sweep_series(results: list[Result], key: str) -> tuple[dict[str, list], dict[str, list]]:
    """For a swept ``key``: (students' series, teachers' series), label -> [(x, mean, std)].
    A stage the key does not reach (a baseline under an ω sweep) is a flat line."""
    values = _sorted_values(list(dict.fromkeys(v for r in results for k, v in r.sweep if k == key)))
    students: dict[str, list] = {}
    teachers: dict[str, list] = {}
    for value in values:
        here = [r for r in results if dict(r.sweep).get(key, value) == value]
        groups: dict[tuple[str, str], list[float]] = {}
        for r in here:
            label = (f"{r.column} alone" if r.kind == "baseline" else f"{r.column} ← {r.row}"
                     if r.kind == "student" else r.row)
            groups.setdefault((r.kind in ("student", "baseline") and "s" or "t", label), []).append(r.top1)
        for (side, label), vs in groups.items():
            point = (float(value), statistics.fmean(vs), statistics.stdev(vs) if len(vs) > 1 else 0.0)
            (students if side == "s" else teachers).setdefault(label, []).append(point)
    return students, teachers


def write_plots(results: list[Result], folder: Path, name: str) -> list[Path]:
    from nt_dist.plots import sweep_plot

    paths = []
    for key in dict.fromkeys(k for r in results for k, _ in r.sweep):
        try:
            students, teachers = sweep_series(results, key)
        except ValueError:  # a non-numeric sweep (e.g. a model name) has no axis
            continue
        for side, series, what in (("students", students, "student top-1 after KD (%)"),
                                   ("teachers", teachers, "teacher top-1 (%)")):
            if series:
                paths.append(sweep_plot(folder / f"{name}_{key}_{side}.png", title=f"{name}: {what} against {key}",
                                        xlabel=key, ylabel=what, series=series))
    return paths


# ----------------------------------------------------------------------------- the command


def report(results: list[Result], name: str, paper: str, folder: Path, key: str = "--out") -> tuple[str, list[Path]]:
    """Write ``<folder>/report.md``, ``report.csv`` and the sweep PNGs; return the Markdown and
    the files. A folder that cannot be written is one UserError naming it (``key``: where the
    user chooses it)."""
    from nt_dist.fileio import atomic_write_text
    from nt_dist.preflight import check_folder

    if paper and paper not in paper_tables():
        raise UserError(f"paper: {paper!r} is not a table of nt_dist/paper_tables.yaml "
                        f"({', '.join(paper_tables())})")
    title = paper_tables()[paper]["title"] if paper else name
    order = list(paper_tables()[paper]["rows"]) if paper else []
    tables = [build_table(results, title, point, order) for point in sweep_points(results)]
    text = "\n\n".join(markdown(t, paper) for t in tables) + "\n"
    check_folder(folder, key)  # a read-only parent named before anything is written
    files = [folder / "report.md", folder / "report.csv"]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(files[0], text)
        atomic_write_text(files[1], csv_text(tables, paper))
        files += write_plots(results, folder, name)
    except OSError as exc:  # what the access check cannot foresee: a full disk, a quota, a read-only mount
        raise UserError(f"{key}: {folder}: the report could not be written "
                        f"({exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''})") from None
    return text, files


def log_to_mlflow(files: list[Path], experiment: str, uri: str, name: str, paper: str, text: str = "",
                  timeout_s: float | None = None) -> str:
    """One run ``<name>/report`` in ``experiment`` holding the report's files, the cells as an
    MLflow table (``results_table.json``: the UI's artifact view shows it as a table) and the
    Markdown tables as the run's description; returns its id. A store that does not answer
    within ``timeout_s`` is one UserError (the files are written by then: it says where)."""
    from mlflow.tracking import MlflowClient

    from nt_dist.reach import check_store, contact, store_errors, timeout_default
    from nt_dist.tracking import ensure_experiment

    check_store(uri)
    hint = f"; the report is in {files[0].parent} (--no-mlflow: do not log it)" if files else ""

    def first_call() -> tuple[Any, str]:  # the experiment as the training runs would create it
        client = MlflowClient(tracking_uri=uri)
        return client, ensure_experiment(client, experiment, uri)

    client, experiment_id = contact(uri, timeout_default() if timeout_s is None else timeout_s, first_call, hint)
    with store_errors(uri, hint):
        return _report_run(client, uri, experiment_id, files, name, paper, text)


def _report_run(client: Any, uri: str, experiment_id: str, files: list[Path], name: str, paper: str,
                text: str) -> str:
    from nt_dist.tracking import log_artifact, log_table

    tags = {"table": name, "stage": "report", "paper": paper, "role": "report"}
    if text:
        tags["mlflow.note.content"] = text
    run = client.create_run(experiment_id, run_name=f"{name}/report", tags=tags)
    try:
        for path in files:
            log_artifact(client, uri, run.info.run_id, path, artifact_path="report")
            if path.suffix == ".csv":
                rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
                if rows:
                    log_table(client, uri, run.info.run_id, rows, "results_table.json")
    except Exception:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def tracking_of(p: Pipeline, stages: list[Stage]) -> tuple[bool, str]:
    """(enabled, uri) of the pipeline's stages, as their recipes resolve them."""
    from nt_dist.config import load_recipe
    from nt_dist.tracking import tracking_uri

    if not stages:
        return False, ""
    recipe = load_recipe(stages[0].recipe, list(stages[0].overrides))
    return recipe.tracking.enabled, tracking_uri(recipe.tracking)
