"""The README's first command, as a user runs it: the quickstart pipeline over three seeds,
the paper's table as mean ± std, the effect."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

NT_DIST = str(Path(sys.executable).with_name("nt-dist"))
NAMES = ["teacher_normal", "teacher_nasty", "student_baseline", "student_kd_normal", "student_kd_nasty"]
FOLDERS = {"teacher_normal": "teacher/cifar-cnn-normal", "teacher_nasty": "nasty/cifar-cnn-nasty",
           "student_baseline": "baseline/mlp", "student_kd_normal": "student/mlp/cifar-cnn-normal",
           "student_kd_nasty": "student/mlp/cifar-cnn-nasty"}


@pytest.mark.slow
def test_quickstart_shows_the_nasty_teacher_effect_over_three_seeds(tmp_path: Path):
    out = tmp_path / "quickstart"
    # the limit only catches a hang: on a loaded 2-core machine (load 4-7) it took 1,500 s
    proc = subprocess.run([NT_DIST, "quickstart", "--out", str(out), "--set", "run.progress=false"],
                          capture_output=True, text=True, timeout=3600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results) == [*NAMES, "seeds"] and list(results["seeds"]) == ["0", "1", "2"]
    for seed, values in results["seeds"].items():  # per seed: what each run folder says
        for name in NAMES:
            final = json.loads((out / f"seed{seed}" / FOLDERS[name] / "metrics.json").read_text())["final"]
            assert values[name] == pytest.approx(final["test_top1"], abs=0.006)
    for name in NAMES:  # the five keys are the means
        assert results[name] == pytest.approx(statistics.fmean(v[name] for v in results["seeds"].values()), abs=0.01)
    # the paper's effect, on the mean: the nasty teacher keeps its accuracy, its student loses
    assert results["teacher_normal"] - results["teacher_nasty"] <= 2.0, results
    assert results["student_kd_normal"] - results["student_kd_nasty"] >= 3.0, results
    assert "Effect shown: yes" in proc.stdout
    assert "| student baseline | – | " in proc.stdout and " ± " in proc.stdout and "over 3 seed(s)" in proc.stdout
    assert "15 stages: 15 ran, 0 skipped" in proc.stdout

    # lineage in MLflow: the nasty student's teacher is the nasty teacher's run (seed 1)
    summary = {n: json.loads((out / "seed1" / FOLDERS[n] / "metrics.json").read_text()) for n in NAMES}
    client = MlflowClient()
    student = client.get_run(summary["student_kd_nasty"]["mlflow_run_id"])
    assert student.data.tags["teacher_run_id"] == summary["teacher_nasty"]["mlflow_run_id"]
    assert (student.data.tags["table"], student.data.tags["seed"]) == ("quickstart", "1")
    nasty = client.get_run(summary["teacher_nasty"]["mlflow_run_id"])
    assert nasty.data.tags["adversary_run_id"] == summary["teacher_normal"]["mlflow_run_id"]
    assert student.data.metrics["test_top1"] == pytest.approx(results["seeds"]["1"]["student_kd_nasty"], abs=0.01)

    # the same command again trains nothing and prints the same table
    again = subprocess.run([NT_DIST, "quickstart", "--out", str(out)], capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "15 stages: 0 ran, 15 skipped" in again.stdout
    assert json.loads((out / "results.json").read_text()) == results
