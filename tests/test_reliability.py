"""Faults a long cluster run meets: bad numbers, a dead rank, a tracking server that goes away."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, MlflowServer, tiny_overrides
from mlflow.tracking import MlflowClient

NT_DIST = str(Path(sys.executable).with_name("nt-dist"))
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def args(overrides: list[str]) -> list[str]:
    return sum((["--set", o] for o in overrides), [])


def test_nan_loss_stops_the_run_naming_the_step_and_parts(tmp_path: Path):
    out = tmp_path / "nan"
    overrides = tiny_overrides(out, "teacher", **{"optim.lr": "1e30", "run.name": "nan_run",
                                                  "run.checkpoint_every_steps": "1"})
    proc = subprocess.run([NT_DIST, "train", str(REPO / "recipes" / "digits_teacher.yaml"), *args(overrides)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nt-dist: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "non-finite loss at step 2 (epoch 1): loss=nan, ce=nan" in errors[0]
    # the only checkpoint is the one before the NaN; the run is FAILED, not complete
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000000001"]
    assert not (out / "metrics.json").exists()
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                              "tags.`mlflow.runName` = 'nan_run'")
    assert [r.info.status for r in runs] == ["FAILED"]


def workers_of(launcher: psutil.Process) -> list[psutil.Process]:
    return [p for p in launcher.children(recursive=True)
            if "nt_dist.train" in " ".join(p.cmdline()) and "accelerate" not in " ".join(p.cmdline())]


@pytest.mark.distributed
def test_a_dead_rank_ends_the_whole_job_promptly(tmp_path: Path):
    out = tmp_path / "ddp"
    overrides = tiny_overrides(out, "teacher", **{"run.epochs": "200", "tracking.enabled": "false",
                                                  "data.train_subset": "0"})
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "nt_dist.train", str(REPO / "recipes" / "digits_teacher.yaml"), *args(overrides)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not list((out / "checkpoints").glob("step_*")) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        workers = workers_of(psutil.Process(proc.pid))
        assert len(workers) == 2
        victim = workers[-1]
        killed_at = time.time()
        victim.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
        elapsed = time.time() - killed_at
        assert proc.returncode != 0
        assert elapsed < 60, f"the surviving rank took {elapsed:.0f} s to stop"
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def stored_metrics(db: Path, key: str) -> int:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as connection:
            return connection.execute("SELECT COUNT(*) FROM metrics WHERE key = ?", (key,)).fetchone()[0]
    except sqlite3.Error:  # not created yet, or busy
        return 0


def test_tracking_server_dying_mid_run_loses_no_metric(tmp_path: Path):
    server = MlflowServer(tmp_path / "server")
    out = tmp_path / "run"
    overrides = tiny_overrides(out, "teacher", **{"run.epochs": "8", "data.train_subset": "0", "run.name": "outage",
                                                  "tracking.uri": server.url, "tracking.timeout_s": "3",
                                                  "tracking.experiment": "outage"})
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    proc = subprocess.Popen([NT_DIST, "train", str(REPO / "recipes" / "digits_teacher.yaml"), *args(overrides)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # the server dies once it has stored a first epoch's metrics (reading its database: under
        # load, delivery may lag the local log by more than a poll)
        deadline = time.time() + 180
        while time.time() < deadline and not stored_metrics(tmp_path / "server" / "db.sqlite", "test_top1"):
            assert proc.poll() is None
            time.sleep(0.05)
        server.stop()
        _, err = proc.communicate(timeout=300)
    finally:
        server.stop()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err  # training went on
    assert "mlflow_undelivered.jsonl" in err
    local = [json.loads(line)["test_top1"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(local) == 8
    # what the server stored (read from its database now that it is down) + what was kept = all
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'server' / 'db.sqlite'}")
    run_id = json.loads((out / "metrics.json").read_text())["mlflow_run_id"]
    assert run_id, "the run was created before the outage"
    delivered = [m.value for m in client.get_metric_history(run_id, "test_top1")]
    kept = [u["payload"]["values"]["test_top1"] for u in
            map(json.loads, (out / "mlflow_undelivered.jsonl").read_text().splitlines()) if u["kind"] == "metrics"]
    assert len(delivered) >= 1 and len(kept) >= 1
    assert sorted(delivered + kept) == pytest.approx(sorted(local))
