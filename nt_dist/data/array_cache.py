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

An entry serves only what was written (issue 24: a truncated ``images.npy`` was a traceback,
pixels changed in place were trained on silently). ``meta.json`` records, per data file, its
size and the sha256 of every :data:`BLOCK` (16 MiB) of it; opening an entry compares the size
(a truncated file is named as such without reading it), then every digest. A mismatch is one
warning naming the file, and the split is decoded again. The hash covers *every* byte, not a
sample: a sampled check misses a change between its samples, and the full one is cheap enough.
Measured (:func:`file_digests` on random files in the page cache, best of 7) on the project's
2-core AMD EPYC dev machine, which has SHA-NI: sha256 runs at 1.5 GiB/s per core (blake2b 0.85,
md5 0.7: hence sha256); a 100 MiB file takes 65 ms on one thread. The blocks are hashed on up
to :data:`HASH_THREADS` threads (hashlib and ``preadv`` release the GIL); on both cores: 100 MiB
35 ms, the CIFAR training split (146 MiB) 54 ms (95 ms on one), Tiny-ImageNet's at 64 px
(1.14 GiB) 0.38 s (0.75 s on one). ImageNet at 64 px (15 GiB, not measured) would take ~10 s
on one core, less on more, against an hour to decode it. The load that follows reads the same
pages again, from the page cache.
Writing an entry hashes it once more, read back after the ``fsync``. ``FORMAT`` 2 added the
check: entries of format 1 carry none and get another key, so they are decoded once again and
removed as stale (no warning: nothing is wrong with them).

Reading needs no lock and no write: a cache folder shared read-only (decoded once by its
owner) is served as it is. Only decoding writes; where it cannot, that is one
``data.cache_dir`` line (see :func:`_unwritable` for why not a decode in memory instead).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nt_dist.errors import UserError, say, warn

FORMAT = 2  # 2: meta.json records the size and block digests of each data file
ENV = "NT_DIST_CACHE"
DATA_FILES = ("images.npy", "labels.npy")
BLOCK = 16 << 20  # bytes per digest, the unit hashed in parallel: CIFAR ~10 blocks, ImageNet at 64 px ~970
COPY_CHUNK_BYTES = 256 << 20  # a split goes to the GPU in copies of at most this many bytes
HASH_THREADS = 8  # past this, reading the file is the limit, not hashing it


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
    """Make sure ``entry`` is on disk as it was written, decoding ``dataset`` through
    ``transform`` if it is absent or damaged (one warning naming the damaged file)."""
    problem = _problem(entry)
    if problem is None:  # the common case, verified without a lock: a read-only folder serves too
        return entry
    try:
        entry.folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"data.cache_dir: cannot create {entry.folder.parent} ({exc.strerror or exc}); "
                        f"set data.cache_dir or ${ENV} to a writable folder") from None
    try:
        with _locked(entry.folder.with_name(entry.folder.name + ".lock")):
            problem = _problem(entry)  # another process may have decoded it while we waited
            if problem is None:
                return entry
            if problem:  # warned here, under the lock: by the one process that decodes, not by every rank
                warn(f"{problem}; decoding {describe} again")
            started = time.perf_counter()
            say(f"nt-dist: decoding {describe} ({entry.count:,} images at {entry.size} px, "
                f"{entry.nbytes / 2**20:,.0f} MiB) once into {entry.folder}")
            _write(entry, dataset, transform, workers)
            _remove_stale(entry)
            say(f"nt-dist: decoded {describe} in {time.perf_counter() - started:.1f} s")
    except OSError as exc:
        raise _unwritable(entry, describe, problem or "", exc) from None
    return entry


