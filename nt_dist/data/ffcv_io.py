"""FFCV ``.beton`` files: writing a data set's two splits, checking a file, and the CLI.

``write_ffcv(name, root, out_dir)`` writes ``out_dir/<train split>.beton``,
``out_dir/<eval split>.beton`` (fields ``image``: RGBImageField, ``label``: IntField) and
``out_dir/summary.json`` (counts, label histograms, settings), which the FFCV loader reads.

The output depends only on the inputs and settings, never on ``workers``: samples are
encoded in parallel (by ffcv's own ``RGBImageField.encode``) but laid out in the file by one
process in index order. ffcv's ``DatasetWriter`` lets its workers race for pages, so two runs
over the same data give different bytes; here a rewrite gives the same file. Each file is
written under a temporary name and renamed into place, so a reader never sees half a file.

Image storage (``settings.write_mode`` in the summary): ``jpg`` (every image JPEG-compressed at
``jpeg_quality``), ``raw`` (uint8 pixels) or ``proportion`` (``compress_probability`` P: a share P
of the images JPEG, the rest raw; ffcv-imagenet's ``./write_imagenet.sh 500 0.50 90`` is
``--preset imagenet``). ffcv's own ``proportion`` mode draws ``np.random.rand() < P`` from
numpy's global RNG in whichever process encodes the sample, so two runs differ. Here the choice
is made per sample from a hash of its index instead: sample *i* is JPEG iff
``(splitmix64(i) >> 11) / 2**53 < P`` (:func:`compresses`: its 53 high bits, a draw in
[0, 1)), and ffcv's ``jpg`` or ``raw`` encoding is then applied to it. The choice is a function
of the index alone: the same in both splits' sample *i*, on every rerun and for any ``workers``,
and numpy's global RNG is left alone.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.memory_allocator import MemoryAllocator
from ffcv.types import (
    ALLOC_TABLE_TYPE,
    CURRENT_VERSION,
    FieldDescType,
    HeaderType,
    get_handlers,
    get_metadata_type,
)
from ffcv.writer import DatasetWriter
from tqdm import tqdm

from nt_dist.data import DATASETS, build_dataset, dataset_spec
from nt_dist.errors import EXIT_USER_ERROR, UserError

IMAGE, LABEL = "image", "label"  # field names inside every .beton we write
SUMMARY = "summary.json"
COMMAND = "nt-dist data write-ffcv"
JPEG_QUALITY = 90  # default --jpeg-quality (ffcv's and ffcv-imagenet's)
# --preset NAME: the writer settings of a known recipe, each used unless given explicitly
PRESETS: dict[str, dict[str, Any]] = {
    # ffcv-imagenet's README: ./write_imagenet.sh 500 0.50 90 (max_resolution, compress_probability, jpeg_quality)
    "imagenet": {"max_res": 500, "compress_probability": 0.5, "jpeg_quality": 90},
}
COMPRESS_CHOICE = "jpg iff (splitmix64(sample index) >> 11) / 2**53 < compress_probability"


def write_ffcv(dataset_name: str, root: str, out_dir: str, max_res: int | None = None,
               jpeg_quality: int = JPEG_QUALITY, raw: bool = False, workers: int = 1,
               compress_probability: float | None = None) -> dict[str, Any]:
    """Write both splits of ``dataset_name`` (read from ``root``) and the summary; return it.
    ``compress_probability`` P: write mode ``proportion`` (a share P JPEG, the rest raw)."""
    check_settings(max_res, jpeg_quality, raw, compress_probability)  # before reading the data
    datasets = {split: build_dataset(dataset_name, root, split) for split in dataset_spec(dataset_name).splits}
    return write_splits(dataset_name, datasets, out_dir, max_res, jpeg_quality, raw, workers, compress_probability)


def check_settings(max_res: int | None, jpeg_quality: int, raw: bool, compress_probability: float | None) -> None:
    """One-line UserErrors for writer settings that cannot be written."""
    if max_res is not None and max_res < 1:
        raise UserError(f"--max-res: must be a positive number of pixels (got {max_res})")
    if not 1 <= jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality: must lie in 1..100 (got {jpeg_quality})")
    if compress_probability is not None:
        if raw:
            raise UserError("--compress-probability: stores a share of the images as JPEG, so it cannot "
                            "go with --raw (drop one of them)")
        if not 0.0 <= compress_probability <= 1.0:  # also refuses nan
            raise UserError(f"--compress-probability: must lie in 0..1 (got {compress_probability})")


def write_splits(dataset_name: str, datasets: dict[str, Any], out_dir: str, max_res: int | None = None,
                 jpeg_quality: int = JPEG_QUALITY, raw: bool = False, workers: int = 1,
                 compress_probability: float | None = None) -> dict[str, Any]:
    """Write ``<split>.beton`` for each map-style dataset of ``(image, label)`` and
    ``summary.json``; return the summary. The splits share the first one's ``.classes``."""
    check_settings(max_res, jpeg_quality, raw, compress_probability)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = next(iter(datasets.values())).classes
    proportion = compress_probability is not None
    write_mode = "proportion" if proportion else "raw" if raw else "jpg"
    image_field = RGBImageField(write_mode=write_mode, max_resolution=max_res, jpeg_quality=jpeg_quality,
                                compress_probability=compress_probability if proportion else 0.5)
    splits = {}
    for split, dataset in datasets.items():
        path = out / f"{split}.beton"
        labels = write_beton(dataset, path, image_field, workers)
        splits[split] = {"file": path.name, "samples": len(labels),
                         "label_histogram": np.bincount(labels, minlength=len(classes)).tolist()}
        if proportion:
            splits[split]["jpeg_samples"] = int(np.count_nonzero(image_modes(path) == "jpg"))
    settings: dict[str, Any] = {"write_mode": write_mode, "max_resolution": max_res,
                                "jpeg_quality": None if raw else jpeg_quality}
    if proportion:
        settings |= {"compress_probability": compress_probability, "compress_choice": COMPRESS_CHOICE}
    summary = {
        "dataset": dataset_name,
        "num_classes": len(classes),
        "classes": list(classes),
        "splits": splits,
        "settings": settings,
        "format": {"ffcv_beton_version": CURRENT_VERSION, "fields": {IMAGE: "RGBImageField", LABEL: "IntField"}},
    }
    with _atomic(out / SUMMARY) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def write_beton(dataset: Any, path: Path, image_field: RGBImageField, workers: int = 1) -> np.ndarray:
    """Write ``dataset`` to ``path`` in index order; return its labels (int64)."""
    n = len(dataset)
    if n == 0:
        raise UserError(f"{path}: the data set has no samples to write")
    fields = {IMAGE: image_field, LABEL: IntField()}
    labels = np.zeros(n, dtype=np.int64)
    with _atomic(path) as tmp:
        writer = DatasetWriter(str(tmp), fields, num_workers=1)
        writer.num_samples = n
        writer.prepare()  # header + field descriptors; metadata lives in writer.metadata_sm
        metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
        try:
            allocator = MemoryAllocator(str(tmp), writer.data_region_start, writer.page_size)
            with allocator, closing(_encoded(dataset, image_field, workers)) as encoded:
                for index, (record, blob, label) in enumerate(tqdm(encoded, total=n, desc=path.name, unit="img")):
                    if blob.nbytes > writer.page_size:
                        raise UserError(f"{path}: sample {index} takes {blob.nbytes} bytes, more than "
                                        f"a {writer.page_size}-byte page; pass a smaller --max-res")
                    allocator.set_current_sample(index)
                    record["data_ptr"], storage = allocator.malloc(blob.nbytes)
                    storage[:] = blob
                    metadata["f0"][index], metadata["f1"][index] = record[0], label
                    labels[index] = label
            writer.finalize(allocator.allocations)
        finally:
            del metadata  # the shared memory cannot close while a view of it is alive
            writer.metadata_sm.close()
            writer.metadata_sm.unlink()
    return labels


