"""Shared fixtures: one MLflow SQLite store per test session, tiny digits recipes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every test logs into a temporary SQLite store, never into the repo's mlflow.db.
    Created once: MLflow's schema migrations take several seconds."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:  # a GPU machine without MLflow (benchmarks/gpu_check.sh): tests that track skip
        return uri
    MlflowClient(tracking_uri=uri).search_experiments()  # runs the migrations now
    return uri


@pytest.fixture(scope="session", autouse=True)
def array_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The device loader's decoded splits go to a temporary folder, never into ~/.cache
    (subprocesses inherit the variable)."""
    folder = tmp_path_factory.mktemp("array-cache")
    os.environ["NT_DIST_CACHE"] = str(folder)
    return folder


# ------------------------------------------------------------------------------ devices
# Tests assert what the device they run on should do. TRAIN_DEVICE is where train() and
# `accelerate launch` put a run (accelerate picks CUDA when there is one); DEVICES parametrises
# the tests of device-resident code over every device present: "cuda" is marked `gpu` (run them
# alone with `pytest -m gpu`) and skipped, with the reason, where there is no CUDA.
import torch  # noqa: E402

ON_CUDA = torch.cuda.is_available()
TRAIN_DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
NO_CUDA = "no CUDA device on this machine (torch.cuda.is_available() is False)"
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason=NO_CUDA)
DEVICES = [pytest.param(torch.device("cpu"), id="cpu"),
           pytest.param(torch.device("cuda"), id="cuda", marks=[pytest.mark.gpu, needs_cuda])]


def processes_env(processes: int) -> dict[str, str]:
    """The environment for a launch of ``processes`` processes on this machine: on the GPUs
    when there are that many, else on the CPU over gloo (the GPUs hidden), as a user would."""
    return {} if torch.cuda.device_count() >= processes else {"CUDA_VISIBLE_DEVICES": ""}


def tiny_overrides(out: Path, role: str = "teacher", **extra: str) -> list[str]:
    """A few-step digits run: 2 epochs of 8 steps at batch 32 on 256 images."""
    values = {
        "run.role": role, "run.output_dir": str(out), "run.epochs": "2", "run.progress": "false",
        "run.deterministic": "true",
        "run.name": f"test_{role}", "data.train_subset": "256", "data.batch_size": "32",
        "tracking.experiment": "tests", **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 over a SQLite store in ``root``; waits for
    ``/health``. ``stop()`` ends only the process group it started."""

    def __init__(self, root: Path, timeout: float = 120) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
             "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # 8 processes fewer
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server did not answer /health within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=30)


def documented_errors() -> dict[str, str]:
    """The table of bad inputs in docs/errors.md: label -> the error line it promises."""
    rows = {}
    for line in (REPO / "docs" / "errors.md").read_text().splitlines():
        if line.startswith("| ") and "`nt-dist: error: " in line:
            label, shown = line.strip("| ").split(" | ", 1)
            rows[label] = shown.strip(" |`")
    return rows
