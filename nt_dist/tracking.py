"""Experiment tracking: MLflow on rank 0, a JSON-lines log beside the run, no lost metrics.

MLflow calls go through one background thread so that a slow or dead tracking server never
stalls a training step. Every event is first appended to ``metrics.jsonl`` in the run folder;
what MLflow has not accepted when the run ends is retried for ``flush_timeout`` seconds and
then written to ``mlflow_undelivered.jsonl`` (plain JSON lines) with a one-line warning.

The embedded default store is SQLite (``sqlite:///mlflow.db``) plus ``mlartifacts/`` in the
working directory: MLflow 3 refuses its plain ``./mlruns`` file store. ``$MLFLOW_TRACKING_URI``
(or ``tracking.uri``) points it at a server instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from nt_dist.config import TrackingConfig
from nt_dist.errors import say, warn
from nt_dist.reach import bound_requests, store_file
from nt_dist.tracking_names import frozen_kinds, lineage_names, mlflow_metrics, present, top1_tag

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
DEFAULT_EXPERIMENT = "nt_dist"  # a recipe built in code, with no file to name the experiment after
GRACE_S = 2.0  # at the run's end, a wait shorter than this goes unannounced (a healthy store's last batch)


def tracking_uri(cfg: TrackingConfig) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite store in the cwd."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def store_folder(uri: str) -> Path | None:
    """The folder of a SQLite store's database file; None for servers."""
    database = store_file(uri)
    return None if database is None else database.parent


def artifacts_beside(uri: str) -> str | None:
    """For a SQLite store, artifacts go to ``mlartifacts/`` beside the database file (what
    ``mlflow server --default-artifact-root`` would do); servers choose their own."""
    folder = store_folder(uri)
    return None if folder is None else (folder / DEFAULT_ARTIFACTS).as_uri()


# The runs table of every experiment nt_dist creates, as a view the MLflow UI lists under
# "Views" and opens from ?viewStateShareKey=nt-dist (an experiment tag the UI reads; MLflow 3
# has no setting for an experiment's default columns). Widths in px, measured in MLflow 3.17's
# table so that a 1440 px window shows them all beside Created (150) and Duration (80), the
# Dataset column (300) left out: the run name's 230 hold the longest of tracking_names' names
# (32 characters), teacher and adversary "nasty cifar_shufflenetv2"; the seed is in the name.
VIEW_KEY = "nt-dist"
VIEW_COLUMNS = {"tags.`top1`": 65, "tags.`role`": 75, "tags.`architecture`": 120, "tags.`teacher`": 150,
                "tags.`adversary`": 150, "tags.`dataset`": 75}
RUN_NAME_WIDTH = 230
# MLflow 3 opens in GenAI mode unless the address (or the browser's last choice) says otherwise
MODE = "workflowType=machine_learning"


def view_state() -> str:
    widths = {"attributes.`Run Name`": RUN_NAME_WIDTH, **VIEW_COLUMNS}  # the UI sizes the columns it orders
    return json.dumps({"selectedColumns": list(VIEW_COLUMNS), "columnOrder": list(widths), "columnWidths": widths,
                       "orderByKey": "attributes.start_time", "orderByAsc": False})


def experiment_tags() -> dict[str, str]:
    view = {"name": "nt-dist: score, role, lineage", "createdAt": int(time.time() * 1000), "state": view_state()}
    return {f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(view)}


def runs_page(experiment_id: str) -> str:
    """The UI's address (after ``#``) of an experiment's runs table in nt_dist's view."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&{MODE}"


def run_page(experiment_id: str, run_id: str) -> str:
    """The UI's address (after ``#``) of one run, in model-training mode."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{MODE}"


