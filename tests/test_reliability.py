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
from conftest import REPO, MlflowServer, processes_env, tiny_overrides
from mlflow.tracking import MlflowClient
from test_faults import one_error

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
                            env={**os.environ, "OMP_NUM_THREADS": "1", **processes_env(2)}, start_new_session=True)
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


def stop_after_first_epoch(proc: subprocess.Popen, server: MlflowServer, db: Path) -> None:
    """Stop ``server`` once it has stored a first epoch's metrics (read from its database: under
    load, delivery may lag the local log by more than a poll); the run must still be going."""
    deadline = time.time() + 180
    while time.time() < deadline and not stored_metrics(db, "test_top1"):
        assert proc.poll() is None
        time.sleep(0.05)
    server.stop()


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
        stop_after_first_epoch(proc, server, tmp_path / "server" / "db.sqlite")
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


# ---------------------------------------------------------------- a store that is not one, a server that hangs


@pytest.mark.parametrize("where", ["tracking.uri", "default"])
def test_a_store_file_of_random_bytes_is_named_by_check_and_train(tmp_path: Path, where: str):
    """``tracking.uri: sqlite:///garbage.db``, or ./mlflow.db (the default store) holding random
    bytes: check called it valid, and training warned "not answering", trained, and waited ~2
    minutes after its done line. Now both say what the file is, in the same line, at once."""
    garbage = tmp_path / ("garbage.db" if where == "tracking.uri" else "mlflow.db")
    garbage.write_bytes(os.urandom(64 * 1024))
    overrides = tiny_overrides(tmp_path / "run", "teacher")
    if where == "tracking.uri":
        overrides.append(f"tracking.uri=sqlite:///{garbage}")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # conftest's store: not here
    key = "tracking.uri" if where == "tracking.uri" else "tracking.uri (default)"
    expected = (f"nt-dist: error: {key}: {garbage}: not an SQLite database (move it aside, and MLflow creates a "
                "new store there)")
    for command in ("check", "train"):
        started = time.monotonic()
        proc = subprocess.run([NT_DIST, command, str(REPO / "recipes" / "digits_teacher.yaml"), *args(overrides)],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
        assert one_error(proc) == expected, command
        assert time.monotonic() - started < 60, command
    assert not (tmp_path / "run").exists()


def test_the_wait_after_done_for_a_server_that_went_silent_is_bounded_and_said(tmp_path: Path):
    """The server stops answering mid-run (its port still takes connections: a hung process).
    After ``done``, the system metrics' last samples and the queued events shared no limit:
    each waited ``tracking.timeout_s``, one after the other. Now the whole closing wait is
    bounded by it, and one line says so while it lasts."""
    import socket

    timeout_s = 10
    server = MlflowServer(tmp_path / "server")
    port = int(server.url.rsplit(":", 1)[1])
    overrides = tiny_overrides(tmp_path / "run", "teacher", **{
        "run.epochs": "8", "data.train_subset": "0", "run.name": "silent", "tracking.uri": server.url,
        "tracking.timeout_s": str(timeout_s), "tracking.experiment": "silent",
        "tracking.system_metrics_interval_s": "0.2"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}  # nt-dist's own bounds
    proc = subprocess.Popen([NT_DIST, "train", str(REPO / "recipes" / "digits_teacher.yaml"), *args(overrides)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    silent = socket.socket()
    lines: list[tuple[float, str]] = []
    try:
        stop_after_first_epoch(proc, server, tmp_path / "server" / "db.sqlite")
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        silent.bind(("127.0.0.1", port))
        silent.listen(64)  # connections are taken by the kernel; nobody reads them
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
        proc.wait(timeout=60)
        ended = time.monotonic()
    finally:
        silent.close()
        server.stop()
        if proc.poll() is None:
            proc.kill()
    text = "\n".join(line for _, line in lines)
    assert proc.returncode == 0, text[-3000:]
    done = next(t for t, line in lines if "] done: " in line)
    waiting = [line for _, line in lines if line.startswith("nt-dist: waiting up to ")]
    assert len(waiting) == 1, text[-3000:]
    assert waiting[0].endswith(f"s (tracking.timeout_s) for the tracking server at {server.url} to take the "
                               "run's last events"), waiting[0]
    assert "mlflow_undelivered.jsonl" in text and "Traceback" not in text and "WARNING mlflow" not in text
    # the limit, and the interpreter's exit (a few seconds on a loaded machine)
    assert ended - done < timeout_s + 6, f"{ended - done:.1f} s after done"
