"""The benchmark scripts still run and print what their readers rely on (not their speed)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_train_throughput_prints_table_and_ratio_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--model", "mlp",
                           "--batch", "8", "--rounds", "1", "--steps", "1", "--bf16-frozen"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("nasty/normal step time: ") and float(lines[-1].split(": ")[1]) > 0
    for role in ("normal", "nasty (naive)", "nasty (bf16 adversary)", "nasty (cached)", "student (naive)",
                 "student (bf16 teacher)", "student (cached)"):
        assert any(line.startswith(f"| {role} |") for line in lines), role
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient().get_experiment_by_name("benchmarks")
    runs = MlflowClient().search_runs([experiment.experiment_id], "tags.benchmark = 'train_throughput'")
    assert runs and {"ratio.nasty_naive", "ratio.nasty_bf16_adversary"} <= set(runs[0].data.metrics)
    assert any(line.startswith("nasty/normal step time, bf16 adversary forward every step: ") for line in lines)
