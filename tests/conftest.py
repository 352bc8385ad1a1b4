"""Shared fixtures: one MLflow SQLite store per test session, tiny digits recipes."""

from __future__ import annotations

import os
import sys
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
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments()  # runs the migrations now
    return uri


def tiny_overrides(out: Path, role: str = "teacher", **extra: str) -> list[str]:
    """A few-step digits run: 2 epochs of 4 steps at batch 32 on 256 images."""
    values = {
        "run.role": role, "run.output_dir": str(out), "run.epochs": "2", "run.progress": "false",
        "run.name": f"test_{role}", "data.train_subset": "256", "data.batch_size": "32",
        "tracking.experiment": "tests", **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]
