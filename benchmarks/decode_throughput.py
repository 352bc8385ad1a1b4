"""Decode + random-resized-crop throughput per CPU core of the FFCV and torch paths, on ImageNet-sized JPEGs.

Writes ImageNet-sized images (400 x 350 px, JPEG quality 90, ~50 KB each: colour noise with a
1/f^1.35 amplitude spectrum, smooth like a photograph at this scale; synthetic, not ImageNet) as
an ImageNet-style folder (``data.name: imagefolder``: ``train/<class>/*.JPEG`` + ``val/``), then
two ``.beton`` files from it with ``nt-dist data write-ffcv``'s writer: ``--preset imagenet``
(ffcv-imagenet's ``./write_imagenet.sh 500 0.50 90``: half the images raw, half JPEG: what its
published runs read) and the same with ``--compress-probability 1.0`` (every image JPEG: the
pure JPEG-decode figure). Then it times the training source of the package's own loaders with
``data.augment: rrc_flip`` at each ``--sizes`` (default 160, 192 and 224 px), on 1 and 2 cores:

* torch: ``nt_dist.data.torch_loader.build_torch_data`` (PIL decode + torchvision v2
  ``RandomResizedCrop`` + flip, ``build_transform(..., "rrc_flip", size, train=True)``) with
  ``data.num_workers`` = cores DataLoader processes;
* ffcv: ``nt_dist.data.ffcv_loader.build_ffcv_data`` (ffcv's JIT-compiled decode-and-crop) with
  ``data.num_workers`` = cores threads.

Each core count runs in its own process pinned to that many CPUs (``sched_setaffinity``; its
DataLoader workers and threads inherit it), so "per core" is images/s / cores the whole path
may use, main process included (its per-batch normalisation runs on the CPU here; on a GPU it
runs there). The first epoch of each source is discarded (numba compiles ffcv's pipeline; the
file cache warms); then each run times one torch epoch or three ffcv epochs of every source,
interleaved over paths and sizes; the runs repeat ``--repeat`` times (default 3) and each
figure is the median over runs, with its range.

From the per-core rates at 192 px (ffcv-imagenet's final training resolution) it states how many
cores feed one GPU at ffcv-imagenet's published step speed (ResNet-50, 16 epochs in 14.9 min on
8 A100s), and projects the time per ImageNet epoch on 8 and 16 GPUs for ``--cores-per-node``
(a projection, computed, not measured). Prints a markdown table, logs to MLflow (experiment
``benchmarks``).

    python benchmarks/decode_throughput.py --quick      # 512 images, ~3 min on 2 cores
    python benchmarks/decode_throughput.py --repeat 3   # 2,048 images, ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: nt_dist, when not installed
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import cpu_name, median_range  # noqa: E402

WIDTH, HEIGHT, QUALITY, ALPHA = 400, 350, 90, 1.35  # the generated JPEGs
CLASSES = 10
EPOCHS_PER_RUN = {"torch": 1, "ffcv": 3}  # timed epochs per source and run: ffcv's are several times shorter
TRAIN_RES = 192  # ffcv-imagenet's rn50 configs: progressive 160 -> 192 px, evaluation at 256
# the anchor GPU rate: ffcv-imagenet's README, ResNet-50, 16 epochs in 14.9 min on 8 A100s
ANCHOR = {"epochs": 16, "images": 1_281_167, "minutes": 14.9, "gpus": 8}
PATHS = {  # name -> (data.loader, .beton folder name or "", description)
    "torch": ("torch", "", "JPEG files, PIL + torchvision v2"),
    "ffcv-imagenet": ("ffcv", "ffcv_imagenet", "--preset imagenet: 50% raw, 50% JPEG q90, max-res 500"),
    "ffcv-jpeg": ("ffcv", "ffcv_jpeg", "--compress-probability 1.0: all JPEG q90, max-res 500"),
}


def anchor_rate() -> float:
    """Images/s per GPU of the anchor run: epochs x images / seconds / GPUs."""
    return ANCHOR["epochs"] * ANCHOR["images"] / (ANCHOR["minutes"] * 60) / ANCHOR["gpus"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (512; ~3 min on 2 cores)")
    parser.add_argument("--images", type=int, default=0, help="training images (default 2048; --quick 512)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 192, 224], help="output sizes, px")
    parser.add_argument("--cores", type=int, nargs="+", default=[1, 2], help="CPU counts to pin each measurement to")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS), help="decode paths")
    parser.add_argument("--batch", type=int, default=128, help="batch size")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; figures are their median, with the range")
    parser.add_argument("--cores-per-node", type=int, nargs="+", default=[64, 96], help="for the projection")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="for the projection")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: one pinned measurement
    args = parser.parse_args(argv)
    if args.child:
        return _child(Path(args.child))
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if available and max(args.cores) > len(available):
        parser.error(f"--cores {max(args.cores)}: this process may use {len(available)} CPUs")
    paths = [p for p in args.paths if PATHS[p][0] != "ffcv" or _ffcv_importable()]
    n_images = args.images or (512 if args.quick else 2048)

    with tempfile.TemporaryDirectory(prefix="decode_throughput_") as tmp:
        root = Path(tmp) / "imagenet"
        started = time.perf_counter()
        jpeg_kb = _write_folder(root, n_images)
        if any(PATHS[p][0] == "ffcv" for p in paths):
            _write_betons(root, Path(tmp), [p for p in paths if PATHS[p][0] == "ffcv"])
        prepare_s = time.perf_counter() - started
        load_before = os.getloadavg()
        results = {cores: _run_child(Path(tmp), root, paths, args, cores, available) for cores in args.cores}
        load_after = os.getloadavg()

    rows = [_row(path, size, cores, results[cores]["rates"][f"{path}/{size}"])
            for path in paths for size in args.sizes for cores in args.cores]
    n_runs = min(len(row["per_run"]) for row in rows)
    load = f"{load_before[0]:.1f} -> {load_after[0]:.1f}"
    load_by_cores = ", ".join(f"{cores} core(s) {results[cores]['load_before']:.1f} -> {results[cores]['load']:.1f}"
                              for cores in args.cores)
    print(f"\n{n_images} images {WIDTH}x{HEIGHT} px, JPEG q{QUALITY} (mean {jpeg_kb:.0f} KB; 1/f^{ALPHA} colour noise), "
          f"rrc_flip, batch {args.batch}, {os.cpu_count()} CPUs ({cpu_name()}), load average {load} "
          f"({load_by_cores}; prepare: {prepare_s:.0f} s); median of {n_runs} runs")
    for path in paths:
        print(f"  {path}: {PATHS[path][2]}")
    print()
    print("| path | px | cores | images/s, median | range over runs | images/s per core, median | per core, range |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['path']} | {row['size']} | {row['cores']} | {row['images_per_s']:,.1f} | "
              f"{row['low']:,.1f}-{row['high']:,.1f} | {row['per_core']:,.1f} | "
              f"{row['low'] / row['cores']:,.1f}-{row['high'] / row['cores']:,.1f} |")
    statements = _cores_per_gpu(rows, paths, args)
    if not args.no_mlflow:
        params = {"images": n_images, "image": f"{WIDTH}x{HEIGHT} JPEG q{QUALITY}", "jpeg_kb": round(jpeg_kb, 1),
                  "source": f"colour noise, 1/f^{ALPHA} amplitude spectrum", "sizes": " ".join(map(str, args.sizes)),
                  "cores": " ".join(map(str, args.cores)), "batch": args.batch, "augment": "rrc_flip",
                  "quick": args.quick, "repeat": n_runs, "cpus": os.cpu_count(), "cpu": cpu_name(),
                  "load_average": load, "torch": version("torch"),
                  "ffcv": version("ffcv") if _ffcv_importable() else "-"}
        _log_mlflow(params, rows, statements)
    return 0


# --- the data -------------------------------------------------------------------------------------


def natural_image(rng: np.random.Generator, width: int = WIDTH, height: int = HEIGHT, alpha: float = ALPHA) -> np.ndarray:
    """A ``height`` x ``width`` RGB uint8 image of colour noise whose amplitude spectrum falls as
    1/f^alpha (photographs: about 1/f): smooth at this scale, so its JPEG is photo-sized."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    frequency = np.hypot(fx, fy)
    frequency[0, 0] = 1.0
    amplitude = frequency ** -alpha
    amplitude[0, 0] = 0.0
    planes = [np.fft.irfft2(amplitude * rng.rayleigh(size=amplitude.shape)
                            * np.exp(2j * np.pi * rng.random(amplitude.shape)), s=(height, width)) for _ in range(3)]
    mix = np.eye(3) + 0.3 * rng.normal(size=(3, 3))  # correlated channels, as in photographs
    image = np.einsum("ij,jhw->hwi", mix, np.stack(planes))
    image = (image - image.mean()) / image.std() * 48 + rng.uniform(90, 160)
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_one(job: tuple[str, int]) -> int:
    from PIL import Image

    path, seed = job
    Image.fromarray(natural_image(np.random.default_rng(seed))).save(path, quality=QUALITY)
    return os.path.getsize(path)


