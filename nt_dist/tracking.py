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

import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from nt_dist.config import TrackingConfig
from nt_dist.errors import warn

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri(cfg: TrackingConfig) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite store in the cwd."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def artifacts_beside(uri: str) -> str | None:
    """For a SQLite store, artifacts go to ``mlartifacts/`` beside the database file (what
    ``mlflow server --default-artifact-root`` would do); servers choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / DEFAULT_ARTIFACTS).as_uri()


class Tracker:
    """Rank 0's window on MLflow. On other ranks (``active=False``) every method is a no-op."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, active: bool) -> None:
        self.cfg, self.run_dir, self.active = cfg, run_dir, active
        self.flush_timeout = cfg.timeout_s
        self.run_id = ""
        self._client: Any = None
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._pending: list[tuple[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._created = threading.Event()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str], resume_run_id: str = "") -> str:
        """Create (or reopen) the MLflow run in the background and wait up to ``timeout_s`` for
        its id. An unreachable server does not stop training: the id stays "" and the events
        wait on disk and in memory until the server answers or the run ends."""
        if not self.active:
            return ""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.cfg.enabled:
            return ""
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        import mlflow.tracking  # noqa: F401 - imported here: the import is slow and is not an MLflow call

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
            run = self._client.create_run(self._experiment_id(), run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self._client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)
        else:
            self.run_id = resume_run_id
        self._created.set()

    def _reopen(self, run_id: str) -> bool:
        try:
            self._client.update_run(run_id, status="RUNNING")
            return True
        except Exception:  # noqa: BLE001 - the run lives in another store: start a new one
            return False

    def _experiment_id(self) -> str:
        name = self.cfg.experiment
        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = artifacts_beside(tracking_uri(self.cfg))
        try:
            return self._client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - another process created it first
            return self._client.get_experiment_by_name(name).experiment_id

    def finish(self, status: str = "FINISHED") -> None:
        """Deliver what is queued, then mark the run ``status`` (FINISHED, FAILED or KILLED)."""
        if not self.active or self._thread is None:
            return
        self._submit("status", status)
        self._queue.put(None)
        self._thread.join(self.flush_timeout)
        self._stop.set()
        leftover = self._drain()
        if leftover:
            path = self.run_dir / "mlflow_undelivered.jsonl"
            with path.open("a", encoding="utf-8") as handle:
                for kind, payload in leftover:
                    handle.write(json.dumps({"run_id": self.run_id, "kind": kind, "payload": payload}) + "\n")
            warn(f"MLflow did not accept {len(leftover)} tracking events; they are kept in {path}")
        self._thread = None

    # ------------------------------------------------------------------ events

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Append to ``metrics.jsonl`` now; hand to MLflow in the background."""
        if not self.active:
            return
        self.log_local({"step": step, **metrics})
        if self._thread is not None:
            self._submit("metrics", {"step": step, "timestamp": int(time.time() * 1000),
                                     "values": {k: float(v) for k, v in metrics.items()}})

    def log_artifact(self, path: Path) -> None:
        if self.active and self._thread is not None:
            self._submit("artifact", str(path))

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
            client.log_batch(run_id, metrics=metrics, synchronous=True)
        elif kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in payload.items()], synchronous=True)
        elif kind == "artifact":
            client.log_artifact(run_id, payload)
        elif kind == "status":
            client.set_terminated(run_id, status=payload)


def _param(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]
