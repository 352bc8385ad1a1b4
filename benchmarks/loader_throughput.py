"""Training-input throughput of each loader (device, torch, ffcv), same images.

Writes real pixels (scikit-learn's digits, upsampled to ``--size`` px, saved as JPEG) in the
Tiny-ImageNet-200 layout, writes the ``.beton`` from that folder (when ffcv is installed), then
times the training source of ``nt_dist.data.build_data`` with ``data.loader: device``, ``torch``
and ``ffcv`` on the same images, resolution, augmentation and worker count: batches made,
augmented and normalised on the training device (CUDA where there is one, else the CPU), ready
for a step. Only steady-state epochs count: each path's first epoch is discarded (numba compiles
the ffcv pipeline there; the torch path warms its file cache; the device path decodes its cache
before). The timed rounds run ``--repeat`` times (default 3); every figure is the median over
those runs, with its range. Prints a markdown table, logs to MLflow (experiment ``benchmarks``),
and ends with ``speedup device/torch: X.Xx (median of N runs, lo-hi)``.

``--dataset imagenet64`` writes the same pixels (64 px) as ImageNet 64x64's files instead
(``train_data_batch_1..10`` + ``val_data`` pickles, ``data.name: imagenet64``; default 20,000
training images) and also prints each loader's seconds per epoch, and what a whole ImageNet
64x64 epoch (1,281,167 images) takes at that rate (computed, not measured).

    python benchmarks/loader_throughput.py --quick                        # rrc_flip, < 5 min on 2 cores
    python benchmarks/loader_throughput.py --quick --augment rotate_flip  # the Tiny-ImageNet pipeline
    python benchmarks/loader_throughput.py --dataset imagenet64 --augment rotate_flip --batch 128  # its recipes
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: nt_dist, when not installed

from nt_dist.config import DataConfig
from nt_dist.data import build_data
from nt_dist.data.synthetic import digit_images, write_tinyimagenet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import cpu_name, median_range, summary  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where training would run
EPOCHS_PER_ROUND = {"torch": 1, "ffcv": 3, "device": 3}  # the fast loaders' epochs are several times shorter
DATASETS = {"tinyimagenet": "Tiny-ImageNet layout", "imagenet64": "ImageNet 64x64 pickles"}  # --dataset: layout
IMAGENET64_TRAIN = 1_281_167  # training images of the real ImageNet 64x64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs (< 5 min on 2 cores)")
    parser.add_argument("--dataset", choices=list(DATASETS), default="tinyimagenet",
                        help="data.name, written in its distribution layout (imagenet64: 64 px only)")
    parser.add_argument("--size", type=int, default=64, help="stored and trained resolution, px")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes / ffcv threads")
    parser.add_argument("--batch", type=int, default=256, help="batch size")
    parser.add_argument("--images", type=int, default=0,
                        help="training images (default 16384, imagenet64 20000; --quick 4096)")
    parser.add_argument("--augment", default="rrc_flip", help="data.augment mode (ffcv: not rotate_flip)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; figures are their median, with the range")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = parser.parse_args(argv)
    if args.dataset == "imagenet64" and args.size != 64:
        parser.error("--size: ImageNet 64x64 is stored at 64 px")
    loaders = ["device", "torch"] + (["ffcv"] if _ffcv_usable(args.augment) else [])
    n_images = args.images or (4096 if args.quick else 20000 if args.dataset == "imagenet64" else 16384)
    rounds = 2 if args.quick else 3

    with tempfile.TemporaryDirectory(prefix="loader_throughput_") as tmp:
        root, ffcv_dir = Path(tmp) / args.dataset, Path(tmp) / "ffcv"
        started = time.perf_counter()
        (_write_imagenet64 if args.dataset == "imagenet64" else _write_layout)(root, n_images, args.size)
        if "ffcv" in loaders:
            from nt_dist.data.ffcv_io import write_ffcv

            write_ffcv(args.dataset, str(root), str(ffcv_dir), jpeg_quality=90, workers=args.workers)
        os.environ.setdefault("NT_DIST_CACHE", str(Path(tmp) / "cache"))
        prepare_s = time.perf_counter() - started
        load_before = os.getloadavg()[0]
        runs = _measure(root, ffcv_dir, args, rounds, loaders, DEVICE)
        load_after = os.getloadavg()[0]

    rows = {name: {"epochs": sum(r[name]["epochs"] for r in runs), "images": sum(r[name]["images"] for r in runs),
                   "seconds": sum(r[name]["seconds"] for r in runs),
                   "per_run": [r[name]["images_per_s"] for r in runs]} for name in runs[0]}
    for row in rows.values():
        row["images_per_s"] = median_range(row["per_run"])[0]
    ratios = {name: [r[name]["images_per_s"] / r["torch"]["images_per_s"] for r in runs] for name in rows if name != "torch"}
    speedups = {name: median_range(values)[0] for name, values in ratios.items()}
    params = {"size": args.size, "workers": args.workers, "batch": args.batch, "images": n_images,
              "quick": args.quick, "augment": args.augment, "beton": "jpg q90" if "ffcv" in rows else "-",
              "source": _source(args), "dataset": args.dataset,
              "cpus": os.cpu_count(), "cpu": cpu_name(), "device": _device_name(DEVICE), "repeat": len(runs), "load_average": f"{load_before:.1f}->{load_after:.1f}",
              "torch": torch.__version__, "ffcv": version("ffcv") if "ffcv" in rows else "-"}
    if not args.no_mlflow:
        _log_mlflow(params, rows, speedups)
    print(f"\n{n_images} images, {args.size} px {_stored(args)}, {args.augment}, batch {args.batch}, "
          f"{args.workers} workers, {os.cpu_count()} CPUs, batches on {_device_name(DEVICE)}, "
          f"load average {load_before:.1f} -> {load_after:.1f} (prepare: {prepare_s:.0f} s); "
          f"median of {len(runs)} runs\n")
    print("| loader | epochs timed | images | seconds | images/s, median | range over runs |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        low, high = min(row["per_run"]), max(row["per_run"])
        print(f"| {name} | {row['epochs']} | {row['images']} | {row['seconds']:.2f} | {row['images_per_s']:,.0f} | "
              f"{low:,.0f}-{high:,.0f} |")
    epoch_images = {name: row["images"] // row["epochs"] for name, row in rows.items()}  # full batches only
    epoch_s = {name: [epoch_images[name] / rate for rate in row["per_run"]] for name, row in rows.items()}
    print(f"seconds per epoch ({', '.join(f'{name} {count}' for name, count in epoch_images.items())} images, "
          f"the incomplete batch dropped): "
          + "; ".join(f"{name} {summary(values, '{:.2f}', ' s')}" for name, values in epoch_s.items()))
    if args.dataset == "imagenet64":
        print(f"a whole ImageNet 64x64 epoch ({IMAGENET64_TRAIN:,} images) at these rates (computed, not measured: "
              f"{IMAGENET64_TRAIN:,} / images/s of each run): "
              + "; ".join(f"{name} {summary([IMAGENET64_TRAIN / rate / 60 for rate in row['per_run']], '{:.1f}', ' min')}"
                          for name, row in rows.items()))
    if "ffcv" in ratios:
        print(f"speedup ffcv/torch: {summary(ratios['ffcv'], '{:.1f}', 'x')}")
    print(f"speedup device/torch: {summary(ratios['device'], '{:.1f}', 'x')}")
    return 0


def _ffcv_usable(augment: str) -> bool:
    if augment == "rotate_flip":  # ffcv has no rotation
        return False
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return False
    return True


def _write_layout(root: Path, n_images: int, size: int) -> None:
    """``n_images`` training and ``n_images // 10`` validation JPEGs, digits cycled."""
    images, labels = digit_images(size)
    wnids = [f"n{digit:08d}" for digit in range(10)]
    order = np.arange(n_images) % len(images)
    train = {wnid: images[order[labels[order] == digit]] for digit, wnid in enumerate(wnids)}
    val = [(images[i], wnids[labels[i]]) for i in range(n_images // 10)]
    write_tinyimagenet(root, wnids, train, val)


def _write_imagenet64(root: Path, n_images: int, size: int) -> None:
    """ImageNet 64x64's ten ``train_data_batch_*`` files (``n_images`` in all) and ``val_data``
    (``n_images // 10``): the digits at 64 px, cycled, labelled 1..10 (the files' labels are 1-based)."""
    from nt_dist.data.synthetic import write_imagenet64

    images, labels = digit_images(size)
    order = np.arange(n_images) % len(images)
    batches = [(images[part], labels[part] + 1) for part in np.array_split(order, 10)]
    val = np.arange(max(1, n_images // 10)) % len(images)
    write_imagenet64(root, batches, (images[val], labels[val] + 1))


def _stored(args: argparse.Namespace) -> str:
    return "pickled pixels" if args.dataset == "imagenet64" else "JPEG"


def _source(args: argparse.Namespace) -> str:
    return f"digits upsampled, {'uint8 pickles' if args.dataset == 'imagenet64' else 'JPEG q95'}, {DATASETS[args.dataset]}"


def _measure(root: Path, ffcv_dir: Path, args: argparse.Namespace, rounds: int, loaders: list[str],
             device: torch.device) -> list[dict[str, dict[str, float]]]:
    """Images/s of each loader's training source over steady-state epochs, once per ``--repeat``.

    Each loader's epoch 0 is discarded (ffcv: numba compiles; torch: file cache). Then the timed
    epochs are interleaved, EPOCHS_PER_ROUND of each loader per round, so that load from other
    processes on the machine hits all alike. On CUDA an epoch ends when its last batch is made
    (the device is synchronised).
    """
    sources = {}
    for loader in loaders:
        cfg = DataConfig(name=args.dataset, root=str(root), ffcv_dir=str(ffcv_dir), loader=loader,
                         image_size=args.size, batch_size=args.batch, num_workers=args.workers, augment=args.augment)
        sources[loader] = build_data(cfg, seed=0, rank=0, world=1, device=device).train
    next_epoch = dict.fromkeys(sources, 0)
    totals: dict[str, dict[str, float]] = {}

    def run(loader: str, timed: bool) -> None:
        started, seen = time.perf_counter(), 0
        for _, labels in sources[loader].epoch(next_epoch[loader]):
            seen += len(labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        print(f"{loader} epoch {next_epoch[loader]}: {seen} images in {seconds:.2f} s"
              f"{'' if timed else ' (warm-up, not counted)'}", file=sys.stderr)
        next_epoch[loader] += 1
        if timed:
            row = totals[loader]
            row["epochs"], row["images"], row["seconds"] = row["epochs"] + 1, row["images"] + seen, row["seconds"] + seconds

    for loader in sources:
        run(loader, timed=False)
    runs = []
    for _ in range(max(1, args.repeat)):
        totals = {loader: {"epochs": 0, "images": 0, "seconds": 0.0} for loader in sources}
        for _ in range(rounds):
            for loader in sources:
                for _ in range(EPOCHS_PER_ROUND[loader]):
                    run(loader, timed=True)
        runs.append({loader: {**row, "images_per_s": row["images"] / row["seconds"]} for loader, row in totals.items()})
    return runs


def _log_mlflow(params: dict[str, object], rows: dict[str, dict[str, float]], speedups: dict[str, float]) -> None:
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="loader_throughput" if params.get("dataset") == "tinyimagenet"
                          else f"loader_throughput {params.get('dataset')}"):
        mlflow.log_params(params)
        mlflow.log_metrics({f"{name}_images_per_s": row["images_per_s"] for name, row in rows.items()}
                           | {f"speedup_{name}_over_torch": value for name, value in speedups.items()})


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})"


if __name__ == "__main__":
    sys.exit(main())