def _view_is_current(tags: dict[str, str]) -> bool:
    try:
        return json.loads(tags[f"mlflow.sharedViewState.{VIEW_KEY}"])["state"] == view_state()
    except (KeyError, TypeError, ValueError):
        return False


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if needed with nt_dist's runs view and, for a
    SQLite store, an artifact location relative to the store's folder (``mlartifacts/<id>``),
    so that the folder holding ``mlflow.db`` and ``mlartifacts/`` can be moved."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if not _view_is_current(found.tags):  # made before this nt_dist's view
            try:
                for key, value in experiment_tags().items():
                    client.set_experiment_tag(found.experiment_id, key, value)
            except Exception:  # noqa: BLE001 - a view is a convenience: a server may refuse tags
                pass
        return found.experiment_id
    try:
        experiment_id = client.create_experiment(name, artifact_location=artifacts_beside(uri),
                                                 tags=experiment_tags())
    except Exception:  # noqa: BLE001 - another process created it first
        return client.get_experiment_by_name(name).experiment_id
    database = store_file(uri)
    if database is not None:
        _relative_artifacts(database, experiment_id)
    return experiment_id


def _relative_artifacts(database: Path, experiment_id: str) -> None:
    """MLflow's store makes every artifact location absolute (against the cwd of the process
    that creates the experiment); a relative one is read against the cwd of the reader, which
    ``nt-dist ui`` and :func:`log_artifact` set to the store's folder. Set while the new
    experiment has no run: a run's artifact URI is fixed when the run is created."""
    import sqlite3

    with sqlite3.connect(database, timeout=30) as connection:
        connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ? AND NOT EXISTS "
                           "(SELECT 1 FROM runs WHERE experiment_id = ?)",
                           (f"{DEFAULT_ARTIFACTS}/{experiment_id}", int(experiment_id), int(experiment_id)))
    connection.close()


