"""Data sets in their original distribution layouts, and the input paths that feed them.

``build_dataset(name, root, split)`` gives a map-style dataset of ``(PIL image, int label)``
with no augmentation; ``build_data(cfg, ...)`` gives the training and evaluation sources the
training loop iterates: held whole on the training device (``data.loader: device``; ``auto``
picks it where the decoded splits fit), through FFCV (``ffcv``) or torchvision + DataLoader
(``torch``). What each data set and each loader is lives in one table each,
:data:`~nt_dist.data.specs.DATASETS` and :data:`~nt_dist.data.specs.LOADERS`.

Importing this package is light (no torch): the recipe check reads the tables; the loaders
import their modules when they build.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from nt_dist.data.specs import (
    AUGMENTS,
    DATASETS,
    LOADERS,
    DatasetSpec,
    LoaderSpec,
    dataset_spec,
    loader_spec,
    loaders_with,
)
from nt_dist.errors import UserError

if TYPE_CHECKING:
    import torch

    from nt_dist.config import DataConfig

    Batch = tuple[torch.Tensor, torch.Tensor]

__all__ = ["AUGMENTS", "DATASETS", "LOADERS", "DataBundle", "DataInput", "DatasetSpec", "EvalSource", "LoaderSpec",
           "TrainSource", "build_data", "build_dataset", "build_splits", "check_batch", "data_inputs", "dataset_spec",
           "loader_spec", "loaders_with", "num_classes_of"]


class TrainSource(Protocol):
    """This process's training batches: everything the training loop calls.

    ``epoch(e, start_step=s)`` yields ``(images, labels)`` (normalised float32 NCHW and int64, on
    the training device) for steps ``s .. steps_per_epoch - 1`` of epoch ``e``, without reading
    the batches before ``s``: a resumed run continues where it stopped.

    ``batch_indices(e, start_step=s)`` lists the sample indices of each batch ``epoch(e, s)``
    yields, in the same order: what the frozen-logit cache (``nasty.cache_logits``,
    ``distill.cache_logits``) keys by. A loader without per-sample indices (ffcv: its order is
    drawn inside ffcv) declares ``logit_cache=False`` in its :class:`LoaderSpec`, so the recipe
    check refuses the cache with it, and raises ``NotImplementedError`` here.
    """

    steps_per_epoch: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...

    def batch_indices(self, epoch: int, start_step: int = 0) -> list[list[int]]: ...


class EvalSource(Protocol):
    """This process's share of the evaluation split: ``batches()`` yields ``(images, labels)`` as
    :class:`TrainSource` does, from a disjoint, unpadded shard (every sample on exactly one
    process); ``len`` counts the samples of all processes together."""

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
    splits = dataset_spec(cfg.name).splits
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
    return dataset_spec(name).build(root, split)


def build_splits(cfg: DataConfig) -> tuple[Any, Any]:
    """The training and evaluation split of ``cfg.name``, read from ``cfg.root``."""
    spec = dataset_spec(cfg.name)
    return spec.build(cfg.root, spec.train_split), spec.build(cfg.root, spec.eval_split)


def num_classes_of(dataset: Any) -> int:
    return len(dataset.classes)


def build_data(cfg: DataConfig, seed: int, rank: int, world: int, device: torch.device) -> DataBundle:
    """Training and evaluation sources for this process (rank ``rank`` of ``world``), from the
    builder of loader ``cfg.loader``."""
    return loader_spec(cfg.loader).builder(cfg, seed, rank, world, device)


def check_batch(cfg: DataConfig, train_size: int, world: int) -> None:
    """Every process gets at least one full batch per epoch (the incomplete tail is dropped)."""
    if train_size < cfg.batch_size * world:
        raise UserError(f"data.batch_size: {cfg.batch_size} x {world} processes exceeds the "
                        f"{train_size} training images")


def usable_workers(requested: int) -> int:
    """``data.num_workers``, capped at this process's share of the cores it may run on (a recipe
    written for an 8-GPU node asks for 8 workers per process; on a 2-core laptop that is 16
    processes fighting for 2 cores, and torch warns about it on every loader)."""
    import os

    if requested <= 0:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(requested, cores // local))