def check_beton(path: str | os.PathLike[str]) -> int:
    """Raise a one-line UserError unless ``path`` is a complete ``.beton``; return its sample count.

    Catches what a killed writer or a partial copy leaves: a short header, a format version
    from another ffcv, metadata or an allocation table running past the end of the file, and
    samples whose data pointer has no allocation (ffcv would read garbage for them).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        _check_layout(path, path.stat().st_size)
    except _Corrupt as exc:
        raise UserError(f"{path}: not a complete .beton ({exc}); rewrite it with {COMMAND}") from None
    return int(np.fromfile(path, dtype=HeaderType, count=1)[0]["num_samples"])


def image_modes(path: str | os.PathLike[str]) -> np.ndarray:
    """How each sample's image is stored in the ``.beton`` we wrote at ``path``: ``"jpg"`` or
    ``"raw"`` per sample, in index order (read from the file's metadata)."""
    path = Path(path)
    n = check_beton(path)
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    num_fields = int(header["num_fields"])
    handlers = get_handlers(np.fromfile(path, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize))
    metadata = np.fromfile(path, dtype=get_metadata_type(handlers), count=n,
                           offset=HeaderType.itemsize + num_fields * FieldDescType.itemsize)
    return np.array([_MODE_NAMES[int(code)] for code in metadata["f0"]["mode"]])  # f0: IMAGE


def compresses(index: int, probability: float) -> bool:
    """Whether sample ``index`` is stored as JPEG in write mode ``proportion``: a fixed function of
    the index (splitmix64's finaliser; its 53 high bits as a draw in [0, 1)), so the share of
    JPEG samples is ``probability`` on average, and ``probability`` 0 and 1 mean none and all."""
    z = (index + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53) < probability


_U64 = (1 << 64) - 1
_MODE_NAMES = {0: "jpg", 1: "raw"}  # RGBImageField's metadata "mode" (ffcv.fields.rgb_image.IMAGE_MODES)


def main(argv: Sequence[str]) -> int:
    """``nt-dist data write-ffcv``: returns the exit status (2 and one line for user errors)."""
    parser = argparse.ArgumentParser(
        prog=COMMAND, description="Write a data set's training and evaluation splits as FFCV .beton files.")
    parser.add_argument("--dataset", required=True, choices=list(DATASETS), help="data set name")
    parser.add_argument("--root", default="", help="folder holding the data set as distributed")
    parser.add_argument("--out", required=True, help="output folder (train.beton, <eval>.beton, summary.json)")
    parser.add_argument("--max-res", type=int, default=None, help="resize so the longer side is at most N px")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--jpeg-quality", type=int, default=None, help=f"JPEG quality 1..100 (default {JPEG_QUALITY})")
    mode.add_argument("--raw", action="store_true", help="store raw uint8 pixels (bit-exact, larger)")
    parser.add_argument("--compress-probability", type=float, default=None, metavar="P",
                        help="store a share P (0..1) of the images as JPEG and the rest raw (ffcv's write_mode "
                             "proportion; which ones is a fixed function of the sample index)")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="a recipe's writer settings, each used unless given explicitly; imagenet: "
                             "ffcv-imagenet's --max-res 500 --compress-probability 0.5 --jpeg-quality 90")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="encoding processes (the output does not depend on it)")
    args = parser.parse_args(list(argv))
    settings = resolve_settings(args.preset, args.max_res, args.jpeg_quality, args.raw, args.compress_probability)
    try:
        check_settings(**settings)
        print(f"settings: {describe_settings(settings)}" + (f" (preset {args.preset})" if args.preset else ""),
              flush=True)
        summary = write_ffcv(args.dataset, args.root, args.out, workers=max(1, args.workers), **settings)
    except UserError as exc:
        print(f"nt-dist: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    counts = ", ".join(f"{split} {info['samples']}" for split, info in summary["splits"].items())
    print(f"wrote {args.out}: {counts} samples, {summary['num_classes']} classes")
    return 0


def resolve_settings(preset: str | None, max_res: int | None, jpeg_quality: int | None, raw: bool,
                     compress_probability: float | None) -> dict[str, Any]:
    """The keyword settings of :func:`write_ffcv`: each one given explicitly (not None), else the
    preset's, else the default. ``raw`` is explicit: it drops a preset's JPEG settings (its
    ``max_res`` still applies)."""
    chosen = dict(PRESETS[preset]) if preset else {}
    if raw:
        chosen.pop("compress_probability", None)
        chosen.pop("jpeg_quality", None)
    given = {"max_res": max_res, "jpeg_quality": jpeg_quality, "compress_probability": compress_probability}
    chosen |= {key: value for key, value in given.items() if value is not None}
    return {"max_res": chosen.get("max_res"), "jpeg_quality": chosen.get("jpeg_quality", JPEG_QUALITY), "raw": raw,
            "compress_probability": chosen.get("compress_probability")}


def describe_settings(settings: dict[str, Any]) -> str:
    """One line: ``write_mode proportion, compress_probability 0.5, jpeg_quality 90, max_res 500``."""
    mode = "proportion" if settings["compress_probability"] is not None else "raw" if settings["raw"] else "jpg"
    parts = [f"write_mode {mode}"]
    if mode == "proportion":
        parts.append(f"compress_probability {settings['compress_probability']:g}")
    if mode != "raw":
        parts.append(f"jpeg_quality {settings['jpeg_quality']}")
    parts.append(f"max_res {settings['max_res'] or 'none (stored size)'}")
    return ", ".join(parts)


# --- encoding ------------------------------------------------------------------------------

_worker_state: tuple[Any, RGBImageField] | None = None  # (dataset, field) in each pool process


Encoded = tuple[np.ndarray, np.ndarray, int]  # (image metadata record, image bytes, label)


def _encoded(dataset: Any, image_field: RGBImageField, workers: int) -> Generator[Encoded, None, None]:
    """``(image metadata record, image bytes, label)`` for every sample, in index order."""
    if workers <= 1:
        yield from (_encode(dataset, image_field, index) for index in range(len(dataset)))
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(dataset, image_field)) as pool:
        yield from pool.imap(_encode_in_worker, range(len(dataset)), chunksize=64)


