"""FFCV ``.beton`` files: writing a data set's two splits, checking a file, and the CLI.

``write_ffcv(name, root, out_dir)`` writes ``out_dir/<train split>.beton``,
``out_dir/<eval split>.beton`` (fields ``image``: RGBImageField, ``label``: IntField) and
``out_dir/summary.json`` (counts, label histograms, settings), which the FFCV loader reads.

The output depends only on the inputs and settings, never on ``workers``: samples are
encoded in parallel (by ffcv's own ``RGBImageField.encode``) but laid out in the file by one
process in index order. ffcv's ``DatasetWriter`` lets its workers race for pages, so two runs
over the same data give different bytes; here a rewrite gives the same file. Each file is
written under a temporary name and renamed into place, so a reader never sees half a file.
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


def write_ffcv(dataset_name: str, root: str, out_dir: str, max_res: int | None = None,
               jpeg_quality: int = 90, raw: bool = False, workers: int = 1) -> dict[str, Any]:
    """Write both splits of ``dataset_name`` (read from ``root``) and the summary; return it."""
    datasets = {split: build_dataset(dataset_name, root, split) for split in dataset_spec(dataset_name).splits}
    return write_splits(dataset_name, datasets, out_dir, max_res, jpeg_quality, raw, workers)


def write_splits(dataset_name: str, datasets: dict[str, Any], out_dir: str, max_res: int | None = None,
                 jpeg_quality: int = 90, raw: bool = False, workers: int = 1) -> dict[str, Any]:
    """Write ``<split>.beton`` for each map-style dataset of ``(image, label)`` and
    ``summary.json``; return the summary. The splits share the first one's ``.classes``."""
    if max_res is not None and max_res < 1:
        raise UserError(f"--max-res: must be a positive number of pixels (got {max_res})")
    if not 1 <= jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality: must lie in 1..100 (got {jpeg_quality})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = next(iter(datasets.values())).classes
    image_field = RGBImageField(write_mode="raw" if raw else "jpg", max_resolution=max_res,
                                jpeg_quality=jpeg_quality)
    splits = {}
    for split, dataset in datasets.items():
        labels = write_beton(dataset, out / f"{split}.beton", image_field, workers)
        splits[split] = {"file": f"{split}.beton", "samples": len(labels),
                         "label_histogram": np.bincount(labels, minlength=len(classes)).tolist()}
    summary = {
        "dataset": dataset_name,
        "num_classes": len(classes),
        "classes": list(classes),
        "splits": splits,
        "settings": {"write_mode": image_field.write_mode, "max_resolution": max_res,
                     "jpeg_quality": None if raw else jpeg_quality},
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


def main(argv: Sequence[str]) -> int:
    """``nt-dist data write-ffcv``: returns the exit status (2 and one line for user errors)."""
    parser = argparse.ArgumentParser(
        prog=COMMAND, description="Write a data set's training and evaluation splits as FFCV .beton files.")
    parser.add_argument("--dataset", required=True, choices=list(DATASETS), help="data set name")
    parser.add_argument("--root", default="", help="folder holding the data set as distributed")
    parser.add_argument("--out", required=True, help="output folder (train.beton, <eval>.beton, summary.json)")
    parser.add_argument("--max-res", type=int, default=None, help="resize so the longer side is at most N px")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    mode.add_argument("--raw", action="store_true", help="store raw uint8 pixels (bit-exact, larger)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="encoding processes (the output does not depend on it)")
    args = parser.parse_args(list(argv))
    try:
        summary = write_ffcv(args.dataset, args.root, args.out, args.max_res, args.jpeg_quality,
                             args.raw, max(1, args.workers))
    except UserError as exc:
        print(f"nt-dist: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    counts = ", ".join(f"{split} {info['samples']}" for split, info in summary["splits"].items())
    print(f"wrote {args.out}: {counts} samples, {summary['num_classes']} classes")
    return 0


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
    """ffcv's own encoding of one sample, with its one allocation captured instead of placed."""
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