def _write_folder(root: Path, n_images: int) -> float:
    """``root/{train,val}/<class>/*.JPEG`` (``n_images`` training, a tenth as many validation,
    at least one per class); returns the mean JPEG size in KB."""
    jobs = []
    for split, count, offset in (("train", n_images, 0), ("val", max(CLASSES, n_images // 10), 10**6)):
        for i in range(count):
            folder = root / split / f"n{i % CLASSES:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((str(folder / f"{split}_{i}.JPEG"), offset + i))
    import multiprocessing

    with multiprocessing.Pool(os.cpu_count() or 1) as pool:
        sizes = pool.map(_write_one, jobs, chunksize=32)
    return float(np.mean(sizes[:n_images])) / 1e3


def _write_betons(root: Path, base: Path, paths: list[str]) -> None:
    """The ``.beton`` files of ``nt-dist data write-ffcv --preset imagenet`` (and with
    ``--compress-probability 1.0``), through its own settings resolution."""
    from nt_dist.data.ffcv_io import resolve_settings, write_ffcv

    for path in paths:
        probability = 1.0 if path == "ffcv-jpeg" else None
        settings = resolve_settings("imagenet", None, None, False, probability)
        write_ffcv("imagefolder", str(root), str(base / PATHS[path][1]), workers=os.cpu_count() or 1, **settings)


# --- measuring (one pinned process per core count) -------------------------------------------------


def _run_child(base: Path, root: Path, paths: list[str], args: argparse.Namespace, cores: int,
               available: list[int]) -> dict[str, Any]:
    spec = {"base": str(base), "root": str(root), "paths": paths, "sizes": args.sizes, "batch": args.batch,
            "repeat": max(1, args.repeat), "cores": cores, "result": str(base / f"result_{cores}.json")}
    spec_path = base / f"spec_{cores}.json"
    spec_path.write_text(json.dumps(spec))
    cpus = set(available[:cores])
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "NUMBA_NUM_THREADS": str(cores),
           "MKL_NUM_THREADS": str(cores)}

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    print(f"--- {cores} core(s): CPUs {sorted(cpus) or 'unpinned'}", file=sys.stderr)
    load_before = os.getloadavg()[0]
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)], env=env,
                   preexec_fn=pin, check=True)
    result: dict[str, Any] = json.loads(Path(spec["result"]).read_text())
    result["load_before"] = load_before
    return result