def _init_worker(dataset: Any, image_field: RGBImageField) -> None:
    global _worker_state
    _worker_state = (dataset, image_field)


def _encode_in_worker(index: int) -> Encoded:
    assert _worker_state is not None
    return _encode(*_worker_state, index)


def _encode(dataset: Any, image_field: RGBImageField, index: int) -> Encoded:
    """ffcv's own encoding of one sample, with its one allocation captured instead of placed.
    In write mode ``proportion`` the sample's mode is :func:`compresses` of its index, and ffcv's
    ``jpg`` or ``raw`` encoding is applied (ffcv's own draw would use numpy's global RNG)."""
    if image_field.write_mode == "proportion":
        mode = "jpg" if compresses(index, image_field.proportion) else "raw"
        image_field = RGBImageField(write_mode=mode, max_resolution=image_field.max_resolution,
                                    jpeg_quality=image_field.jpeg_quality)
    image, label = dataset[index]
    record = np.zeros(1, dtype=image_field.metadata_type)
    blobs: list[np.ndarray] = []

    def capture(size: int) -> tuple[int, np.ndarray]:
        blobs.append(np.empty(size, dtype="<u1"))
        return 0, blobs[-1]

    image_field.encode(record, image, capture)
    return record, blobs[0], int(label)


# --- checking ------------------------------------------------------------------------------

