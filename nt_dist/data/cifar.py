"""CIFAR-10 and CIFAR-100 read from the python-pickle archives exactly as distributed.

``root/cifar-10-batches-py/`` holds ``data_batch_1..5``, ``test_batch`` and ``batches.meta``;
``root/cifar-100-python/`` holds ``train``, ``test`` and ``meta`` (we use the 100 fine labels).
Each batch is a pickled dict with ``data`` (N x 3072 uint8: the red, green and blue 32x32 planes
of each image in turn) and ``labels`` / ``fine_labels``. The files were pickled by Python 2, so
they are read with ``encoding="bytes"`` (keys arrive as ``b"data"``), as the CIFAR page shows;
no md5 check is made, so any copy with the right layout loads, and the unpickler accepts only
plain containers and numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nt_dist.errors import UserError

# num_classes -> (folder, files per split, metadata file, label key, class-name key)
_LAYOUT: dict[int, tuple[str, dict[str, list[str]], str, str, str]] = {
    10: ("cifar-10-batches-py",
         {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
         "batches.meta", "labels", "label_names"),
    100: ("cifar-100-python", {"train": ["train"], "test": ["test"]},
          "meta", "fine_labels", "fine_label_names"),
}


class CifarDataset:
    """Map-style dataset of ``(PIL RGB image 32x32, int label)``; ``split`` is train or test."""

    def __init__(self, root: str, split: str, num_classes: int) -> None:
        folder, files, meta_name, label_key, names_key = _LAYOUT[num_classes]
        base = Path(root) / folder
        what = f"the CIFAR-{num_classes} python archive as distributed, unpacked under data.root"
        meta = _load(base / meta_name, what, names_key)
        self.classes: list[str] = [_text(name) for name in meta[names_key]]
        images: list[np.ndarray] = []
        targets: list[int] = []
        for name in files[split]:
            batch = _load(base / name, what, "data", label_key)
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            targets.extend(int(label) for label in batch[label_key])
        self.images: np.ndarray = np.concatenate(images).transpose(0, 2, 3, 1).copy()  # NHWC
        self.targets: list[int] = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="RGB"), self.targets[index]


def _load(path: Path, what: str, *keys: str) -> dict[str, Any]:
    """One pickled dict with ``keys`` (decoded to str); a missing or damaged file is a UserError."""
    if not path.is_file():
        raise UserError(f"data.root: {path} not found (expected {what})")
    try:
        with path.open("rb") as handle:
            tree = {_text(key): value for key, value in _ArraysOnly(handle, encoding="bytes").load().items()}
    except Exception as exc:  # noqa: BLE001  unpickling raises many types; all mean "not a CIFAR batch"
        raise UserError(f"data.root: {path} is not a readable CIFAR pickle ({type(exc).__name__})") from None
    missing = [key for key in keys if key not in tree]
    if missing:
        raise UserError(f"data.root: {path} has no {missing[0]!r} entry (expected {what})")
    return tree


class _ArraysOnly(pickle.Unpickler):
    """Containers, numbers, bytes and numpy arrays only: reading a data file must not run code."""

    ALLOWED = frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                         ("numpy._core.multiarray", "_reconstruct"),
                         ("_codecs", "encode")})  # how Python 3 writes bytes at protocol 2

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}")
        return super().find_class(module, name)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