_KEEP: list[Any] = []  # ffcv loaders stay referenced until exit (numba prints an ignored KeyError otherwise)


def _child(spec_path: Path) -> int:
    """Build every (path, size) source on the CPUs this process is pinned to, discard each one's
    first epoch, then time one epoch of each, interleaved, ``repeat`` times; write images/s."""
    import torch

    from nt_dist.config import DataConfig
    from nt_dist.data import build_data

    spec = json.loads(spec_path.read_text())
    cores = spec["cores"]
    torch.set_num_threads(cores)
    cpu = torch.device("cpu")
    sources = {}
    for size in spec["sizes"]:
        for path in spec["paths"]:
            loader, folder, _ = PATHS[path]
            cfg = DataConfig(name="imagefolder", root=spec["root"], loader=loader,
                             ffcv_dir=str(Path(spec["base"]) / folder) if folder else "", augment="rrc_flip",
                             image_size=size, batch_size=spec["batch"], eval_batch_size=spec["batch"],
                             num_workers=cores)
            bundle = build_data(cfg, seed=0, rank=0, world=1, device=cpu)
            _KEEP.append(bundle)
            sources[f"{path}/{size}"] = bundle.train
    epochs = dict.fromkeys(sources, 0)

    def run(key: str, timed: bool) -> tuple[int, float]:
        started, seen = time.perf_counter(), 0
        for _, labels in sources[key].epoch(epochs[key]):
            seen += len(labels)
        seconds = time.perf_counter() - started
        print(f"{cores} core(s) {key} epoch {epochs[key]}: {seen} images in {seconds:.2f} s"
              f"{'' if timed else ' (warm-up, not counted)'}", file=sys.stderr)
        epochs[key] += 1
        return seen, seconds

    for key in sources:
        run(key, timed=False)
    rates: dict[str, list[float]] = {key: [] for key in sources}
    for _ in range(spec["repeat"]):
        for key in sources:
            timed = [run(key, timed=True) for _ in range(EPOCHS_PER_RUN[PATHS[key.split("/")[0]][0]])]
            rates[key].append(sum(seen for seen, _ in timed) / sum(seconds for _, seconds in timed))
    load = os.getloadavg()
    Path(spec["result"]).write_text(json.dumps({"rates": rates, "cpus": sorted(os.sched_getaffinity(0))
                                                if hasattr(os, "sched_getaffinity") else [], "load": load[0]}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the result is written; tearing down live ffcv loaders at interpreter exit can hang


# --- reporting -------------------------------------------------------------------------------------


def _row(path: str, size: int, cores: int, per_run: list[float]) -> dict[str, Any]:
    middle, low, high = median_range(per_run)
    return {"path": path, "size": size, "cores": cores, "per_run": per_run, "images_per_s": middle, "low": low,
            "high": high, "per_core": middle / cores}


def _cores_per_gpu(rows: list[dict[str, Any]], paths: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Print the cores-per-GPU statement and the projection; return the figures for MLflow."""
    gpu = anchor_rate()
    print(f"\nanchor GPU rate (ffcv-imagenet, ResNet-50, {ANCHOR['epochs']} epochs in {ANCHOR['minutes']} min on "
          f"{ANCHOR['gpus']} A100s): {ANCHOR['epochs']} x {ANCHOR['images']:,} / ({ANCHOR['minutes']} x 60) / "
          f"{ANCHOR['gpus']} = {gpu:,.0f} images/s per GPU")
    figures: dict[str, float] = {"anchor_images_per_s_per_gpu": gpu}
    at_res = [row for row in rows if row["size"] == TRAIN_RES]
    if not at_res:
        print(f"cores per GPU: not computed ({TRAIN_RES} px not among --sizes)")
        return figures
    most = max(row["cores"] for row in at_res)
    per_core = {row["path"]: row for row in at_res if row["cores"] == most}
    for path in paths:
        row = per_core[path]
        low, high = gpu / (row["high"] / most), gpu / (row["low"] / most)
        cores = gpu / row["per_core"]
        figures[f"cores_per_gpu_{path}"] = cores
        print(f"cores per GPU, {path} at {TRAIN_RES} px: {gpu:,.0f} / {row['per_core']:,.1f} = {cores:.1f} "
              f"(per-core rate on {most} core(s), median of {len(row['per_run'])} runs; "
              f"from the run range {low:.1f}-{high:.1f})")
    print(f"\nProjection (computed, not measured): time per ImageNet epoch ({ANCHOR['images']:,} images) = "
          f"images / min(GPUs x {gpu:,.0f} images/s (the anchor GPU rate), nodes x cores per node x the "
          f"per-core rate measured here at {TRAIN_RES} px on {most} core(s)); {args.gpus_per_node} GPUs a node, "
          "every core of a node decoding (none kept for the training processes), decode scaling linearly "
          "with cores\n")
    print("| path | GPUs | cores/node | decode limit, images/s | GPU limit, images/s | epoch, s | bound by |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        for gpus in (8, 16):
            for node_cores in args.cores_per_node:
                decode = math.ceil(gpus / args.gpus_per_node) * node_cores * per_core[path]["per_core"]
                limit = gpus * gpu
                seconds = ANCHOR["images"] / min(decode, limit)
                figures[f"projected_epoch_s_{path}_{gpus}gpus_{node_cores}cores"] = seconds
                print(f"| {path} | {gpus} | {node_cores} | {decode:,.0f} | {limit:,.0f} | {seconds:,.0f} | "
                      f"{'decode' if decode < limit else 'GPU'} |")
    return figures


def _log_mlflow(params: dict[str, object], rows: list[dict[str, Any]], figures: dict[str, float]) -> None:
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="decode_throughput"):
        mlflow.log_params(params)
        mlflow.log_metrics({f"{row['path']}_{row['size']}px_{row['cores']}c_images_per_s": row["images_per_s"]
                            for row in rows}
                           | {f"{row['path']}_{row['size']}px_{row['cores']}c_images_per_s_per_core": row["per_core"]
                              for row in rows} | figures)


def _ffcv_importable() -> bool:
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
