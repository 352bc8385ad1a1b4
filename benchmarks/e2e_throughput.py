"""End-to-end training throughput of the flagship recipe, per loader, against the step alone.

Runs ``recipes/tinyimagenet_nasty.yaml`` as real ``nt_dist.train`` processes (optionally under
``accelerate launch --config_file CONFIG``) on a Tiny-ImageNet-layout folder, once per loader
(``device``, ``torch``, ``ffcv`` where installed and the augmentation allows) and role
(``teacher``, then ``nasty`` against that teacher), and reads each epoch's images/s from the
run's ``metrics.jsonl`` (the whole training epoch: input, step, optimizer; the first epoch is
warm-up and not counted when there are more). Then it times the same step on one batch already
on the device, in this process ("step-only"), and prints a table and, as its last line::

    end-to-end/step-only (device loader): X.XX

(teacher role; 1.00 means the input path costs nothing). The step-only figure is always the plain
step (no DeepSpeed engine): under ``--launcher`` the ratio also shows what the launcher costs. Without ``--root`` it writes a
synthetic folder first (random 64 px JPEGs; the pixels do not matter for speed). Logs to MLflow
(experiment ``benchmarks``) unless ``--no-mlflow`` or MLflow is not installed.

    python benchmarks/e2e_throughput.py --precision bf16 --batch 128          # a GPU
    python benchmarks/e2e_throughput.py --quick                                # a 2-core CPU, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPE = REPO / "recipes" / "tinyimagenet_nasty.yaml"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU sizes: 16 px, cifar_cnn, 640 images, batch 32")
    p.add_argument("--root", default="", help="a Tiny-ImageNet-200 folder (default: write a synthetic one)")
    p.add_argument("--images", type=int, default=0, help="synthetic training images (default 12,800; --quick 640)")
    p.add_argument("--classes", type=int, default=0, help="synthetic classes (default 200; --quick 10)")
    p.add_argument("--size", type=int, default=0, help="data.image_size (default 64; --quick 16)")
    p.add_argument("--model", default="", help="model.name (default: the recipe's; --quick cifar_cnn)")
    p.add_argument("--batch", type=int, default=0, help="data.batch_size per process (default 128; --quick 32)")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="",
                   help="run.precision (default: bf16 on a GPU, no on a CPU)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="data.num_workers (default: CPUs - 2, at least 1)")
    p.add_argument("--loaders", nargs="+", default=["device", "torch", "ffcv"])
    p.add_argument("--roles", nargs="+", default=["teacher", "nasty"], choices=["teacher", "nasty"])
    p.add_argument("--launcher", default="", help="accelerate config file (e.g. cluster/deepspeed_zero2.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra recipe overrides for every run (e.g. model.compile=true)")
    p.add_argument("--label", default="", help="a name for this configuration in the table and MLflow")
    p.add_argument("--out", default="", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--json", default="", help="also write the results as JSON to this file")
    p.add_argument("--no-mlflow", action="store_true")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.images = args.images or (640 if args.quick else 12_800)
    args.classes = args.classes or (10 if args.quick else 200)
    args.size = args.size or (16 if args.quick else 64)
    args.model = args.model or ("cifar_cnn" if args.quick else "")
    args.batch = args.batch or (32 if args.quick else 128)
    args.precision = args.precision or ("bf16" if cuda else "no")
    args.workers = args.workers or max(1, (os.cpu_count() or 2) - 2)
    args.launcher = str(Path(args.launcher).resolve()) if args.launcher else ""
    return args


def write_synthetic(root: Path, images: int, classes: int, size: int) -> None:
    """Random JPEGs in the Tiny-ImageNet-200 layout: ``images`` for training, a tenth for validation."""
    from nt_dist.data.synthetic import write_tinyimagenet

    rng = np.random.default_rng(0)
    wnids = [f"n{c:08d}" for c in range(classes)]
    per_class = max(1, images // classes)
    train = {w: rng.integers(0, 256, (per_class, size, size, 3), dtype=np.uint8) for w in wnids}
    val = [(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), wnids[i % classes])
           for i in range(max(classes, images // 10))]
    write_tinyimagenet(root, wnids, train, val, quality=90)


def usable_loaders(wanted: list[str], augment: str) -> tuple[list[str], list[str]]:
    usable, skipped = [], []
    for loader in wanted:
        if loader == "ffcv":
            try:
                import ffcv  # noqa: F401
            except ImportError:
                skipped.append("ffcv (not installed)")
                continue
            if augment == "rotate_flip":
                skipped.append("ffcv (no rotation: the recipe's rotate_flip)")
                continue
        usable.append(loader)
    return usable, skipped


def run_training(args: argparse.Namespace, root: Path, out: Path, loader: str, role: str,
                 teacher: Path | None, ffcv_dir: Path) -> dict[str, Any]:
    """One ``nt_dist.train`` process; images/s of its epochs from metrics.jsonl."""
    overrides = {
        "run.role": role, "run.name": f"e2e_{loader}_{role}", "run.output_dir": str(out), "run.epochs": args.epochs,
        "run.precision": args.precision, "run.progress": "false", "run.checkpoint_every_steps": 0,
        "run.resume": "never", "data.root": str(root), "data.loader": loader, "data.ffcv_dir": str(ffcv_dir),
        "data.image_size": args.size, "data.batch_size": args.batch, "data.num_workers": args.workers,
        "optim.schedule": "constant", "optim.milestones": "[]", "tracking.enabled": "false",
    }
    if args.model:
        overrides.update({"model.name": args.model, "nasty.adversary": args.model})
    if teacher is not None:
        overrides["nasty.adversary_checkpoint"] = str(teacher)
    sets = [f"{k}={v}" for k, v in overrides.items()] + args.overrides
    if args.launcher:
        command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", args.launcher,
                   "--num_processes", "1", "--main_process_port", "0", "-m", "nt_dist.train"]
    else:
        command = [sys.executable, "-m", "nt_dist.train"]
    command += [str(RECIPE)] + [item for s in sets for item in ("--set", s)]
    started = time.perf_counter()
    # cwd: the repository (cluster/*.yaml name their DeepSpeed JSON relative to it); every path is absolute
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {_cause(proc.stderr)}", "wall_s": wall}
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [e["images_per_s"] for e in epochs if "images_per_s" in e]
    timed = rates[1:] if len(rates) > 1 else rates
    return {"images_per_s": statistics.median(timed), "epochs_timed": len(timed), "wall_s": wall,
            "test_top1": epochs[-1].get("test_top1", float("nan"))}


def _cause(stderr: str) -> str:
    """The line that says why a run failed: ours (``nt-dist: ...``), else the last exception line
    (accelerate launch ends with its own banner)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for marks in (("nt-dist: ",), ("Error:", "Error ", "Exception:")):
        found = [line for line in lines if any(mark in line for mark in marks) and "ChildFailedError" not in line]
        if found:
            return found[-1][:300]
    return lines[-1][:300] if lines else "(no output)"


