"""The device-resident input path (``data.loader: device``, and ``auto`` where it fits).

Each split is decoded once into a uint8 array (:mod:`nt_dist.data.array_cache`), held whole on
the training device (GPU memory; on a CPU, a memory map shared by the processes of a machine),
and every batch is gathered, augmented (:mod:`nt_dist.data.device_aug`) and normalised there.
No worker processes, no host-to-device copy per step.

What the torch loader guarantees, this one keeps: the global batch of step *s* is the same
samples whatever the process count (the same permutation and slicing,
:func:`~nt_dist.data.torch_loader.rank_batch`); each sample's augmentation is a function of
(seed, epoch, index) (epoch mod ``augment_views`` with fixed views); ranks read disjoint
shards; evaluation images are the torch loader's, pixel for pixel (the same transform, run
once). Training pixels differ from the torch loader's (another RNG, batch-wise warps), with the
same distribution of shifts, angles, crops and flips.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torchvision.transforms.v2 as T
from torch import Tensor

from nt_dist.data import DataBundle, array_cache, build_splits, check_batch, dataset_spec, num_classes_of
from nt_dist.data.device_aug import augment
from nt_dist.data.resolution import ResolutionSchedule, eval_size
from nt_dist.data.specs import full_resolution_problem
from nt_dist.data.torch_loader import RankSource, build_torch_data, epoch_permutation, eval_shard, rank_batch
from nt_dist.data.transforms import EVAL_CROP_RATIO, build_transform
from nt_dist.errors import UserError, say

if TYPE_CHECKING:
    from nt_dist.config import DataConfig

Batch = tuple[Tensor, Tensor]
AUTO_SHARE = 0.5  # loader: auto picks the device path when the splits take at most this share
DEVICE_SHARE = 0.9  # loader: device refuses splits larger than this share of free memory


@dataclass
class DeviceTrainSource(RankSource):
    """:class:`~nt_dist.data.TrainSource`: the whole split on the device, augmented batch-wise there."""

    images: Tensor  # uint8 [N, 3, S, S], whole training split (train_subset: the first N)
    labels: Tensor  # int64 [N] on the device
    augment: str
    seed: int
    views: int
    schedule: ResolutionSchedule  # the side of each epoch's crops (rrc_flip; else the cached size)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.labels) // (self.batch_size * self.world)

    def _order(self, epoch: int) -> Tensor:
        return epoch_permutation(len(self.labels), self.seed, epoch)

    def batch_indices(self, epoch: int, start_step: int = 0) -> list[list[int]]:
        order = self._order(epoch)
        return [rank_batch(order, s, self.batch_size, self.rank, self.world).tolist()
                for s in range(start_step, self.steps_per_epoch)]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        order = self._order(epoch).to(self.device)
        view = epoch % self.views if self.views else epoch
        size = self.schedule.at(epoch)
        for step in range(start_step, self.steps_per_epoch):
            index = rank_batch(order, step, self.batch_size, self.rank, self.world)
            images = augment(_gather(self.images, index), self.augment, self.seed, view, index, size)
            yield self.normalise(images), self.labels[index]


@dataclass
class DeviceEvalSource(RankSource):
    """:class:`~nt_dist.data.EvalSource`: the whole split on the device, as the torch loader's
    evaluation transform made it."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self) -> Iterator[Batch]:
        shard = torch.tensor(eval_shard(len(self.labels), self.rank, self.world), device=self.device)
        for start in range(0, len(shard), self.batch_size):
            index = shard[start:start + self.batch_size]
            yield self.normalise(_gather(self.images, index)), self.labels[index]


def _gather(images: Tensor, index: Tensor) -> Tensor:
    if images.device != index.device:  # memory-mapped on the host, training on another device
        return images[index.cpu()].to(index.device, non_blocking=True)
    return images.index_select(0, index)


# ------------------------------------------------------------------------------- building


