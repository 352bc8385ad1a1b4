"""The results a report is made of: from a pipeline's stage folders (``metrics.json``) or from
an MLflow experiment (the tags ``nt-dist pipeline`` sets: table, row, column, seed, stage,
sweep.<key>), each with what it changed against the paper's recipe and what it trained
(:mod:`nt_dist.report_recipes`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nt_dist.errors import UserError
from nt_dist.pipeline import KINDS, Stage
from nt_dist.report_recipes import Override, Provenance, provenance, stage_record
from nt_dist.rundir import RESULTS_FILE


@dataclass(frozen=True)
class Result:
    kind: str  # teacher | nasty | student | baseline
    row: str
    column: str
    seed: int
    sweep: tuple[tuple[str, str], ...]
    top1: float
    reference_row: str = ""
    ran: str = ""  # the architecture the run trained, where its label names another
    overrides: tuple[Override, ...] = ()  # (key, ours, the paper's) against the paper's recipe
    shrunk: bool = False  # trained on less than the paper's recipe (fewer epochs, steps or images)
    compared: bool = False  # held against a paper recipe (no overrides then means: none)


def _with(result: Result, p: Provenance) -> Result:
    return Result(result.kind, result.row, result.column, result.seed, result.sweep, result.top1,
                  result.reference_row, p.ran, p.overrides, p.shrunk, p.compared)


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
        result = Result(stage.kind, stage.row, stage.column, stage.seed,
                        tuple((k, str(v)) for k, v in stage.sweep), top1, stage.reference_row)
        architecture, params = stage_record(stage.output_dir)
        results.append(_with(result, provenance(stage.kind, stage.row, stage.column, (k for k, _ in stage.sweep),
                                                stage.tags.get("table", ""), stage.tags.get("paper", ""),
                                                str(stage.recipe), architecture, params)))
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
        results.append(_with(result, provenance(result.kind, result.row, result.column, (k for k, _ in sweep),
                                                tags.get("table", ""), tags.get("paper", ""),
                                                tags.get("mlflow.source.name", ""), tags.get("architecture", ""),
                                                dict(run.data.params))))
        tables.add(tags.get("table", ""))
        papers.add(tags.get("paper", ""))
    if not results:
        raise UserError(f"--experiment: {experiment!r} holds no finished pipeline runs"
                        + (f" of table {table!r}" if table else ""))
    if len(tables) > 1:
        raise UserError(f"--experiment: {experiment!r} holds runs of several pipelines ({', '.join(sorted(tables))}); "
                        "pass --table NAME")
    results.reverse()  # oldest first: the order the pipeline ran them, as a report from its folders has them
    return results, tables.pop(), (papers.pop() if len(papers) == 1 else "")
