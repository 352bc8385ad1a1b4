"""What each way of making the adversary cheaper costs in accuracy, on the embedded digits.

    python benchmarks/adversary_tradeoff.py [--views 1 4 8] [--seeds 0] [--out runs/adversary_tradeoff]
    # ~8 min on a 2-core CPU per seed; --seeds 0 1 2 repeats every nasty/student pair per seed

Trains the quickstart's normal teacher once, then for each setting a nasty teacher and the
student distilled from it (always fresh augmentation, fp32 teacher forward):

  fresh, fp32       the authors' design: a fresh augmentation and a full-precision adversary
                    forward on every step
  fresh, bf16       the same with ``nasty.adversary_precision: bf16`` (bf16 autocast for the
                    adversary's forward only; the KL stays fp32)
  K views, cached   ``data.augment_views: K`` + ``nasty.cache_logits``: K fixed augmented
                    views per sample, each adversary logit computed once

Prints how far the adversary's bf16 logits are from its fp32 ones (on the evaluation images),
then teacher top-1, student top-1 and the nasty teacher's training time per setting. Logs to
MLflow (experiment ``benchmarks``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nt_dist.checkpoint import load_frozen_model  # noqa: E402
from nt_dist.config import load_recipe  # noqa: E402
from nt_dist.data import build_data  # noqa: E402
from nt_dist.frozen_network import frozen_logits, native_bf16  # noqa: E402
from nt_dist.losses import soft_kl  # noqa: E402
from nt_dist.models import create_model  # noqa: E402
from nt_dist.train import train  # noqa: E402

RECIPES = REPO / "recipes"


def run(recipe: str, out: Path, *overrides: str) -> tuple[float, float]:
    """Test top-1 and wall seconds of one training run."""
    started = time.perf_counter()
    common = [f"run.output_dir={out}", "run.progress=false", "tracking.experiment=benchmarks",
              f"run.name=adversary_tradeoff/{out.name}"]
    top1 = train(load_recipe(RECIPES / recipe, [*common, *overrides]))["test_top1"]
    return top1, time.perf_counter() - started


def bf16_logit_error(teacher_dir: Path, taus: tuple[float, ...] = (4.0, 20.0)) -> dict[str, float]:
    """bf16 vs fp32 logits of the trained adversary on the evaluation images: the largest
    logit difference, the top-1 agreement, and per τ the KL between the two softened
    distributions next to the KL the nasty loss works with (uniform-prediction teacher)."""
    recipe = load_recipe(RECIPES / "digits_teacher.yaml")
    network, _ = load_frozen_model("", str(teacher_dir), 10, "adversary", create_model)
    network.eval()
    data = build_data(recipe.data, 0, 0, 1, torch.device("cpu"))
    exact, rounded = [], []
    for images, _ in data.eval.batches():
        exact.append(frozen_logits(network, images, "fp32"))
        rounded.append(frozen_logits(network, images, "bf16"))
    a, b = torch.cat(exact), torch.cat(rounded)
    uniform = torch.zeros_like(a)
    result = {"max_abs_logit_diff": (a - b).abs().max().item(),
              "max_abs_logit": a.abs().max().item(),
              "top1_agreement": (a.argmax(1) == b.argmax(1)).float().mean().item() * 100}
    for tau in taus:
        result[f"kl_bf16_vs_fp32.tau{tau:g}"] = soft_kl(a, b, tau).item()
        result[f"kl_uniform_vs_adversary.tau{tau:g}"] = soft_kl(uniform, a, tau).item()
    return result


def _each(results: list[tuple[float, float, float]], column: int) -> str:
    """The per-seed values behind a mean, as " (a, b, c)"; nothing for one seed."""
    return "" if len(results) == 1 else " (" + ", ".join(f"{r[column]:.2f}" for r in results) + ")"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="run.seed of the nasty teachers and students")
    parser.add_argument("--out", default="runs/adversary_tradeoff")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    out = Path(args.out)
    teacher, _ = run("digits_teacher.yaml", out / "teacher_normal")
    kd_normal, _ = run("digits_student.yaml", out / "student_kd_normal", f"distill.teacher_checkpoint={out / 'teacher_normal'}")
    error = bf16_logit_error(out / "teacher_normal")
    settings: list[tuple[str, str, list[str]]] = [
        ("fresh_fp32", "fresh every epoch, fp32 adversary (authors)", []),
        ("fresh_bf16", "fresh every epoch, bf16 adversary", ["nasty.adversary_precision=bf16"])]
    settings += [(f"views_{k}", f"{k} view{'s' if k > 1 else ''}/sample, cached", [f"data.augment_views={k}", "nasty.cache_logits=true"])
                 for k in args.views]
    rows = []
    for name, label, extra in settings:
        results = []
        for seed in args.seeds:
            tag = name if seed == 0 else f"{name}_seed{seed}"
            nasty, seconds = run("digits_nasty.yaml", out / f"nasty_{tag}", f"run.seed={seed}",
                                 f"nasty.adversary_checkpoint={out / 'teacher_normal'}", *extra)
            student, _ = run("digits_student.yaml", out / f"student_{tag}", f"run.seed={seed}",
                             f"distill.teacher_checkpoint={out / f'nasty_{tag}'}")
            results.append((nasty, student, seconds))
        rows.append((label, *(statistics.mean(column) for column in zip(*results, strict=True)), results))
    print(f"\nadversary = the normal teacher; bf16 native on this CPU: {native_bf16(torch.device('cpu'))}")
    print("bf16 vs fp32 adversary logits on the 360 evaluation images: "
          + ", ".join(f"{k} {v:.3g}" for k, v in error.items()))
    print(f"\nnormal teacher {teacher:.2f}; student distilled from it {kd_normal:.2f}\n")
    seeds = "" if len(args.seeds) == 1 else f" (mean over seeds {', '.join(map(str, args.seeds))}; each in brackets)"
    print(f"| nasty teacher setting | teacher top-1{seeds} | student from it | nasty training time |")
    print("|---|---:|---:|---:|")
    for label, nasty, student, seconds, results in rows:
        print(f"| {label} | {nasty:.2f}{_each(results, 0)} | {student:.2f}{_each(results, 1)} | {seconds:.0f} s |")
    import mlflow

    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="adversary_tradeoff"):
        mlflow.set_tag("benchmark", "adversary_tradeoff")
        mlflow.log_metrics({"teacher_top1": teacher, "kd_normal_top1": kd_normal,
                            **{f"bf16.{k}": v for k, v in error.items()}})
        for (name, _, _), (_, nasty, student, seconds, _) in zip(settings, rows, strict=True):
            mlflow.log_metrics({f"nasty_top1.{name}": nasty, f"student_top1.{name}": student,
                                f"nasty_seconds.{name}": seconds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