def log_artifact(client: Any, uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """``client.log_artifact``, except that a run whose artifact URI is relative (see
    :func:`ensure_experiment`) stores its files under the SQLite store's folder."""
    artifact_uri = client.get_run(run_id).info.artifact_uri
    folder = store_folder(uri)
    if folder is not None and "://" not in artifact_uri and not artifact_uri.startswith(("/", "file:")):
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        LocalArtifactRepository(str(folder / artifact_uri)).log_artifact(str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def log_table(client: Any, uri: str, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    """What ``MlflowClient.log_table`` writes (pandas' split-oriented JSON, and the tag that
    makes the UI's artifact view draw it as a table), through :func:`log_artifact`."""
    import tempfile

    columns = list(rows[0]) if rows else []
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / artifact_file
        path.write_text(json.dumps({"columns": columns, "data": [[r[c] for c in columns] for r in rows]}),
                        encoding="utf-8")
        log_artifact(client, uri, run_id, path)
    client.set_tag(run_id, "mlflow.loggedArtifacts", json.dumps([{"path": artifact_file, "type": "table"}]))


def experiment_of(cfg: TrackingConfig) -> str:
    return cfg.experiment or DEFAULT_EXPERIMENT


class Tracker:
    """Rank 0's window on MLflow. On other ranks (``active=False``) every method is a no-op."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, active: bool) -> None:
        self.cfg, self.run_dir, self.active = cfg, run_dir, active
        self.flush_timeout = cfg.timeout_s
        self.run_id = ""
        self.experiment_id = ""
        self._client: Any = None
        self._monitor: Any = None  # MLflow's SystemMetricsMonitor
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._pending: list[tuple[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._created = threading.Event()
        self._lock = threading.Lock()
        self._announced = False  # the closing wait has been announced (finish)
        self._kinds: list[str] = []  # the frozen networks the run learned from (teacher, adversary)

    # ------------------------------------------------------------------ lifecycle

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str], resume_run_id: str = "") -> str:
        """Create (or reopen) the MLflow run in the background and wait up to ``timeout_s`` for
        its id. An unreachable server does not stop training: the id stays "" and the events
        wait on disk and in memory until the server answers or the run ends. The name, tags and
        params go as :func:`nt_dist.tracking_names.present` shows them (a short name, paths relative
        to the run folder)."""
        if not self.active:
            return ""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.cfg.enabled:
            return ""
        bound_requests(self.flush_timeout)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # our closing line has it
        for name in ("mlflow.store.db.utils", "alembic"):  # INFO chatter on stderr
            logging.getLogger(name).setLevel(logging.WARNING)
        # the monitor warns in MLflow's own multi-line format on every failed publication; what
        # was not delivered is named in one line at the end (finish)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
        import mlflow.tracking  # noqa: F401 - imported here: the import is slow and is not an MLflow call

        run_name, tags, params = present(run_name, params, tags, self.run_dir)
        self._kinds = frozen_kinds(tags)
        # the client is built on the delivery thread: opening a store (SQLite schema migrations,
        # a server's first answer) is an MLflow call like any other, bounded by timeout_s here
        self._submit("create", {"run_name": run_name, "tags": tags, "resume_run_id": resume_run_id,
                                "params": {k: _param(v) for k, v in params.items()}})
        self._thread = threading.Thread(target=self._worker, name="nt-dist-mlflow", daemon=True)
        self._thread.start()
        if not self._created.wait(self.flush_timeout):
            warn(f"MLflow at {tracking_uri(self.cfg)} is not answering; training goes on and the "
                 "tracking events are kept")
        return self.run_id

    def _create(self, run_name: str, tags: dict[str, str], resume_run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = MlflowClient(tracking_uri=tracking_uri(self.cfg))

        if not (resume_run_id and self._reopen(resume_run_id)):
            lineage_names(self._client, tags)
            run = self._client.create_run(self._experiment_id(), run_name=run_name, tags=tags)
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self._client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)
        else:
            self.run_id = resume_run_id
        self._created.set()
        self._start_system_metrics(resumed=self.run_id == resume_run_id)

    def _start_system_metrics(self, resumed: bool) -> None:
        """MLflow's monitor samples CPU, memory, disk, network (and GPUs, through NVML) on its
        own thread and logs ``system/*`` metrics every ``system_metrics_interval_s``."""
        if not self.cfg.system_metrics:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.cfg.system_metrics_interval_s,
                                                 resume_logging=resumed, tracking_uri=tracking_uri(self.cfg))
            self._monitor.start()
        except Exception as exc:  # noqa: BLE001 - psutil missing, a server refusing: training goes on
            warn(f"MLflow system metrics are off for this run: {exc}")
            self._monitor = None

    def _reopen(self, run_id: str) -> bool:
        try:
            self._client.update_run(run_id, status="RUNNING")
            self.experiment_id = self._client.get_run(run_id).info.experiment_id
            return True
        except Exception:  # noqa: BLE001 - the run lives in another store: start a new one
            return False

    def _experiment_id(self) -> str:
        return ensure_experiment(self._client, experiment_of(self.cfg), tracking_uri(self.cfg))

    def finish(self, status: str = "FINISHED") -> None:
        """Deliver what is queued, then mark the run ``status`` (FINISHED, FAILED or KILLED).
        The system metrics' last samples and the queued events share one ``timeout_s``: waited
        for one after the other, each with its own, a store gone away cost twice that."""
        if not self.active or self._thread is None:
            return
        deadline = time.monotonic() + self.flush_timeout
        self._announced = False
        self._stop_system_metrics(deadline)
        self._submit("status", status)
        self._queue.put(None)
        self._wait(self._thread, deadline)
        self._stop.set()
        leftover = self._drain()
        if leftover:
            path = self.run_dir / "mlflow_undelivered.jsonl"
            with path.open("a", encoding="utf-8") as handle:
                for kind, payload in leftover:
                    handle.write(json.dumps({"run_id": self.run_id, "kind": kind, "payload": payload}) + "\n")
            warn(f"MLflow did not accept {len(leftover)} tracking events; they are kept in {path}")
        self._thread = None

    def _wait(self, thread: threading.Thread, deadline: float) -> None:
        """Join ``thread`` until ``deadline``; a wait longer than :data:`GRACE_S` is announced
        once, so that the silence after a run's ``done`` line has a reason and an end."""
        thread.join(max(0.0, min(GRACE_S, deadline - time.monotonic())))
        left = deadline - time.monotonic()
        if not thread.is_alive() or left <= 0:
            return
        if not self._announced:
            self._announced = True
            uri = tracking_uri(self.cfg)
            what = "tracking store" if store_file(uri) is not None else "tracking server"
            say(f"nt-dist: waiting up to {left:.0f} s (tracking.timeout_s) for the {what} at {uri} "
                "to take the run's last events")
        thread.join(left)

    def _stop_system_metrics(self, deadline: float) -> None:
        """Stop the monitor and deliver its last samples, until ``deadline``: its own ``finish``
        joins without a limit (minutes when the server has gone away)."""
        if self._created.is_set() and self._monitor is not None:
            stopper = threading.Thread(target=_last_sample, args=(self._monitor,), name="nt-dist-system-metrics",
                                       daemon=True)
            stopper.start()
            self._wait(stopper, deadline)
            self._monitor = None

    # ------------------------------------------------------------------ events

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Append to ``metrics.jsonl`` now; hand to MLflow in the background."""
        if not self.active:
            return
        self.log_local({"step": step, **metrics})
        if self._thread is not None:
            self._submit("metrics", {"step": step, "timestamp": int(time.time() * 1000),
                                     "values": mlflow_metrics(metrics, self._kinds), "tags": top1_tag(metrics)})

    def log_artifact(self, path: Path) -> None:
        if self.active and self._thread is not None:
            self._submit("artifact", str(path))

    def log_inputs(self, inputs: list[Any]) -> None:
        """The data set splits a run read (``nt_dist.data.DataInput``), as MLflow dataset inputs."""
        if self.active and self._thread is not None and inputs:
            self._submit("inputs", [dataclasses.asdict(item) for item in inputs])

    def mark(self, status: str) -> None:
        """Tell MLflow the run's status now (thread-safe), ahead of :meth:`finish`: a process about
        to be killed (:class:`~nt_dist.ranks.Preemption`'s stall) leaves no RUNNING run."""
        if self.active and self._thread is not None:
            self._submit("status", status)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active and self._thread is not None:
            self._submit("tags", tags)

    def log_local(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with self._lock, (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    # ------------------------------------------------------------------ delivery

    def _submit(self, kind: str, payload: Any) -> None:
        self._queue.put((kind, payload))

    def _drain(self) -> list[tuple[str, Any]]:
        items = list(self._pending)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item is not None:
                items.append(item)

    def _worker(self) -> None:
        """Deliver events in order; on failure keep them and retry with backoff."""
        delay, closing = 1.0, False
        while not self._stop.is_set():
            if not self._pending:
                item = self._queue.get()
                if item is None:
                    return
                self._pending.append(item)
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                else:
                    self._pending.append(item)
            try:
                while self._pending:
                    self._deliver(*self._pending[0])
                    self._pending.pop(0)
                delay = 1.0
                if closing:
                    return
            except Exception:  # noqa: BLE001 - network/server errors: keep and retry
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, 30.0)

    def _deliver(self, kind: str, payload: Any) -> None:
        from mlflow.entities import Metric, RunTag

        if kind == "create":
            self._create(**payload)
            return
        client, run_id = self._client, self.run_id
        if kind == "metrics":
            metrics = [Metric(k, v, payload["timestamp"], payload["step"]) for k, v in payload["values"].items()]
            tags = [RunTag(k, v) for k, v in payload.get("tags", {}).items()]
            client.log_batch(run_id, metrics=metrics, tags=tags, synchronous=True)
        elif kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in payload.items()], synchronous=True)
        elif kind == "artifact":
            log_artifact(client, tracking_uri(self.cfg), run_id, Path(payload))
        elif kind == "inputs":
            from mlflow.entities import Dataset, DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            client.log_inputs(run_id, datasets=[
                DatasetInput(Dataset(item["name"], item["digest"], "local", json.dumps({"uri": item["source"]}),
                                     profile=json.dumps(item["profile"])),
                             tags=[InputTag(MLFLOW_DATASET_CONTEXT, item["context"])]) for item in payload])
        elif kind == "status":
            client.set_terminated(run_id, status=payload)


def _last_sample(monitor: Any) -> None:
    """Stop MLflow's monitor, then log what it sampled since its last publication with one
    more sample: its loop publishes only after whole intervals, so a run shorter than one
    would have no system metrics at all."""
    try:
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception:  # noqa: BLE001 - the run's end is what matters
        pass


def _param(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]
