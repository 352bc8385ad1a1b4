"""Per-sample transforms (torchvision v2), seeded per (seed, epoch, sample).

Each sample's augmentation draws from its own seed, so the images a step sees depend only on
the recipe's seed, the epoch and the sample index: not on the worker count, the number of
processes, or whether the run was resumed half-way through an epoch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2 as T

from nt_dist.data.resolution import EVAL_CROP_RATIO, ResolutionSchedule
from nt_dist.data.specs import dataset_spec


def normalisation(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of data set ``dataset``, on 0..1 pixels (its :class:`~nt_dist.data.specs.DatasetSpec`);
    an unknown name is a one-line UserError."""
    spec = dataset_spec(dataset)
    return spec.mean, spec.std


def build_transform(dataset: str, augment: str, image_size: int, train: bool,
                    crop_ratio: float = EVAL_CROP_RATIO) -> Callable[[Any], torch.Tensor]:
    """PIL/uint8 image -> uint8 CHW tensor of ``image_size`` pixels (see :class:`Normalise`).

    ``augment`` (training only): ``none``; ``shift`` (±2 px translation, zero fill: digits);
    ``pad_crop_flip`` (4 px zero pad, random crop, horizontal flip: CIFAR); ``rotate_flip``
    (±20° rotation, flip: the authors' Tiny-ImageNet pipeline); ``rrc_flip``
    (random-resized-crop, flip: ImageNet). Evaluation resizes; with ``rrc_flip``, the centre
    square of ``crop_ratio`` of the shorter side resized to ``image_size`` (resize to
    size/ratio, then centre-crop: the crop ffcv's ``CenterCropRGBImageDecoder(size, ratio)`` cuts;
    0.875 = 224/256, the usual ImageNet protocol).
    """
    steps: list[Any] = [T.ToImage()]
    if train and augment == "rrc_flip":
        steps += [T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()]
    elif augment == "rrc_flip":
        steps += [T.Resize(round(image_size / crop_ratio), antialias=True), T.CenterCrop(image_size)]
    else:
        steps.append(T.Resize((image_size, image_size), antialias=True))
        if train and augment == "shift":
            steps.append(T.RandomCrop(image_size, padding=2))
        elif train and augment == "pad_crop_flip":
            steps += [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip()]
        elif train and augment == "rotate_flip":
            steps += [T.RandomRotation(20), T.RandomHorizontalFlip()]
    return T.Compose(steps)


@dataclass(frozen=True)
class TrainTransform:
    """The training transform of each epoch: :func:`build_transform` at the epoch's resolution
    (:class:`~nt_dist.data.resolution.ResolutionSchedule`), one per resolution, made on first use
    (in each DataLoader worker: the object is pickled there)."""

    dataset: str
    augment: str
    schedule: ResolutionSchedule

    def at(self, epoch: int) -> Callable[[Any], torch.Tensor]:
        return _train_transform(self.dataset, self.augment, self.schedule.at(epoch))


@functools.lru_cache(maxsize=16)
def _train_transform(dataset: str, augment: str, size: int) -> Callable[[Any], torch.Tensor]:
    return build_transform(dataset, augment, size, train=True)


class Normalise:
    """uint8 NCHW batch -> float32, scaled to 0..1 and normalised with the data set's stats.

    Done per batch on the training device rather than per sample in the loader (as in
    ffcv-imagenet): half the per-sample CPU cost, and 4x less data through worker queues.
    The statistics are made into tensors once, on the device the batches arrive on."""

    def __init__(self, dataset: str, device: torch.device) -> None:
        mean, std = normalisation(dataset)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct 63-bit seed for every (run seed, epoch, sample) triple."""
    mixed = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB)
    return mixed & 0x7FFF_FFFF_FFFF_FFFF
