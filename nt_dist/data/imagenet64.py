"""Downsampled ImageNet at 64x64 pixels, read from the files image-net.org distributes.

Followed: Chrabaszcz, Loshchilov & Hutter (2017), "A Downsampled Variant of ImageNet as an
Alternative to the CIFAR datasets" (arXiv:1707.08819), and the loading code published with it
(github.com/PatrykChrabaszcz/Imagenet32_Scripts, ``load(...)`` / ``unpickle``). The archives
``Imagenet64_train_part1.zip``, ``Imagenet64_train_part2.zip`` and ``Imagenet64_val.zip`` hold::

    train_data_batch_1 .. train_data_batch_10    the 1,281,167 training images
    val_data                                     the 50,000 validation images

``data.root`` holds them either flat (all eleven files in it) or as
``Imagenet64_train/train_data_batch_*`` and ``Imagenet64_val/val_data``; each split is looked for
flat first, then in its subfolder. Each file is a Python pickle of a dict: ``data``, uint8
``[N, 12288]``, each row the red plane, then green, then blue, each 64x64 row-major (CIFAR's
layout); ``labels``, N ints in 1..1000; training files also ``mean``, the mean image (unused:
normalisation uses ImageNet's statistics, nothing is computed at run time). Keys may be text
or bytes (a Python 2 pickle read with ``encoding="bytes"``), and the unpickler is CIFAR's
(:class:`nt_dist.data.cifar._ArraysOnly`): plain containers and numpy arrays only, so a file
cannot run code.

**Class index** = label - 1, the files' own order: that of the ``map_clsloc.txt`` of the
ILSVRC-2012 CLS-LOC devkit the authors labelled by (``n02119789 1 kit_fox``, ...), which is
*not* the sorted-wnid order of :mod:`nt_dist.data.imagenet`: class *i* of ``imagenet64`` and
class *i* of ``imagenet`` are in general different classes. The files name no classes, so
``classes`` are the indices ``"0" .. "999"``.

**Memory.** The training split is 15.7 GB of pixels: the NHWC array is allocated once, sized
from the files' sizes (a pickle holds each row's 12,288 bytes, so ``sum(size) // 12288`` bounds
the row count; the handful of spare rows are never exposed), and filled file by file; the peak
is that array plus what one file (1.6 GB) takes to unpickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nt_dist.data.cifar import _ArraysOnly, _text
from nt_dist.errors import UserError

SIDE = 64
ROW = 3 * SIDE * SIDE  # 12288 bytes a row: R, G, B planes
NUM_CLASSES = 1000
FILES = {"train": [f"train_data_batch_{i}" for i in range(1, 11)], "val": ["val_data"]}
FOLDERS = {"train": "Imagenet64_train", "val": "Imagenet64_val"}
LAYOUT = ("ImageNet 64x64 as distributed: train_data_batch_1..10 and val_data in data.root, "
          "or data.root/Imagenet64_train/train_data_batch_* and data.root/Imagenet64_val/val_data")


class ImageNet64Dataset:
    """Map-style ``(PIL RGB image 64x64, int label)``; ``split`` is train or val. ``images`` is
    uint8 ``[N, 64, 64, 3]`` (C-contiguous), ``targets`` the class indices (label - 1)."""

    def __init__(self, root: str, split: str) -> None:
        self.files: list[Path] = batch_files(Path(root), split)
        self.classes: list[str] = [str(i) for i in range(NUM_CLASSES)]
        self.images, targets = read_batches(self.files)
        self.targets: list[int] = targets.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), self.targets[index]


def batch_files(base: Path, split: str) -> list[Path]:
    """The files of ``split``: flat in ``base`` if its first file is there, else in the split's
    subfolder if that exists; each must be present."""
    names = FILES[split]
    nested = base / FOLDERS[split]
    folder = nested if not (base / names[0]).is_file() and nested.is_dir() else base
    for name in names:
        path = folder / name
        if not path.is_file():
            npz = path.with_name(name + ".npz")
            hint = f"; {npz} is the npz variant, which is not read: use the pickle files" if npz.is_file() else ""
            raise UserError(f"data.root: {path} not found (expected {LAYOUT}){hint}")
    return [folder / name for name in names]


def read_batches(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """All rows of ``files`` as one NHWC uint8 array, allocated once, and the class indices."""
    bound = sum(path.stat().st_size for path in files) // ROW
    images = np.empty((bound, SIDE, SIDE, 3), dtype=np.uint8)
    targets = np.empty(bound, dtype=np.int64)
    filled = 0
    for path in files:
        data, labels = read_batch(path)
        count = len(data)
        if filled + count > bound:  # a pickle stores every byte of its rows: only a crafted file gets here
            raise UserError(f"data.root: {path} holds more rows than its size allows; not an ImageNet 64x64 batch")
        images[filled:filled + count] = data.reshape(count, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
        targets[filled:filled + count] = labels - 1
        filled += count
        del data
    return images[:filled], targets[:filled]  # views: contiguous, no copy


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``data`` (uint8 ``[N, 12288]``) and ``labels`` (int64 ``[N]``, 1..1000) of one file."""
    tree = _load(path)
    data = tree["data"]
    if not isinstance(data, np.ndarray) or data.ndim != 2:
        raise UserError(f"data.root: {path}: 'data' is not a 2-D array of rows (expected uint8 [N, {ROW}])")
    if data.shape[1] != ROW:
        side = round((data.shape[1] / 3) ** 0.5)
        size = f", as in the {side}x{side} variant" if 3 * side * side == data.shape[1] else ""
        raise UserError(f"data.root: {path}: rows of {data.shape[1]} values{size}; only the 64x64 variant is "
                        f"read (rows of 3*64*64 = {ROW})")
    if data.dtype != np.uint8:
        raise UserError(f"data.root: {path}: 'data' holds {data.dtype}, expected uint8 pixels")
    try:
        labels = np.asarray(tree["labels"])
        if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
            raise ValueError
        labels = labels.astype(np.int64)
    except (ValueError, TypeError):
        raise UserError(f"data.root: {path}: 'labels' is not a list of integers") from None
    if len(labels) != len(data):
        raise UserError(f"data.root: {path}: {len(labels)} labels but {len(data)} rows of 'data' (one label a row)")
    bad = np.flatnonzero((labels < 1) | (labels > NUM_CLASSES))
    if bad.size:
        raise UserError(f"data.root: {path}: label {labels[bad[0]]} of row {bad[0]} is outside 1..{NUM_CLASSES} "
                        f"({bad.size} of the {len(labels)} labels are)")
    return data, labels


class _Arrays(_ArraysOnly):
    """CIFAR's restricted unpickler, and numpy's constructor of protocol-5 array pickles."""

    ALLOWED = _ArraysOnly.ALLOWED | {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


def _load(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            loaded = _Arrays(handle, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001  unpickling raises many types; all mean "not such a pickle"
        raise UserError(f"data.root: {path} is not a readable ImageNet 64x64 pickle ({type(exc).__name__}); "
                        "expected a pickled dict with data and labels") from None
    if not isinstance(loaded, dict):
        raise UserError(f"data.root: {path} holds a {type(loaded).__name__}, not a dict with data and labels "
                        "(not an ImageNet 64x64 batch)")
    tree = {_text(key): value for key, value in loaded.items()}
    for key in ("data", "labels"):
        if key not in tree:
            raise UserError(f"data.root: {path} has no {key!r} entry (expected a pickled dict with data and labels)")
    return tree

