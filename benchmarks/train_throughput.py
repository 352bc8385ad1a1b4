"""Training throughput of normal-teacher, nasty-teacher and KD-student steps, side by side.

    python benchmarks/train_throughput.py --quick            # < 5 min on a 2-core CPU
    python benchmarks/train_throughput.py --model cifar_resnet18 --batch 128 --precision bf16   # a GPU
    python benchmarks/train_throughput.py --quick --scaling  # also 1 vs 2 processes: scaling efficiency

Same model, batch, precision and data for every role: real digits images (upsampled to
``--image-size``) already on the device, so the figures are the steps' own cost, not the
loader's. Roles are timed in interleaved rounds (this machine is noisy: ratios from one run
are what to compare) and the median step time of each is reported:

  normal          CE step of the teacher
  nasty (naive)   the authors' design: a full adversary forward on every step
  nasty (bf16 adversary)  nasty.adversary_precision: bf16: the adversary forward every step,
                  under bf16 autocast (only where bf16 is native to the device, or with
                  --bf16-frozen; under --precision bf16 it equals the naive row)
  nasty (cached)  nt_dist with data.augment_views + nasty.cache_logits, once the views are
                  cached (after the first K epochs): the adversary's logits come from memory
  student ...     the same for Hinton KD from a frozen teacher

The whole measurement runs ``--repeat`` times (default 3): every figure printed is the median
of those runs, each ratio with its range over the runs. Prints a markdown table, then
``nasty/normal step time: X.XX (median of N runs, lo-hi)`` (the cached configuration, the
fastest exact one) as the last line, and logs to MLflow (experiment ``benchmarks``).
On CUDA it also reports model FLOPs utilisation (MFU) against the GPU's dense peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nt_dist.config import DataConfig  # noqa: E402
from nt_dist.data import build_data  # noqa: E402
from nt_dist.frozen_network import FrozenNetwork, LogitCache, native_bf16  # noqa: E402
from nt_dist.models import create_model  # noqa: E402
from nt_dist.objectives.kd import student_step  # noqa: E402
from nt_dist.objectives.nasty import nasty_step  # noqa: E402
from nt_dist.objectives.teacher import ce_step  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import summary  # noqa: E402

# dense peak FLOP/s by (device-name fragment, precision)
PEAKS = {("H100", "bf16"): 989e12, ("H100", "no"): 494e12, ("H200", "bf16"): 989e12, ("H200", "no"): 494e12,
         ("A100", "bf16"): 312e12, ("A100", "no"): 156e12}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small run for a 2-core CPU (< 5 min)")
    p.add_argument("--model", default="cifar_resnet18")
    p.add_argument("--batch", type=int, default=None, help="per process (default: 32 quick, 128 otherwise)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per role per round")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bf16-frozen", action="store_true",
                   help="time the bf16 frozen-forward rows even where bf16 is not native (slow)")
    p.add_argument("--scaling", action="store_true", help="also run 2 processes and report scaling efficiency")
    p.add_argument("--repeat", type=int, default=3, help="whole measurements; figures are their median, with the range")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)  # internal: one process of --scaling
    args = p.parse_args(argv)
    args.batch = args.batch or (32 if args.quick else 128)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.steps = args.steps or (3 if args.quick else 10)
    return args


def real_batch(batch: int, image_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = DataConfig(name="digits", image_size=image_size, batch_size=batch, augment="shift")
    data = build_data(cfg, seed=0, rank=0, world=1, device=device)
    return next(iter(data.train.epoch(0)))


def make_roles(args: argparse.Namespace, accelerator: Any) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """One closure per role: a whole optimizer step on the same batch."""
    device = accelerator.device
    torch.manual_seed(0)
    images, labels = real_batch(args.batch, args.image_size, device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    index = torch.arange(args.batch, device=device)
    model = create_model(args.model, 10)
    frozen = create_model(args.model, 10).eval().requires_grad_(False).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        frozen = frozen.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    naive = FrozenNetwork(frozen)
    low = FrozenNetwork(frozen, precision="bf16")
    cache = LogitCache(args.batch, 1, 10, device)
    cached = FrozenNetwork(frozen, cache, None)
    cached(images, index, 0)  # fill: the steady state after the first K epochs

    def step(fn: Callable[..., dict[str, torch.Tensor]], **kw: Any) -> Callable[[], None]:
        def run() -> None:
            with accelerator.autocast():
                out = fn(model, images, labels, index, 1, **kw)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(out["loss"])
            optimizer.step()
        return run

    roles = {
        "normal": step(ce_step),
        "nasty (naive)": step(nasty_step, adversary=naive, tau=4.0, omega=0.01),
        "nasty (bf16 adversary)": step(nasty_step, adversary=low, tau=4.0, omega=0.01),
        "nasty (cached)": step(nasty_step, adversary=cached, tau=4.0, omega=0.01),
        "student (naive)": step(student_step, teacher=naive, tau=4.0, alpha=0.9),
        "student (bf16 teacher)": step(student_step, teacher=low, tau=4.0, alpha=0.9),
        "student (cached)": step(student_step, teacher=cached, tau=4.0, alpha=0.9),
    }
    if not (args.bf16_frozen or native_bf16(device)):
        del roles["nasty (bf16 adversary)"], roles["student (bf16 teacher)"]
    return roles, {"model": model, "frozen": frozen, "images": images}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_roles(roles: dict[str, Callable[[], None]], args: argparse.Namespace, device: torch.device,
               accelerator: Any) -> dict[str, float]:
    """Median seconds per step of each role over interleaved rounds (2 warm-up steps each)."""
    for fn in roles.values():
        for _ in range(2):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in roles}
    for _ in range(args.rounds):
        for name, fn in roles.items():
            accelerator.wait_for_everyone()
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / args.steps)
    return {name: statistics.median(values) for name, values in samples.items()}


def forward_flops(model: torch.nn.Module, images: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images[:1])
    return float(counter.get_total_flops())


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision=args.precision)
    roles, parts = make_roles(args, accelerator)
    seconds = time_roles(roles, args, accelerator.device, accelerator)
    world = accelerator.num_processes
    result: dict[str, Any] = {
        "processes": world, "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "seconds": seconds, "native_bf16": native_bf16(accelerator.device),
        "images_per_s": {k: args.batch * world / v for k, v in seconds.items()},
    }
    if cuda:
        unwrapped = accelerator.unwrap_model(parts["model"])
        train_flops = 3 * forward_flops(unwrapped, parts["images"]) * args.batch
        frozen_flops = forward_flops(parts["frozen"], parts["images"]) * args.batch
        peak = next((v for (name, prec), v in PEAKS.items() if name in result["device"] and prec == args.precision), 0)
        extra = {name: frozen_flops for name in seconds if "cached" not in name and name != "normal"}
        result["mfu"] = {k: (train_flops + extra.get(k, 0.0)) / v / peak if peak else float("nan")
                         for k, v in seconds.items()}
    return result


def repeated(args: argparse.Namespace) -> dict[str, Any]:
    """``--repeat`` whole measurements: per role the median step time (and images/s, MFU) over
    the runs, and every run's time relative to the same run's normal step (``ratios``)."""
    runs = [measure(args) for _ in range(max(1, args.repeat))]
    one = dict(runs[0])
    one["seconds"] = {k: statistics.median(r["seconds"][k] for r in runs) for k in runs[0]["seconds"]}
    one["images_per_s"] = {k: statistics.median(r["images_per_s"][k] for r in runs) for k in runs[0]["images_per_s"]}
    if "mfu" in one:
        one["mfu"] = {k: statistics.median(r["mfu"][k] for r in runs) for k in runs[0]["mfu"]}
    one["ratios"] = {k: [r["seconds"][k] / r["seconds"]["normal"] for r in runs] for k in runs[0]["seconds"]}
    one["runs"] = len(runs)
    return one


def launch(args: argparse.Namespace, processes: int) -> dict[str, Any]:
    """The same measurement under ``accelerate launch`` with ``processes`` processes (gloo on
    CPU). On CPU every process gets the same thread count (cores / 2), for both process
    counts, so the efficiency compares equal resources per process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        forwarded = [a for a in sys.argv[1:] if a not in ("--scaling",)]
        layout = ["--multi_gpu"] if processes > 1 else []
        cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", *layout, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", args.precision, "--dynamo_backend", "no",
               "--main_process_port", "0", __file__, *forwarded, "--no-mlflow", "--worker-out", str(out)]
        env = {**os.environ}
        if not torch.cuda.is_available():
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"scaling run with {processes} processes failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def table(args: argparse.Namespace, one: dict[str, Any], scaling: tuple[dict[str, Any], dict[str, Any]] | None) -> str:
    head = "| step | ms/step | images/s | vs normal | vs normal, range over runs |"
    rule = "|---|---:|---:|---:|---:|"
    if "mfu" in one:
        head, rule = head + " MFU |", rule + "---:|"
    if scaling:
        head += " images/s, 1 process x T/2 threads | 2 processes x T/2 | scaling efficiency |"
        rule += "---:|---:|---:|"
    rows = [head, rule]
    for name, sec in one["seconds"].items():
        ratios = one["ratios"][name]
        row = (f"| {name} | {sec * 1000:.1f} | {one['images_per_s'][name]:.0f} | {statistics.median(ratios):.3f} | "
               f"{min(ratios):.3f}-{max(ratios):.3f} |")
        if "mfu" in one:
            row += f" {100 * one['mfu'][name]:.1f} % |"
        if scaling:
            ips1, ips2 = scaling[0]["images_per_s"][name], scaling[1]["images_per_s"][name]
            row += f" {ips1:.0f} | {ips2:.0f} | {ips2 / (2 * ips1):.2f} |"
        rows.append(row)
    return "\n".join(rows)


