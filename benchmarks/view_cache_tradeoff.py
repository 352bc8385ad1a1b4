"""What caching the adversary's logits costs in augmentation diversity, on the embedded digits.

    python benchmarks/view_cache_tradeoff.py [--views 1 4 8] [--out runs/view_cache]   # ~6 min, 2-core CPU

Trains the quickstart's normal teacher once, then for each setting a nasty teacher (fresh
augmentation every epoch, or K fixed views per sample with ``nasty.cache_logits``) and the
student distilled from it (always fresh augmentation), and prints teacher top-1, student
top-1 and the nasty teacher's training time. Logs to MLflow (experiment ``benchmarks``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nt_dist.config import load_recipe  # noqa: E402
from nt_dist.train import train  # noqa: E402

RECIPES = REPO / "recipes"


def run(recipe: str, out: Path, *overrides: str) -> tuple[float, float]:
    started = time.perf_counter()
    common = [f"run.output_dir={out}", "run.progress=false", "tracking.experiment=benchmarks",
              f"run.name=view_cache/{out.name}"]
    top1 = train(load_recipe(RECIPES / recipe, [*common, *overrides]))["test_top1"]
    return top1, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--out", default="runs/view_cache")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    out = Path(args.out)
    teacher, _ = run("digits_teacher.yaml", out / "teacher_normal")
    kd_normal, _ = run("digits_student.yaml", out / "student_kd_normal", f"distill.teacher_checkpoint={out / 'teacher_normal'}")
    rows = []
    for views in [0, *args.views]:
        name = "fresh" if views == 0 else f"views_{views}"
        extra = [] if views == 0 else [f"data.augment_views={views}", "nasty.cache_logits=true"]
        nasty, seconds = run("digits_nasty.yaml", out / f"nasty_{name}",
                             f"nasty.adversary_checkpoint={out / 'teacher_normal'}", *extra)
        student, _ = run("digits_student.yaml", out / f"student_{name}", f"distill.teacher_checkpoint={out / f'nasty_{name}'}")
        rows.append((name, nasty, student, seconds))
    print(f"\nnormal teacher {teacher:.2f}; student distilled from it {kd_normal:.2f}\n")
    print("| nasty teacher augmentation | teacher top-1 | student from it | nasty training time |")
    print("|---|---:|---:|---:|")
    for name, nasty, student, seconds in rows:
        label = "fresh every epoch (no cache)" if name == "fresh" else f"{name.split('_')[1]} views/sample, cached"
        print(f"| {label} | {nasty:.2f} | {student:.2f} | {seconds:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
