"""Decode a split once into a uint8 array (N x 3 x S x S) kept on disk, keyed by its sources.

The device loader (:mod:`nt_dist.data.device_loader`) holds whole splits as arrays; decoding
100k JPEGs on every start would cost more than an epoch. A cache entry is a folder::

    <cache_dir>/<name>-<root hash>-<split>-<size>px-<key>/
        images.npy   uint8 [N, 3, S, S]   the split through the pre-augmentation transform
        labels.npy   int64 [N]
        meta.json    what the key was computed from, and the count

``key`` digests everything the pixels depend on: a format version, the data set, split and
image size, the transform (evaluation: the torch loader's; training: the resize before
augmentation), and the sources: the content of in-memory data sets (digits, CIFAR) or the path,
size and modification time of every image file. A changed data set gives another key and is
decoded again; entries of the same data set with another key are removed then.

The folder is written as ``<entry>.tmp-<pid>`` and renamed into place (atomic): a killed writer
never leaves a half entry under the real name. Writers of the same entry (ranks of one run, runs
side by side) take an ``fcntl`` lock on ``<entry>.lock``: one decodes, the others wait and read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nt_dist.errors import UserError, say

FORMAT = 1
ENV = "NT_DIST_CACHE"


def cache_root(configured: str = "") -> Path:
    """``data.cache_dir``, else ``$NT_DIST_CACHE``, else ``$XDG_CACHE_HOME/nt_dist`` (``~/.cache``)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nt_dist"


def array_bytes(count: int, size: int) -> int:
    """Bytes of ``count`` decoded RGB images of ``size`` x ``size`` (uint8)."""
    return count * 3 * size * size


@dataclass(frozen=True)
class Entry:
    """One cached split: where it lives and what it holds."""

    folder: Path
    count: int
    size: int

    @property
    def images(self) -> Path:
        return self.folder / "images.npy"

    @property
    def labels(self) -> Path:
        return self.folder / "labels.npy"

    @property
    def nbytes(self) -> int:
        return array_bytes(self.count, self.size)


def source_digest(dataset: Any) -> str:
    """What the pixels of ``dataset`` come from: the arrays of an in-memory data set, or the
    path, size and modification time of each file of an image-file data set."""
    digest = hashlib.sha256()
    if hasattr(dataset, "images"):  # digits, CIFAR: arrays in memory
        images = np.ascontiguousarray(dataset.images)
        digest.update(f"{images.shape}{images.dtype}".encode())
        digest.update(memoryview(images).cast("B"))
        digest.update(json.dumps(list(map(int, dataset.targets))).encode())
        return digest.hexdigest()
    for path, label in dataset.samples:  # image files
        try:
            stat = os.stat(path)
        except OSError:
            raise UserError(f"data.root: {path} not found (it was listed a moment ago)") from None
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


def entry_for(dataset: Any, name: str, root: str, split: str, size: int, transform: str,
              cache_dir: str) -> Entry:
    """The cache entry ``dataset`` would have (it need not exist yet)."""
    sources = source_digest(dataset)
    where = hashlib.sha256(str(Path(root).resolve() if root else "").encode()).hexdigest()[:8]
    key = hashlib.sha256(json.dumps({"format": FORMAT, "name": name, "split": split, "size": size,
                                     "transform": transform, "sources": sources}).encode()).hexdigest()[:16]
    folder = cache_root(cache_dir) / f"{name}-{where}-{split}-{size}px-{key}"
    return Entry(folder, len(dataset), size)


def ensure(entry: Entry, dataset: Any, transform: Callable[[Any], torch.Tensor], workers: int,
           describe: str) -> Entry:
    """Make sure ``entry`` exists on disk, decoding ``dataset`` through ``transform`` if not."""
    if _complete(entry):
        return entry
    try:
        entry.folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"data.cache_dir: cannot create {entry.folder.parent} ({exc.strerror or exc}); "
                        f"set data.cache_dir or ${ENV} to a writable folder") from None
    with _locked(entry.folder.with_name(entry.folder.name + ".lock")):
        if _complete(entry):  # another process decoded it while we waited
            return entry
        started = time.perf_counter()
        say(f"nt-dist: decoding {describe} ({entry.count:,} images at {entry.size} px, "
            f"{entry.nbytes / 2**20:,.0f} MiB) once into {entry.folder}")
        _write(entry, dataset, transform, workers)
        _remove_stale(entry)
        say(f"nt-dist: decoded {describe} in {time.perf_counter() - started:.1f} s")
    return entry