def build_device_data(cfg: DataConfig, seed: int, rank: int, world: int, device: torch.device) -> DataBundle:
    """``data.loader: device``, or ``auto``: the device path where the decoded splits fit
    (:data:`AUTO_SHARE` of the free memory), else the torch path. Sizes are checked first: the
    cache keys digest every source file, work wasted on splits that do not fit."""
    if dataset_spec(cfg.name).full_resolution and cfg.augment == "rrc_flip":  # loader: auto (device: refused in the recipe)
        if rank == 0:
            say(f"nt-dist: note: data.loader: auto: {full_resolution_problem(cfg.name, cfg.image_size)}; "
                "using the torch loader")
        return build_torch_data(cfg, seed, rank, world, device)
    train_base, eval_base = build_splits(cfg)
    need = array_cache.array_bytes(len(train_base), cfg.image_size) + array_cache.array_bytes(len(eval_base),
                                                                                             eval_size(cfg))
    free = free_bytes(device)
    share = AUTO_SHARE if cfg.loader == "auto" else DEVICE_SHARE
    if need > share * free:
        problem = (f"{cfg.name} decoded at {cfg.image_size} px takes {need / 2**30:.2f} GiB "
                   f"({len(train_base):,} + {len(eval_base):,} images), more than {share:.0%} of the "
                   f"{free / 2**30:.2f} GiB free on {device}")
        if cfg.loader == "device":
            raise UserError(f"data.loader: device: {problem}; use data.loader: torch (reads the files as it "
                            "goes, any size) or ffcv (write the .beton files first: nt-dist data write-ffcv)")
        if rank == 0:
            say(f"nt-dist: note: data.loader: auto: {problem}; using the torch loader")
        return build_torch_data(cfg, seed, rank, world, device, (train_base, eval_base))
    if rank == 0 and cfg.loader == "auto":  # what the fit rule picked: on stdout, with the run's progress
        print(f"data.loader: auto: {cfg.name} decoded at {cfg.image_size} px takes "
              f"{need / 2**30:.2f} GiB, {need / max(free, 1):.0%} of the {free / 2**30:.2f} GiB free on {device} "
              f"(at most {share:.0%}); using the device loader", flush=True)
    train_size = min(cfg.train_subset, len(train_base)) if cfg.train_subset else len(train_base)
    check_batch(cfg, train_size, world)
    train, evaluation = _device_sources(cfg, seed, rank, world, device, train_base, eval_base)
    return DataBundle(train=train, eval=evaluation, num_classes=num_classes_of(train_base), train_size=train_size,
                      sources=(train_base, eval_base), eval_size=len(eval_base))


def train_transform(image_size: int) -> T.Compose:
    """What the training split is cached as: the whole image at ``image_size`` (augmentation is
    applied later, batch-wise; ``rrc_flip`` crops from this image, not from the original)."""
    return T.Compose([T.ToImage(), T.Resize((image_size, image_size), antialias=True)])


def entries(cfg: DataConfig, train_base: Any, eval_base: Any) -> tuple[array_cache.Entry, array_cache.Entry]:
    """The cache entries of both splits (not yet written)."""
    train_split, eval_split = dataset_spec(cfg.name).splits
    eval_protocol = "eval-resize"
    if cfg.augment == "rrc_flip":  # the default ratio keeps the name the cache had before the ratio was a key
        eval_protocol = "eval-rrc" if cfg.eval_crop_ratio == EVAL_CROP_RATIO else f"eval-rrc-{cfg.eval_crop_ratio!r}"
    return (array_cache.entry_for(train_base, cfg.name, cfg.root, train_split, cfg.image_size, "train-resize",
                                  cfg.cache_dir),
            array_cache.entry_for(eval_base, cfg.name, cfg.root, eval_split, eval_size(cfg), eval_protocol,
                                  cfg.cache_dir))


def free_bytes(device: torch.device) -> int:
    """Memory the splits may take: free GPU memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _device_sources(cfg: DataConfig, seed: int, rank: int, world: int, device: torch.device, train_base: Any,
                    eval_base: Any) -> tuple[DeviceTrainSource, DeviceEvalSource]:
    """Decode (once) and load both splits."""
    train_entry, eval_entry = entries(cfg, train_base, eval_base)
    array_cache.ensure(train_entry, train_base, train_transform(cfg.image_size), cfg.num_workers,
                       f"{cfg.name} training split")
    array_cache.ensure(eval_entry, eval_base, build_transform(cfg.name, cfg.augment, eval_size(cfg), train=False,
                                                              crop_ratio=cfg.eval_crop_ratio),
                       cfg.num_workers, f"{cfg.name} evaluation split")
    train_images, train_labels = array_cache.load(train_entry, device)
    if cfg.train_subset:
        train_images, train_labels = train_images[:cfg.train_subset], train_labels[:cfg.train_subset]
    eval_images, eval_labels = array_cache.load(eval_entry, device)
    train = DeviceTrainSource(cfg.name, cfg.batch_size, rank, world, device, train_images, train_labels, cfg.augment,
                              seed, cfg.augment_views, ResolutionSchedule.of(cfg))
    evaluation = DeviceEvalSource(cfg.name, cfg.eval_batch_size, rank, world, device, eval_images, eval_labels)
    return train, evaluation