def step_only(args: argparse.Namespace, roles: list[str]) -> dict[str, float]:
    """Images/s of each role's training step on one batch already on the device (no input
    path), timed in interleaved rounds after a warm-up."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from nt_dist.config import load_recipe
    from nt_dist.models import create_model
    from nt_dist.objectives.nasty import nasty_step
    from nt_dist.objectives.teacher import ce_step

    recipe = load_recipe(RECIPE, [*args.overrides, *([f"model.name={args.model}"] if args.model else [])])
    AcceleratorState._reset_state()
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision=args.precision)
    device = accelerator.device
    fmt = torch.channels_last if recipe.model.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    model = create_model(recipe.model.name, args.classes).to(device, memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    if recipe.model.compile:
        model = torch.compile(model)
    adversary = create_model(recipe.model.name, args.classes).to(device, memory_format=fmt).eval()
    steps = {"teacher": lambda: ce_step(model, images, labels),
             "nasty": lambda: nasty_step(model, images, labels, adversary=adversary, tau=20.0, omega=0.01)}

    def run(role: str, n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            with accelerator.autocast():
                out = steps[role]()
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(out["loss"])
            optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    n = 5 if args.quick else 30
    for role in roles:
        run(role, 5)
    samples: dict[str, list[float]] = {role: [] for role in roles}
    for _ in range(3):
        for role in roles:
            samples[role].append(run(role, n))
    return {role: args.batch / statistics.median(values) for role, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from nt_dist.config import load_recipe

    augment = load_recipe(RECIPE, args.overrides).data.augment
    loaders, skipped = usable_loaders(args.loaders, augment)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="e2e_throughput_") as tmp:
        base = Path(args.out) if args.out else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("NT_DIST_CACHE", str(base / "array-cache"))
        root = Path(args.root) if args.root else base / "tiny-imagenet-200"
        if not args.root and not (root / "wnids.txt").is_file():
            write_synthetic(root, args.images, args.classes, args.size)
        ffcv_dir = base / "ffcv"
        if "ffcv" in loaders and not (ffcv_dir / "train.beton").is_file():
            from nt_dist.data.ffcv_io import write_ffcv

            write_ffcv("tinyimagenet", str(root), str(ffcv_dir), max_res=args.size, jpeg_quality=90,
                       workers=args.workers)
        rows: list[dict[str, Any]] = []
        for loader in loaders:
            teacher = None
            for role in args.roles:
                if role == "nasty" and teacher is None and "teacher" in args.roles:
                    break  # the teacher row above says why
                if role == "nasty" and teacher is None:
                    teacher_out = base / f"{loader}_teacher_for_nasty"
                    result = run_training(args, root, teacher_out, loader, "teacher", None, ffcv_dir)
                    if "error" in result:
                        rows.append({"loader": loader, "role": "teacher", **result})
                        break
                    teacher = teacher_out
                out = base / f"{loader}_{role}"
                result = run_training(args, root, out, loader, role, teacher, ffcv_dir)
                rows.append({"loader": loader, "role": role, **result})
                if role == "teacher" and "error" not in result:
                    teacher = out
                print(f"{loader} {role}: {result}", file=sys.stderr, flush=True)
        steps = step_only(args, args.roles)
    for row in rows:
        if "images_per_s" in row:
            row["step_only_images_per_s"] = steps[row["role"]]
            row["ratio"] = row["images_per_s"] / steps[row["role"]]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    label = args.label or (f"launcher {Path(args.launcher).stem}" if args.launcher else "plain")
    print(f"# e2e_throughput {date.today()} ({label}): {device}, {RECIPE.name}, model {args.model or 'recipe'}, "
          f"{args.size} px {augment}, batch {args.batch}, {args.precision}, {args.epochs} epochs, "
          f"{args.workers} workers ({time.perf_counter() - started:.0f} s)")
    if skipped:
        print(f"skipped: {', '.join(skipped)}")
    print("| loader | role | end-to-end images/s | step-only images/s | end-to-end/step-only | top-1 | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['loader']} | {row['role']} | failed: {row['error']} | | | | {row['wall_s']:.0f} |")
        else:
            print(f"| {row['loader']} | {row['role']} | {row['images_per_s']:,.0f} | "
                  f"{row['step_only_images_per_s']:,.0f} | {row['ratio']:.2f} | {row['test_top1']:.2f} | "
                  f"{row['wall_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"label": label, "device": device, "rows": rows}, indent=1))
    if not args.no_mlflow:
        _log_mlflow(args, label, device, rows)
    device_rows = [r for r in rows if r["loader"] == "device" and r["role"] == "teacher" and "ratio" in r]
    ratio = f"{device_rows[0]['ratio']:.2f}" if device_rows else "n/a"
    print(f"end-to-end/step-only (device loader): {ratio}")
    return 0 if all("error" not in r for r in rows) else 1


def _log_mlflow(args: argparse.Namespace, label: str, device: str, rows: list[dict[str, Any]]) -> None:
    try:
        import mlflow
    except ImportError:
        print("MLflow is not installed: not logged", file=sys.stderr)
        return
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name=f"e2e_throughput {label}"):
        mlflow.set_tag("benchmark", "e2e_throughput")
        mlflow.log_params({"label": label, "device": device, "size": args.size, "batch": args.batch,
                           "precision": args.precision, "model": args.model or "recipe", "epochs": args.epochs,
                           "workers": args.workers, "launcher": args.launcher or "-",
                           "overrides": " ".join(args.overrides) or "-", "date": str(date.today())})
        for row in rows:
            if "ratio" in row:
                key = f"{row['loader']}_{row['role']}"
                mlflow.log_metrics({f"images_per_s.{key}": row["images_per_s"], f"ratio.{key}": row["ratio"]})


if __name__ == "__main__":
    sys.exit(main())
