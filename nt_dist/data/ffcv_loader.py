"""The FFCV input path: ``.beton`` files decoded and augmented by ffcv's JIT-compiled pipelines.

Training: ffcv's RANDOM order, seeded with the run's seed (epoch *e* is the permutation
``seed + e``, so a resumed run sees the same order), ``distributed`` across ranks as
torch's DistributedSampler does, incomplete batches dropped. ``epoch(e, start_step=s)``
starts at batch *s* without reading the batches before it.

Evaluation: sequential, last batch kept, rank *r* of *W* reads samples ``r, r+W, r+2W, ...``.
ffcv's own ``distributed=True`` pads each rank's share with repeated samples (it is torch's
DistributedSampler with ``drop_last=False``), which would count some test images twice.

Pixels leave the pipeline as uint8 NCHW (channels-last memory) on the target device and are
normalised there with torch; ffcv's ``NormalizeImage`` needs cupy on GPU. ffcv reuses its
output buffers, so what we yield is always a fresh tensor.

ffcv's augmentations draw from numba's global RNG: unlike the torchvision path they are not
reproducible per sample, and 2 x B/2 processes do not see the same batches as 1 x B.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from ffcv.fields.decoders import (
    CenterCropRGBImageDecoder,
    IntDecoder,
    RandomResizedCropRGBImageDecoder,
)
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.compiler import Compiler
from ffcv.transforms import (
    RandomHorizontalFlip,
    RandomTranslate,
    ToDevice,
    ToTensor,
    ToTorchImage,
)

from nt_dist.data import LOADERS, DataBundle, check_batch, dataset_spec
from nt_dist.data.ffcv_io import COMMAND, IMAGE, LABEL, SUMMARY, check_beton
from nt_dist.data.resolution import ResolutionSchedule
from nt_dist.data.resolution import eval_size as eval_size_of
from nt_dist.data.transforms import normalisation
from nt_dist.errors import UserError

if TYPE_CHECKING:
    from nt_dist.config import DataConfig

Batch = tuple[torch.Tensor, torch.Tensor]

AUGMENTS = LOADERS["ffcv"].augments  # those with an ffcv pipeline below
PADDING = {"shift": 2, "pad_crop_flip": 4}  # pixels of zero-filled translation


def build_ffcv_data(cfg: DataConfig, seed: int, rank: int, world: int, device: torch.device) -> DataBundle:
    """Training and evaluation sources for rank ``rank`` of ``world`` from ``cfg.ffcv_dir``."""
    if not cfg.ffcv_dir:
        raise UserError(f"data.ffcv_dir: required when data.loader is ffcv (write the files with {COMMAND})")
    if cfg.augment not in AUGMENTS:
        raise UserError(f"data.augment: {cfg.augment!r} has no FFCV pipeline; with data.loader: ffcv use one of "
                        f"{', '.join(AUGMENTS)}, or set data.loader: torch")
    if world > 1 and not (dist.is_initialized() and dist.get_world_size() == world and dist.get_rank() == rank):
        raise RuntimeError(f"build_ffcv_data(rank={rank}, world={world}) needs the matching "
                           "torch.distributed process group initialised first")
    train_split, eval_split = dataset_spec(cfg.name).splits
    summary = _read_summary(cfg)
    train_path, eval_path = (_beton(cfg, split) for split in (train_split, eval_split))
    train_size = check_beton(train_path)
    eval_size = check_beton(eval_path)
    if cfg.train_subset:
        train_size = min(train_size, cfg.train_subset)
    check_batch(cfg, train_size, world)
    finish = _Finish(cfg.name, device)
    threads = cfg.num_workers or -1  # ffcv decodes in threads; -1: one per core
    schedule = ResolutionSchedule.of(cfg)
    train_pipelines = _pipelines(cfg, device, train=True, size_px=schedule.at(0))
    decoder = train_pipelines[IMAGE][0]  # before the Loader takes the pipelines (it takes the decoder out)
    train = Loader(str(train_path), batch_size=cfg.batch_size, num_workers=threads,
                   order=OrderOption.RANDOM, seed=seed, distributed=world > 1, drop_last=True,
                   indices=np.arange(train_size) if cfg.train_subset else None,
                   pipelines=train_pipelines)
    evaluation = Loader(str(eval_path), batch_size=cfg.eval_batch_size, num_workers=threads,
                        order=OrderOption.SEQUENTIAL, drop_last=False, indices=np.arange(rank, eval_size, world),
                        pipelines=_pipelines(cfg, device, train=False, size_px=eval_size_of(cfg)))
    return DataBundle(train=FfcvTrainSource(train, finish, decoder, schedule),
                      eval=FfcvEvalSource(evaluation, eval_size, finish),
                      num_classes=int(summary["num_classes"]), train_size=train_size,
                      sources=(train_path, eval_path), eval_size=eval_size)


class FfcvTrainSource:
    """``TrainSource`` over an ffcv Loader (RANDOM order, drop_last). With progressive resizing
    the image decoder's output size is set to the epoch's resolution before the epoch, and the
    pipeline compiled again when it changed (as ffcv-imagenet sets ``decoder.output_size``; ffcv
    sizes its buffers and code from the decoder when it generates the code)."""

    def __init__(self, loader: Loader, finish: _Finish, decoder: Any, schedule: ResolutionSchedule) -> None:
        self.loader, self.finish, self.decoder, self.schedule = loader, finish, decoder, schedule
        self.steps_per_epoch: int = len(loader)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        size = (self.schedule.at(epoch),) * 2
        if tuple(self.decoder.output_size) != size:
            self.decoder.output_size = size
            self.loader.generate_code()
        yield from _iterate(self.loader, epoch, start_step, self.finish)

    def batch_indices(self, epoch: int, start_step: int = 0) -> list[list[int]]:
        raise NotImplementedError("the ffcv loader has no per-sample indices (LoaderSpec.logit_cache is false: "
                                  "the recipe check refuses nasty/distill.cache_logits with data.loader: ffcv)")


class FfcvEvalSource:
    """``EvalSource``: this rank's unpadded shard, in order; ``len`` counts all ranks' samples."""

    def __init__(self, loader: Loader, total: int, finish: _Finish) -> None:
        self.loader, self.total, self.finish = loader, total, finish

    def __len__(self) -> int:
        return self.total

    def batches(self) -> Iterator[Batch]:
        yield from _iterate(self.loader, 0, 0, self.finish)


class _Finish:
    """uint8 NCHW images -> normalised float32 (a new tensor); labels -> 1-D int64 copy.

    ``(x / 255 - mean) / std`` as one fused pass, ``x * scale + shift``: on a 2-core CPU a
    separate convert, subtract and divide cost up to a third of the throughput.
    """

    def __init__(self, dataset: str, device: torch.device) -> None:
        mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in normalisation(dataset))
        self.scale, self.shift = 1 / (255 * std), -mean / std

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        return torch.addcmul(self.shift, images, self.scale), labels.reshape(-1).clone()


def _iterate(loader: Loader, epoch: int, start_step: int, finish: _Finish) -> Iterator[Batch]:
    """ffcv's ``Loader.__iter__`` for a chosen epoch, from batch ``start_step`` on (the batches
    before it are never read); the background thread stops if the consumer stops early."""
    Compiler.set_num_threads(loader.num_workers)
    loader.next_epoch = epoch  # the traversal order is a function of (seed, next_epoch)
    order = loader.next_traversal_order()[:len(loader) * loader.batch_size]
    batches = EpochIterator(loader, order[start_step * loader.batch_size:])
    try:
        for images, labels in batches:
            yield finish(images, labels)
    finally:
        batches.close()


def _pipelines(cfg: DataConfig, device: torch.device, train: bool, size_px: int) -> dict[str, list[Any]]:
    """The image and label pipelines; the image decoder is always the first operation."""
    size = (size_px, size_px)
    image: list[Any]
    if cfg.augment == "rrc_flip":
        image = ([RandomResizedCropRGBImageDecoder(size), RandomHorizontalFlip()] if train
                 else [CenterCropRGBImageDecoder(size, ratio=cfg.eval_crop_ratio)])
    else:
        # The whole (square) image resized to image_size: a plain copy at its stored size.
        image = [CenterCropRGBImageDecoder(size, ratio=1.0)]
        if train and cfg.augment in PADDING:
            image.append(RandomTranslate(padding=PADDING[cfg.augment]))
        if train and cfg.augment == "pad_crop_flip":
            image.append(RandomHorizontalFlip())
    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    return {IMAGE: image + [ToTensor(), *to_device, ToTorchImage(channels_last=True)],
            LABEL: [IntDecoder(), ToTensor(), *to_device]}


def _beton(cfg: DataConfig, split: str) -> Path:
    path = Path(cfg.ffcv_dir) / f"{split}.beton"
    if not path.is_file():
        raise UserError(f"data.ffcv_dir: {path} not found; write it with: {_write_command(cfg)}")
    return path


def _read_summary(cfg: DataConfig) -> dict[str, Any]:
    path = Path(cfg.ffcv_dir) / SUMMARY
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"data.ffcv_dir: {path} not found; write it with: {_write_command(cfg)}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"data.ffcv_dir: {path}: unreadable ({type(exc).__name__}); rewrite it with: "
                        f"{_write_command(cfg)}") from None
    if summary.get("dataset") != cfg.name:
        raise UserError(f"data.ffcv_dir: {path} holds data set {summary.get('dataset')!r}, "
                        f"but data.name is {cfg.name!r}")
    return summary


def _write_command(cfg: DataConfig) -> str:
    root = f" --root {cfg.root}" if cfg.root else ""
    return f"{COMMAND} --dataset {cfg.name}{root} --out {cfg.ffcv_dir}"