def load(entry: Entry, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The entry's images (uint8) and labels (int64) on ``device``. On a CPU the images stay
    memory-mapped, copy-on-write: processes of one machine share the pages."""
    images = np.load(entry.images, mmap_mode="c" if device.type == "cpu" else "r")
    labels = torch.from_numpy(np.load(entry.labels)).to(device)
    if images.shape != (entry.count, 3, entry.size, entry.size):
        raise UserError(f"data.cache_dir: {entry.images} holds {images.shape}, expected "
                        f"{(entry.count, 3, entry.size, entry.size)}; delete {entry.folder}")
    if device.type == "cpu":
        return torch.from_numpy(images), labels
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)
    chunk = max(1, (256 << 20) // max(1, images[0].nbytes))  # 256 MiB per copy
    for start in range(0, len(images), chunk):
        out[start:start + chunk].copy_(torch.from_numpy(np.array(images[start:start + chunk])))  # a writable copy
    return out, labels


# ------------------------------------------------------------------------------- internals


def _complete(entry: Entry) -> bool:
    try:
        meta = json.loads((entry.folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("count") == entry.count and entry.images.is_file() and entry.labels.is_file()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, dataset: Any, transform: Callable[[Any], torch.Tensor]) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), int(label)


def _write(entry: Entry, dataset: Any, transform: Callable[[Any], torch.Tensor], workers: int) -> None:
    for dead in entry.folder.parent.glob(entry.folder.name + ".tmp-*"):  # under the lock: writers that died
        shutil.rmtree(dead, ignore_errors=True)
    temporary = entry.folder.with_name(f"{entry.folder.name}.tmp-{os.getpid()}")
    try:
        temporary.mkdir()
        shape = (entry.count, 3, entry.size, entry.size)
        images = np.lib.format.open_memmap(temporary / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
        labels = np.empty(entry.count, dtype=np.int64)
        # its own generator: drawing the workers' base seed from the global RNG would change the
        # model's initialisation in a run that decodes against one that reads the cache
        loader = torch.utils.data.DataLoader(_Decoded(dataset, transform), batch_size=256, num_workers=workers,
                                             generator=torch.Generator().manual_seed(0))
        start = 0
        for batch, targets in loader:
            if batch.shape[1:] != shape[1:]:
                raise UserError(f"data: decoding gave images of {tuple(batch.shape[1:])}, expected {shape[1:]}")
            images[start:start + len(batch)] = batch.numpy()
            labels[start:start + len(batch)] = targets.numpy()
            start += len(batch)
        images.flush()
        del images
        np.save(temporary / "labels.npy", labels)
        (temporary / "meta.json").write_text(json.dumps({"count": entry.count, "size": entry.size,
                                                         "format": FORMAT, "written": time.time()}))
        for name in ("images.npy", "labels.npy", "meta.json"):
            with (temporary / name).open("rb") as handle:
                os.fsync(handle.fileno())
        if entry.folder.exists():  # incomplete (files removed by hand): replaced whole
            shutil.rmtree(entry.folder)
        os.rename(temporary, entry.folder)
    except OSError as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        raise UserError(f"data.cache_dir: {exc.strerror or exc} while writing {temporary} "
                        f"({entry.nbytes / 2**20:,.0f} MiB); free space or set data.cache_dir") from None
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _remove_stale(entry: Entry) -> None:
    """Entries of the same data set, root, split and size with another key: the data changed."""
    prefix = entry.folder.name.rsplit("-", 1)[0] + "-"
    for other in entry.folder.parent.glob(prefix + "*"):
        suffix = other.name[len(prefix):]
        if other != entry.folder and other.is_dir() and len(suffix) == 16 and "." not in suffix:
            shutil.rmtree(other, ignore_errors=True)
            other.with_name(other.name + ".lock").unlink(missing_ok=True)
