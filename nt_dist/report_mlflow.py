"""The report in MLflow: one run ``<name>/report`` per report name and experiment, updated in
place by every ``nt-dist report`` (its files logged again over the last ones, its description
replaced), so the experiment holds one report, not one per call."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

REPORT_QUERY = "tags.stage = 'report'"


def log_to_mlflow(files: list[Path], experiment: str, uri: str, name: str, paper: str, text: str = "",
                  timeout_s: float | None = None) -> str:
    """The run ``<name>/report`` in ``experiment`` holding the report's files, the cells as an
    MLflow table (``results_table.json``: the UI's artifact view shows it as a table) and the
    Markdown tables as the run's description; returns its id. The run a previous report of
    ``name`` made is reused. A store that does not answer within ``timeout_s`` is one UserError
    (the files are written by then: it says where)."""
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


def report_run_id(client: Any, experiment_id: str, name: str) -> str:
    """The newest live report run of ``name`` in the experiment, or ""."""
    runs = client.search_runs([experiment_id], REPORT_QUERY, max_results=1000, order_by=["start_time DESC"])
    return next((run.info.run_id for run in runs if run.data.tags.get("table") == name), "")


def _report_run(client: Any, uri: str, experiment_id: str, files: list[Path], name: str, paper: str,
                text: str) -> str:
    from nt_dist.tracking import log_artifact, log_table

    tags = {"table": name, "stage": "report", "paper": paper, "role": "report"}
    if text:
        tags["mlflow.note.content"] = text
    run_id = report_run_id(client, experiment_id, name)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    else:
        run_id = client.create_run(experiment_id, run_name=f"{name}/report", tags=tags).info.run_id
    try:
        for path in files:
            log_artifact(client, uri, run_id, path, artifact_path="report")
            if path.suffix == ".csv":
                rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
                if rows:
                    log_table(client, uri, run_id, rows, "results_table.json")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