def log_mlflow(args: argparse.Namespace, one: dict[str, Any],
               scaling: tuple[dict[str, Any], dict[str, Any]] | None) -> None:
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name=f"train_throughput {args.model} b{args.batch} {args.precision}"):
        mlflow.log_params({"model": args.model, "batch": args.batch, "image_size": args.image_size,
                           "precision": args.precision, "device": one["device"], "threads": one["threads"],
                           "quick": args.quick, "channels_last": args.channels_last, "date": str(date.today()),
                           "repeat": one["runs"]})
        slug = {k: k.replace(" (", "_").replace(")", "").replace(" ", "_") for k in one["seconds"]}
        for name, sec in one["seconds"].items():
            mlflow.log_metric(f"ms_per_step.{slug[name]}", sec * 1000)
            mlflow.log_metric(f"images_per_s.{slug[name]}", one["images_per_s"][name])
            mlflow.log_metric(f"ratio.{slug[name]}", statistics.median(one["ratios"][name]))
            mlflow.log_metric(f"ratio_min.{slug[name]}", min(one["ratios"][name]))
            mlflow.log_metric(f"ratio_max.{slug[name]}", max(one["ratios"][name]))
            if scaling:
                mlflow.log_metric(f"scaling_efficiency.{slug[name]}",
                                  scaling[1]["images_per_s"][name] / (2 * scaling[0]["images_per_s"][name]))
        mlflow.set_tag("benchmark", "train_throughput")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker_out:
        result = repeated(args)
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            Path(args.worker_out).write_text(json.dumps(result))
        if dist.is_initialized():
            dist.destroy_process_group()
        return 0
    started = time.perf_counter()
    one = repeated(args)
    scaling = (launch(args, 1), launch(args, 2)) if args.scaling else None
    print(f"# train_throughput {date.today()}: {args.model}, {args.image_size} px, batch {args.batch}/process, "
          f"precision {args.precision}, {one['device']} (native bf16: {one['native_bf16']}), {one['threads']} threads, "
          f"{args.rounds} rounds x {args.steps} steps per role; median of {one['runs']} runs "
          f"({time.perf_counter() - started:.0f} s)")
    print(table(args, one, scaling))
    if not args.no_mlflow:
        log_mlflow(args, one, scaling)
    r = one["ratios"]
    # amortised over a 200-epoch run whose 20 views are computed in the first 20 epochs
    amortised = (20 * statistics.median(r["nasty (naive)"]) + 180 * statistics.median(r["nasty (cached)"])) / 200
    print(f"nasty/normal step time, naive (adversary forward every step): {summary(r['nasty (naive)'])}")
    if "nasty (bf16 adversary)" in r:
        print(f"nasty/normal step time, bf16 adversary forward every step: {summary(r['nasty (bf16 adversary)'])}")
    print(f"nasty/normal step time, cached, amortised over 200 epochs with 20 views: {amortised:.2f} "
          "(computed from the naive and cached medians: (20 x naive + 180 x cached) / 200)")
    print(f"nasty/normal step time: {summary(r['nasty (cached)'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
