"""``nt-dist report``: a pipeline's results as the paper's tables, with the paper beside them.

Results come from the stage folders of a pipeline file (``metrics.json``) or from an MLflow
experiment (the tags ``nt-dist pipeline`` sets: table, row, column, seed, stage, sweep.<key>).
For each point of the sweep, one table in the paper's layout and order (its rows and columns
as the paper prints them, whatever order the runs come in): the student baselines, then each
teacher row with the teacher's top-1 and every student's top-1 after KD, as mean ± std over
seeds with the change against the student baseline (a nasty teacher: against its adversary;
a ``self`` student: against the row's normal teacher), and the paper's published figure beside
each cell (``nt_dist/paper_tables.yaml``). A label whose runs trained another network than it
names says so (``ResNet-18 (ran: cifar_cnn)``); a cell trained on less than the paper's recipe
(fewer epochs, a step cap, a subset of the data) is marked †, and under the tables every key
a run changed against the paper's recipe is listed (``run.epochs: 1 (paper 160)``). Written as
Markdown and CSV, with a PNG per swept key (students' and teachers' top-1 against the key, on a
log axis for log-spaced values, the paper's published points beside), to a folder and to one
MLflow run per report name, updated by each call.

Our figures are the final epoch's; the paper's are the best test epoch's (the authors keep
``best_model.tar``), which favours the paper by a few tenths.

The rooms: :mod:`~nt_dist.report_paper` (the paper as data), :mod:`~nt_dist.report_recipes`
(overrides against the paper's recipe), :mod:`~nt_dist.report_collect` (results from folders or
MLflow), :mod:`~nt_dist.report_tables` (tables, Markdown, CSV), :mod:`~nt_dist.report_plots`
(sweep plots), :mod:`~nt_dist.report_mlflow` (the report's MLflow run).
"""

from __future__ import annotations

from pathlib import Path

from nt_dist.errors import UserError
from nt_dist.pipeline import Pipeline, Stage
from nt_dist.report_collect import Result, from_mlflow, from_stages
from nt_dist.report_mlflow import log_to_mlflow
from nt_dist.report_paper import paper_cell, paper_tables, series_label
from nt_dist.report_plots import sweep_series, write_plots, x_scale
from nt_dist.report_recipes import SHRUNK_NOTE, paper_pipeline_file
from nt_dist.report_tables import (
    NOTE,
    Cell,
    Table,
    build_table,
    csv_text,
    markdown,
    overrides_markdown,
    ran_labels,
    sweep_points,
)

__all__ = ["NOTE", "SHRUNK_NOTE", "Cell", "Result", "Table", "build_table", "csv_text", "from_mlflow", "from_stages",
           "log_to_mlflow", "markdown", "paper_cell", "paper_order", "paper_tables", "report", "sweep_points",
           "sweep_series", "tracking_of", "write_plots", "x_scale"]


def paper_order(name: str, paper: str) -> tuple[list[str], list[str]]:
    """(rows, columns) in the paper's order: its table's, else its pipeline file's under
    ``recipes/paper/`` (the ablations: the paper prints no table); ([], []) for neither."""
    if paper:
        table = paper_tables()[paper]
        return list(table["rows"]), list(table["columns"])
    path = paper_pipeline_file(name)
    if path is None:
        return [], []
    from nt_dist.pipeline import load_pipeline

    try:
        spec = load_pipeline(path).spec
    except UserError:
        return [], []
    rows = []
    for label in spec.teachers:
        rows += [label, *[n for n, entry in spec.nasty.items() if entry.adversary == label]]
    return list(dict.fromkeys([*rows, *spec.nasty, *spec.defences])), list(spec.students)


def _against(name: str, paper: str) -> str:
    """How the overrides section names the paper recipe it compares with."""
    path = paper_pipeline_file(name, paper)
    if path is None:
        return "the recipes/paper/ file each run was trained from"
    return f"recipes/paper/{path.name}"


def _series_labels(results: list[Result]) -> dict[str, str]:
    """Plot series label -> the label shown, for the series of labels whose runs trained another network."""
    shown = ran_labels(results)
    out = {}
    for r in results:
        row, column = shown.get(("row", r.row), r.row), shown.get(("column", r.column), r.column)
        out[series_label(r.row, r.column)] = series_label(row, column)
    return {k: v for k, v in out.items() if k != v}


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
    rows, columns = paper_order(name, paper)
    tables = [build_table(results, title, point, rows, columns) for point in sweep_points(results)]
    places = list(dict.fromkeys((row, column) for t in tables for row in t.rows for column in t.columns
                                if (row, column) in t.cells))
    sections = [markdown(t, paper) for t in tables]
    overrides = overrides_markdown(results, places, _against(name, paper))
    text = "\n\n".join([*sections, *([overrides] if overrides else [])]) + "\n"
    check_folder(folder, key)  # a read-only parent named before anything is written
    files = [folder / "report.md", folder / "report.csv"]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(files[0], text)
        atomic_write_text(files[1], csv_text(tables, paper))
        files += write_plots(results, folder, name, _series_labels(results))
    except OSError as exc:  # what the access check cannot foresee: a full disk, a quota, a read-only mount
        raise UserError(f"{key}: {folder}: the report could not be written "
                        f"({exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''})") from None
    return text, files


def tracking_of(p: Pipeline, stages: list[Stage]) -> tuple[bool, str]:
    """(enabled, uri) of the pipeline's stages, as their recipes resolve them."""
    from nt_dist.config import load_recipe
    from nt_dist.tracking import tracking_uri

    if not stages:
        return False, ""
    recipe = load_recipe(stages[0].recipe, list(stages[0].overrides))
    return recipe.tracking.enabled, tracking_uri(recipe.tracking)
