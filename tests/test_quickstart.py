"""The README's first command, as a user runs it: five runs, the paper's table, the effect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

NT_DIST = str(Path(sys.executable).with_name("nt-dist"))
NAMES = ["teacher_normal", "teacher_nasty", "student_baseline", "student_kd_normal", "student_kd_nasty"]


@pytest.mark.slow
def test_quickstart_shows_the_nasty_teacher_effect(tmp_path: Path):
    out = tmp_path / "quickstart"
    proc = subprocess.run([NT_DIST, "quickstart", "--out", str(out), "--set", "run.progress=false"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results) == NAMES
    assert all(0 <= v <= 100 for v in results.values())
    # the paper's effect: the nasty teacher keeps its accuracy, its student loses
    assert results["teacher_normal"] - results["teacher_nasty"] <= 2.0, results
    assert results["student_kd_normal"] - results["student_kd_nasty"] >= 3.0, results
    assert "| Student baseline (CE)" in proc.stdout and "Effect shown: yes" in proc.stdout
    # lineage in MLflow: the nasty student's teacher is the nasty teacher's run
    summary = {n: json.loads((out / n / "metrics.json").read_text()) for n in NAMES}
    client = MlflowClient()
    student = client.get_run(summary["student_kd_nasty"]["mlflow_run_id"])
    assert student.data.tags["teacher_run_id"] == summary["teacher_nasty"]["mlflow_run_id"]
    nasty = client.get_run(summary["teacher_nasty"]["mlflow_run_id"])
    assert nasty.data.tags["adversary_run_id"] == summary["teacher_normal"]["mlflow_run_id"]
    assert student.data.metrics["test_top1"] == pytest.approx(results["student_kd_nasty"], abs=0.01)
