"""What a finished run logged about memory and the machine, as benchmarks/gpu_check.sh checks it.

    python benchmarks/tracking_check.py RUN_FOLDER [--tracking-uri URI]

Reads RUN_FOLDER/metrics.jsonl (and, when the run was tracked, its MLflow run) and prints a
table: ``peak_memory_mb`` per epoch (on a GPU: present and positive each epoch, the counter being
reset as each epoch starts; on a CPU: absent) and MLflow's system metrics (CPU and memory always;
``system/gpu_0_*`` on a GPU). Exit 1 when something expected is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_folder", type=Path)
    parser.add_argument("--tracking-uri", default=None, help="default: as a run resolves it (tracking_uri)")
    args = parser.parse_args(argv)
    from nt_dist.config import TrackingConfig
    from nt_dist.tracking import tracking_uri

    uri = args.tracking_uri or tracking_uri(TrackingConfig())
    import torch

    gpu = torch.cuda.is_available()
    epochs = [json.loads(line) for line in (args.run_folder / "metrics.jsonl").read_text().splitlines()
              if '"test_top1"' in line]
    peaks = [e.get("peak_memory_mb") for e in epochs]
    problems = []
    if gpu and not all(isinstance(p, (int, float)) and p > 0 for p in peaks):
        problems.append("peak_memory_mb missing or zero on a GPU")
    if not gpu and any(p is not None for p in peaks):
        problems.append("peak_memory_mb logged on a CPU")
    print("| check | value |\n|---|---|")
    print(f"| device | {'cuda' if gpu else 'cpu'} |")
    print(f"| peak_memory_mb per epoch | {', '.join('-' if p is None else f'{p:.0f}' for p in peaks)} |")
    summary = json.loads((args.run_folder / "metrics.json").read_text())
    if summary.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        metrics = MlflowClient(tracking_uri=uri).get_run(summary["mlflow_run_id"]).data.metrics
        system = sorted(k for k in metrics if k.startswith("system/"))
        print(f"| MLflow system metrics | {', '.join(k.removeprefix('system/') for k in system)} |")
        wanted = ["system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"]
        wanted += ["system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes"] if gpu else []
        problems += [f"{k} not logged" for k in wanted if k not in metrics]
    for problem in problems:
        print(f"tracking_check: {problem}", file=sys.stderr)
    print(f"tracking_check: {'ok' if not problems else 'FAILED'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
