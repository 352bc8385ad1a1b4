"""The torchvision/DataLoader input path: exact sharding, seeded order, O(1) mid-epoch resume.

Written here rather than taken from accelerate's ``prepare(dataloader)`` for three reasons:
accelerate pads the last evaluation batch (we want every test image counted exactly once,
by summing per-rank counts); a run resumed mid-epoch must skip batches without re-reading
them; and the global batch of step *s* must be the same samples whatever the process count,
so that 2 processes x B/2 train exactly like 1 process x B.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from nt_dist.data import DataBundle, build_splits, check_batch, num_classes_of, usable_workers
from nt_dist.data.resolution import ResolutionSchedule, eval_size
from nt_dist.data.transforms import Normalise, TrainTransform, build_transform, sample_seed

if TYPE_CHECKING:
    from nt_dist.config import DataConfig

Batch = tuple[torch.Tensor, torch.Tensor]


class SeededTransformDataset:
    """Wraps a map-style dataset; keys are ``(epoch, index)``, and each sample's transform
    draws from its own RNG seeded by (seed, epoch, index), or by (seed, epoch mod views, index)
    when ``views`` > 0 (each sample cycles through ``views`` fixed augmented views)."""

    def __init__(self, base: Any, transform: Callable[[Any], torch.Tensor] | TrainTransform, seed: int,
                 views: int = 0) -> None:
        self.base, self.transform, self.seed, self.views = base, transform, seed, views

    def __len__(self) -> int:
        return len(self.base)

    def transform_at(self, epoch: int) -> Callable[[Any], torch.Tensor]:
        """The transform of ``epoch``: a :class:`TrainTransform` follows the resolution schedule."""
        return self.transform.at(epoch) if isinstance(self.transform, TrainTransform) else self.transform

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        transform = self.transform_at(epoch)  # the resolution follows the epoch, not the view
        if self.views:
            epoch %= self.views
        image, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also reseed every CUDA device (a
            # driver call per sample, and the training process's CUDA RNG clobbered when
            # num_workers is 0); transforms draw from the CPU generator
            torch.random.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return transform(image), int(label)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training set in ``epoch`` (same on every rank)."""
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, 0x5EED))
    return torch.randperm(n, generator=generator)


def rank_batch(order: Sequence[int] | torch.Tensor, step: int, batch_size: int, rank: int, world: int) -> Any:
    """Rank *r*'s part of global batch *s*: global batch *s* is ``order[s*W*B:(s+1)*W*B]`` and
    rank *r* takes its *r*-th slice of B (both loaders slice through here)."""
    start = (step * world + rank) * batch_size
    return order[start:start + batch_size]


def train_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int,
                  start_step: int = 0) -> list[list[tuple[int, int]]]:
    """This rank's batches of ``epoch`` (:func:`rank_batch` of the epoch's permutation). The
    incomplete tail is dropped (equal steps on every rank)."""
    order = epoch_permutation(n, seed, epoch).tolist()
    return [[(epoch, i) for i in rank_batch(order, s, batch_size, rank, world)]
            for s in range(start_step, n // (batch_size * world))]


def eval_shard(n: int, rank: int, world: int) -> list[int]:
    """Disjoint, complete, unpadded: every sample on exactly one rank."""
    return list(range(rank, n, world))


@dataclass
class RankSource:
    """What every source of the torch and device loaders holds: its place among the processes
    (rank ``rank`` of ``world``), its batch size, and the data set's normalisation, made once on
    the training device the batches end on."""

    dataset_name: str
    batch_size: int
    rank: int
    world: int
    device: torch.device
    normalise: Normalise = field(init=False)

    def __post_init__(self) -> None:
        self.normalise = Normalise(self.dataset_name, self.device)


@dataclass
class TorchTrainSource(RankSource):
    """:class:`~nt_dist.data.TrainSource`: ``dataset`` transformed per sample in ``num_workers``
    DataLoader processes."""

    dataset: SeededTransformDataset
    seed: int
    num_workers: int

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // (self.batch_size * self.world)

    def _batches(self, epoch: int, start_step: int) -> list[list[tuple[int, int]]]:
        return train_batches(len(self.dataset), self.batch_size, self.seed, epoch, self.rank, self.world, start_step)

    def batch_indices(self, epoch: int, start_step: int = 0) -> list[list[int]]:
        """The sample indices of this rank's batches, in the order :meth:`epoch` yields them."""
        return [[index for _, index in batch] for batch in self._batches(epoch, start_step)]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        loader = _loader(self.dataset, self._batches(epoch, start_step), self.num_workers, self.device)
        yield from _to_device(loader, self.device, self.normalise)


@dataclass
class TorchEvalSource(RankSource):
    """:class:`~nt_dist.data.EvalSource` over ``dataset`` (its transform fixed: views of epoch 0)."""

    dataset: SeededTransformDataset
    num_workers: int

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self) -> Iterator[Batch]:
        shard = eval_shard(len(self.dataset), self.rank, self.world)
        keys = [(0, i) for i in shard]
        batches = [keys[i:i + self.batch_size] for i in range(0, len(keys), self.batch_size)]
        yield from _to_device(_loader(self.dataset, batches, self.num_workers, self.device), self.device,
                              self.normalise)


def _loader(dataset: Any, batches: Sequence[Sequence[Any]], workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batches, num_workers=usable_workers(workers),
                      pin_memory=device.type == "cuda", persistent_workers=False)


def _to_device(loader: DataLoader, device: torch.device, normalise: Normalise) -> Iterator[Batch]:
    for images, labels in loader:
        images = normalise(images.to(device, non_blocking=True))
        yield images, labels.to(device, non_blocking=True)


# ------------------------------------------------------------------------------- building


def build_torch_data(cfg: DataConfig, seed: int, rank: int, world: int, device: torch.device,
                     bases: tuple[Any, Any] | None = None) -> DataBundle:
    """``data.loader: torch``: both splits of ``cfg.name`` (``bases``: already read) transformed
    per sample in DataLoader workers, this rank's shard of each."""
    train_base, eval_base = bases or build_splits(cfg)
    for split in (train_base, eval_base):
        if hasattr(split, "check"):  # image files: find unreadable ones before the first step
            split.check(rank, world)
    sources = (train_base, eval_base)
    if cfg.train_subset:
        train_base = _Subset(train_base, cfg.train_subset)
    train = SeededTransformDataset(
        train_base, TrainTransform(cfg.name, cfg.augment, ResolutionSchedule.of(cfg)), seed, cfg.augment_views)
    evaluation = SeededTransformDataset(
        eval_base, build_transform(cfg.name, cfg.augment, eval_size(cfg), train=False, crop_ratio=cfg.eval_crop_ratio),
        seed)
    check_batch(cfg, len(train), world)
    return DataBundle(
        train=TorchTrainSource(cfg.name, cfg.batch_size, rank, world, device, train, seed, cfg.num_workers),
        eval=TorchEvalSource(cfg.name, cfg.eval_batch_size, rank, world, device, evaluation, cfg.num_workers),
        num_classes=num_classes_of(train_base),
        train_size=len(train),
        sources=sources,
        eval_size=len(evaluation),
    )


class _Subset:
    """The first ``n`` samples (keeps ``classes``)."""

    def __init__(self, base: Any, n: int) -> None:
        self.base, self.n, self.classes = base, min(n, len(base)), base.classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        return self.base[index]