class _Corrupt(Exception):
    pass


def _check_layout(path: Path, size: int) -> None:
    if size < HeaderType.itemsize:
        raise _Corrupt(f"{size} bytes, shorter than the header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise _Corrupt(f"format version {header['version']}, expected {CURRENT_VERSION}")
    n, num_fields, table_at = int(header["num_samples"]), int(header["num_fields"]), int(header["alloc_table_ptr"])
    metadata_at = HeaderType.itemsize + num_fields * FieldDescType.itemsize
    if metadata_at > size:
        raise _Corrupt("field descriptors cut short")
    try:
        handlers = get_handlers(np.fromfile(path, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize))
    except KeyError:
        raise _Corrupt("unknown field type") from None
    if any(handler is None for handler in handlers):
        raise _Corrupt("custom field types are not supported")
    metadata_type = get_metadata_type(handlers)
    if table_at < metadata_at + n * metadata_type.itemsize or table_at > size:
        raise _Corrupt(f"allocation table at byte {table_at} of {size}")
    if (size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        raise _Corrupt("allocation table cut short")
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_at)
    if len(table) and (np.any(table["ptr"] + table["size"] > table_at) or np.any(table["sample_id"] >= n)):
        raise _Corrupt("allocation outside the data region")
    metadata = np.fromfile(path, dtype=metadata_type, count=n, offset=metadata_at)
    for name in metadata_type.names:
        pointers = "data_ptr" in (metadata_type[name].names or ())
        if pointers and not np.all(np.isin(metadata[name]["data_ptr"], table["ptr"])):
            raise _Corrupt("a sample points at data that is not in the file")


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