def file_digests(path: Path, block: int = BLOCK, threads: int = 0) -> list[str]:
    """The sha256 of each ``block`` bytes of ``path``, in order (the last block may be short; an
    empty file has none). Blocks are hashed on ``threads`` threads (0: one per core, at most
    :data:`HASH_THREADS`); the digests do not depend on how many."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        starts = range(0, size, block)
        workers = threads or min(HASH_THREADS, len(os.sched_getaffinity(0)))
        with ThreadPoolExecutor(max(1, min(workers, len(starts)))) as pool:
            return list(pool.map(lambda start: _block_digest(handle.fileno(), start, min(block, size - start)),
                                 starts))


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
    chunk = max(1, COPY_CHUNK_BYTES // max(1, images[0].nbytes))  # the host holds one chunk at a time
    for start in range(0, len(images), chunk):
        out[start:start + chunk].copy_(torch.from_numpy(np.array(images[start:start + chunk])))  # a writable copy
    return out, labels


# ------------------------------------------------------------------------------- internals


def _problem(entry: Entry) -> str | None:
    """What keeps ``entry`` from being served: ``None`` when it is on disk as written, ``""``
    when there is none, else what is wrong, naming the file (a warning's first half)."""
    if not entry.folder.is_dir():
        return ""
    path = entry.folder / "meta.json"
    try:
        meta = json.loads(path.read_text())
        files = meta["files"]
        usable = meta["format"] == FORMAT and meta["count"] == entry.count and all(
            isinstance(files[name], dict) for name in DATA_FILES)
    except FileNotFoundError:  # never under the real name when written (renamed whole): removed by hand
        return f"{path} is missing"
    except OSError as exc:
        return f"{path} is unreadable ({exc.strerror or exc})"
    except (ValueError, KeyError, TypeError):
        usable = False
    if not usable:
        return f"{path} is not the metadata nt-dist writes (garbled or edited)"
    for name in DATA_FILES:
        problem = _file_problem(entry.folder / name, files[name])
        if problem:
            return problem
    return None


def _file_problem(path: Path, record: dict[str, Any]) -> str | None:
    """How ``path`` differs from its ``record`` (written by :func:`_record`), or ``None``. The
    size first: a truncated file is named as such, and without reading it."""
    try:
        size = path.stat().st_size
        if size != record.get("bytes"):
            return f"{path} is {size:,} bytes, expected {record.get('bytes'):,} (truncated or overwritten)"
        if file_digests(path, int(record.get("block") or BLOCK)) != record.get("sha256"):
            return f"{path} does not match the sha256 recorded when it was written (changed on disk)"
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as exc:
        return f"{path} is unreadable ({exc.strerror or exc})"
    except (TypeError, ValueError):  # a record edited into other types
        return f"{path.with_name('meta.json')} is not the metadata nt-dist writes (garbled or edited)"
    return None


def _record(path: Path) -> dict[str, Any]:
    """What :func:`_file_problem` checks ``path`` against: its size and block digests."""
    return {"bytes": path.stat().st_size, "block": BLOCK, "sha256": file_digests(path)}


def _block_digest(fd: int, start: int, length: int) -> str:
    """sha256 of ``length`` bytes of ``fd`` from ``start``, read 1 MiB at a time (``preadv``: no
    shared file position, so threads read side by side)."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(min(length, 1 << 20)))
    done = 0
    while done < length:
        got = os.preadv(fd, [view[:min(len(view), length - done)]], start + done)
        if not got:  # shrank while being read: what was read cannot match
            break
        digest.update(view[:got])
        done += got
    return digest.hexdigest()


def _unwritable(entry: Entry, describe: str, problem: str, exc: OSError) -> UserError:
    """The one line for an entry that must be decoded and cannot be written.

    Why an error and not a decode in memory with a note: the cache exists because decoding costs
    more than an epoch (minutes for Tiny-ImageNet, an hour for ImageNet); in memory every rank
    would decode on its own, on every start, and CPU ranks would stop sharing pages. Paying that
    silently on every run is worse than one line fixed once. ``data.loader: torch`` is the way
    to train without any cache."""
    reason = f"{problem}; " if problem else ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"data.cache_dir: {reason}cannot write in {entry.folder.parent} to decode {describe} "
                         f"({exc.strerror}); set data.cache_dir or ${ENV} to a writable folder, "
                         "or use data.loader: torch")
    return UserError(f"data.cache_dir: {reason}{exc.strerror or exc} while writing {entry.folder} "
                     f"({entry.nbytes / 2**20:,.0f} MiB); free space or set data.cache_dir")


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
    """Decode into ``<entry>.tmp-<pid>`` and rename it into place. An ``OSError`` propagates (the
    temporary folder removed) for :func:`ensure` to name."""
    for dead in entry.folder.parent.glob(entry.folder.name + ".tmp-*"):  # under the lock: writers that died
        shutil.rmtree(dead, ignore_errors=True)
    from nt_dist.data import usable_workers

    temporary = entry.folder.with_name(f"{entry.folder.name}.tmp-{os.getpid()}")
    try:
        temporary.mkdir()
        shape = (entry.count, 3, entry.size, entry.size)
        images = np.lib.format.open_memmap(temporary / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
        labels = np.empty(entry.count, dtype=np.int64)
        # its own generator: drawing the workers' base seed from the global RNG would change the
        # model's initialisation in a run that decodes against one that reads the cache
        loader = torch.utils.data.DataLoader(_Decoded(dataset, transform), batch_size=256,
                                             num_workers=usable_workers(workers),
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
        for name in DATA_FILES:
            with (temporary / name).open("rb") as handle:
                os.fsync(handle.fileno())
        # hashed as read back, after the fsync: the record describes the bytes on disk
        (temporary / "meta.json").write_text(json.dumps({
            "count": entry.count, "size": entry.size, "format": FORMAT, "written": time.time(),
            "files": {name: _record(temporary / name) for name in DATA_FILES}}))
        with (temporary / "meta.json").open("rb") as handle:
            os.fsync(handle.fileno())
        if entry.folder.exists():  # damaged or incomplete: replaced whole
            shutil.rmtree(entry.folder)
        os.rename(temporary, entry.folder)
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
