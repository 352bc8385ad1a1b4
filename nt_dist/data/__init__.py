"""Data sets in their original distribution layouts, and the two input paths that feed them.

``build_dataset(name, root, split)`` gives a map-style dataset of ``(PIL image, int label)``
with no augmentation; ``build_data(cfg, ...)`` gives the training and evaluation sources the
training loop iterates: held whole on the training device (``data.loader: device``; ``auto``
picks it where the decoded splits fit), through FFCV (``ffcv``) or torchvision + DataLoader
(``torch``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from nt_dist.config import DataConfig
from nt_dist.data.torch_loader import SeededTransformDataset, TorchEvalSource, TorchTrainSource
from nt_dist.data.transforms import build_transform
from nt_dist.errors import UserError, say, warn

Batch = tuple[torch.Tensor, torch.Tensor]

# name -> (training split, evaluation split)
SPLITS: dict[str, tuple[str, str]] = {
    "digits": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "tinyimagenet": ("train", "val"),
    "imagefolder": ("train", "val"),
}


class TrainSource(Protocol):
    steps_per_epoch: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...


class EvalSource(Protocol):
    def __len__(self) -> int: ...

    def batches(self) -> Iterator[Batch]: ...


@dataclass
class DataBundle:
    train: TrainSource
    eval: EvalSource
    num_classes: int
    train_size: int
    # what the splits were read from (datasets of build_dataset, or .beton files), for data_inputs
    sources: tuple[Any, Any] = ()
    eval_size: int = 0


@dataclass(frozen=True)
class DataInput:
    """One split as an MLflow dataset input: what it is and a digest of what was read."""

    name: str
    digest: str
    source: str
    profile: dict[str, Any]
    context: str  # train | eval


def data_inputs(cfg: DataConfig, bundle: DataBundle) -> list[DataInput]:
    """The training and evaluation splits a run read, with a digest of their contents: the
    pixels and labels of in-memory data sets (digits, CIFAR), the relative path, size and label
    of every image file of a folder layout, the size and first MiB of a .beton file."""
    splits = SPLITS.get(cfg.name, ("train", "val"))
    if bundle.sources and isinstance(bundle.sources[0], Path):
        source = str(Path(cfg.ffcv_dir).resolve())
    elif cfg.root:
        source = str(Path(cfg.root).resolve())
    else:
        source = "nt_dist package data (scikit-learn digits)"
    inputs = []
    for split, base, size, context in zip(splits, bundle.sources, (bundle.train_size, bundle.eval_size),
                                          ("train", "eval"), strict=False):
        profile = {"split": split, "images": size, "classes": bundle.num_classes, "image_size": cfg.image_size}
        if context == "train" and cfg.train_subset:
            profile["train_subset"] = cfg.train_subset
        inputs.append(DataInput(f"{cfg.name}-{split}", _digest(base, cfg.root), source, profile, context))
    return inputs


def _digest(base: Any, root: str) -> str:
    import hashlib
    import os

    if hasattr(base, "images"):  # digits, CIFAR: the pixels and labels, as the array cache keys them
        from nt_dist.data.array_cache import source_digest

        return source_digest(base)[:16]
    digest = hashlib.sha256()
    if isinstance(base, Path):  # a .beton file: its size and first MiB (they hold the header and index)
        with base.open("rb") as handle:
            digest.update(f"{base.stat().st_size}".encode())
            digest.update(handle.read(1 << 20))
    else:  # image files: where they sit under data.root, their size and label (not their mtime: a copy keeps it)
        top = Path(root).resolve() if root else Path("/")
        for path, label in base.samples:
            relative = os.path.relpath(Path(path).resolve(), top)
            digest.update(f"{relative}\0{os.stat(path).st_size}\0{label}\n".encode())
    return digest.hexdigest()[:16]


def build_dataset(name: str, root: str, split: str) -> Any:
    """A map-style dataset of ``(image, label)`` read from ``root`` in its original layout."""
    if name not in SPLITS:
        raise UserError(f"data.name: unknown data set {name!r}; expected one of: {', '.join(SPLITS)}")
    if split not in SPLITS[name]:
        raise UserError(f"data set {name!r} has splits {' and '.join(SPLITS[name])}, not {split!r}")
    if name == "digits":
        from nt_dist.data.digits import DigitsDataset

        return DigitsDataset(split)
    if name in ("cifar10", "cifar100"):
        from nt_dist.data.cifar import CifarDataset

        return CifarDataset(root, split, num_classes=10 if name == "cifar10" else 100)
    if name == "tinyimagenet":
        from nt_dist.data.folders import TinyImageNetDataset

        return TinyImageNetDataset(root, split)
    from nt_dist.data.folders import ImageFolderDataset

    return ImageFolderDataset(root, split)


def num_classes_of(dataset: Any) -> int:
    return len(dataset.classes)


def build_data(cfg: DataConfig, seed: int, rank: int, world: int, device: torch.device) -> DataBundle:
    """Training and evaluation sources for this process (rank ``rank`` of ``world``)."""
    if cfg.loader == "ffcv":
        try:
            from nt_dist.data.ffcv_loader import build_ffcv_data
        except ImportError as exc:
            warn(f"ffcv is not importable ({exc}); using the torchvision loader")
        else:
            return build_ffcv_data(cfg, seed, rank, world, device)
    train_split, eval_split = SPLITS[cfg.name] if cfg.name in SPLITS else ("train", "test")
    train_base = build_dataset(cfg.name, cfg.root, train_split)
    eval_base = build_dataset(cfg.name, cfg.root, eval_split)
    if cfg.loader in ("auto", "device"):
        bundle = _device_data(cfg, seed, rank, world, device, train_base, eval_base, train_split, eval_split)
        if bundle is not None:
            return bundle
    for split in (train_base, eval_base):
        if hasattr(split, "check"):  # image files: find unreadable ones before the first step
            split.check(rank, world)
    sources = (train_base, eval_base)
    if cfg.train_subset:
        train_base = _Subset(train_base, cfg.train_subset)
    train = SeededTransformDataset(
        train_base, build_transform(cfg.name, cfg.augment, cfg.image_size, train=True), seed, cfg.augment_views)
    evaluation = SeededTransformDataset(
        eval_base, build_transform(cfg.name, cfg.augment, cfg.image_size, train=False), seed)
    _check_batch(cfg, len(train), world)
    return DataBundle(
        train=TorchTrainSource(train, cfg.name, cfg.batch_size, seed, rank, world, cfg.num_workers, device),
        eval=TorchEvalSource(evaluation, cfg.name, cfg.eval_batch_size, rank, world, cfg.num_workers, device),
        num_classes=num_classes_of(train_base),
        train_size=len(train),
        sources=sources,
        eval_size=len(evaluation),
    )


def _check_batch(cfg: DataConfig, train_size: int, world: int) -> None:
    if train_size < cfg.batch_size * world:
        raise UserError(f"data.batch_size: {cfg.batch_size} x {world} processes exceeds the "
                        f"{train_size} training images")


def _device_data(cfg: DataConfig, seed: int, rank: int, world: int, device: torch.device, train_base: Any,
                 eval_base: Any, train_split: str, eval_split: str) -> DataBundle | None:
    """The device-resident path, or None (``auto``, when the splits do not fit: the torch path)."""
    from nt_dist.data import array_cache, device_loader

    # sizes first: the cache keys digest every source file, work wasted on a split that does not fit
    need = array_cache.array_bytes(len(train_base) + len(eval_base), cfg.image_size)
    free = device_loader.free_bytes(device)
    share = device_loader.AUTO_SHARE if cfg.loader == "auto" else device_loader.DEVICE_SHARE
    if need > share * free:
        problem = (f"{cfg.name} decoded at {cfg.image_size} px takes {need / 2**30:.2f} GiB "
                   f"({len(train_base):,} + {len(eval_base):,} images), more than {share:.0%} of the "
                   f"{free / 2**30:.2f} GiB free on {device}")
        if cfg.loader == "device":
            raise UserError(f"data.loader: device: {problem}; use data.loader: torch (reads the files as it "
                            "goes, any size) or ffcv (write the .beton files first: nt-dist data write-ffcv)")
        if rank == 0:
            say(f"nt-dist: note: data.loader: auto: {problem}; using the torch loader")
        return None
    train_size = min(cfg.train_subset, len(train_base)) if cfg.train_subset else len(train_base)
    _check_batch(cfg, train_size, world)
    entries = device_loader.entries(cfg, train_base, eval_base, train_split, eval_split)
    train, evaluation = device_loader.build_device_data(cfg, seed, rank, world, device, train_base, eval_base,
                                                        *entries)
    return DataBundle(train=train, eval=evaluation, num_classes=num_classes_of(train_base), train_size=train_size,
                      sources=(train_base, eval_base), eval_size=len(eval_base))


class _Subset:
    """The first ``n`` samples (keeps ``classes``)."""

    def __init__(self, base: Any, n: int) -> None:
        self.base, self.n, self.classes = base, min(n, len(base)), base.classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        return self.base[index]
