"""What the code knows about each data set and each loader, in one place.

:data:`DATASETS` maps a ``data.name`` to its :class:`DatasetSpec`: its training and evaluation
split, class count, normalisation statistics, whether it is read from ``data.root``, and how
to build it. :data:`LOADERS` maps a ``data.loader`` to its :class:`LoaderSpec`: the
``data.augment`` modes it implements, whether it supports fixed augmented views and the
frozen-logit cache, and how to build it. The recipe check (:mod:`nt_dist.config`), the loaders,
the normalisation, the audit and the plots all read these two tables; a new data set or loader
is one entry here.

The recipe check must stay light, so this module imports neither torch nor the config: each
builder imports its module when it is called (the data set modules pull in torchvision).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, get_args

from nt_dist.errors import UserError, warn

if TYPE_CHECKING:
    import torch

    from nt_dist.config import DataConfig
    from nt_dist.data import DataBundle

# the data.augment modes, as nt_dist.data.transforms.build_transform documents them
AugmentMode = Literal["none", "shift", "pad_crop_flip", "rotate_flip", "rrc_flip"]
AUGMENTS: tuple[str, ...] = get_args(AugmentMode)
# the data.loader names: the keys of LOADERS (checked below)
LoaderName = Literal["auto", "device", "torch", "ffcv"]


# ============================================================================ data sets


@dataclass(frozen=True)
class DatasetSpec:
    """One data set in its original distribution layout."""

    name: str
    train_split: str
    eval_split: str
    num_classes: int | None  # None: read from the data (an image folder: the class folders of train/)
    mean: tuple[float, ...]  # per channel, on 0..1 pixels
    std: tuple[float, ...]
    needs_root: bool  # read from data.root (digits ships inside scikit-learn)
    builder: Callable[[str, str], Any]  # (root, split) -> map-style dataset of (PIL image, int label)
    # images of every size, random-resized crops cut from the files (ImageNet): not for the device loader,
    # which holds each image resized to one square size
    full_resolution: bool = False

    @property
    def splits(self) -> tuple[str, str]:
        return self.train_split, self.eval_split

    def build(self, root: str, split: str) -> Any:
        """Split ``split`` read from ``root``: a map-style dataset of ``(PIL image, int label)``
        with ``classes`` and ``targets``, no augmentation."""
        if split not in self.splits:
            raise UserError(f"data set {self.name!r} has splits {' and '.join(self.splits)}, not {split!r}")
        return self.builder(root, split)


def _digits(root: str, split: str) -> Any:
    from nt_dist.data.digits import DigitsDataset

    return DigitsDataset(split)


def _cifar(root: str, split: str, num_classes: int) -> Any:
    from nt_dist.data.cifar import CifarDataset

    return CifarDataset(root, split, num_classes=num_classes)


def _tinyimagenet(root: str, split: str) -> Any:
    from nt_dist.data.folders import TinyImageNetDataset

    return TinyImageNetDataset(root, split)


def _imagefolder(root: str, split: str) -> Any:
    from nt_dist.data.folders import ImageFolderDataset

    return ImageFolderDataset(root, split)


def _imagenet(root: str, split: str) -> Any:
    from nt_dist.data.imagenet import ImageNetDataset

    return ImageNetDataset(root, split)


def _imagenet64(root: str, split: str) -> Any:
    from nt_dist.data.imagenet64 import ImageNet64Dataset

    return ImageNet64Dataset(root, split)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # per channel, on 0..1 pixels

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("digits", "train", "test", 10, (0.3054,) * 3, (0.3187,) * 3, needs_root=False, builder=_digits),
    DatasetSpec("cifar10", "train", "test", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                needs_root=True, builder=partial(_cifar, num_classes=10)),
    DatasetSpec("cifar100", "train", "test", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                needs_root=True, builder=partial(_cifar, num_classes=100)),
    DatasetSpec("tinyimagenet", "train", "val", 200, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821),
                needs_root=True, builder=_tinyimagenet),
    # ImageNet's statistics: any ImageNet-style folder
    DatasetSpec("imagefolder", "train", "val", None, IMAGENET_MEAN, IMAGENET_STD, needs_root=True,
                builder=_imagefolder),
    # ILSVRC-2012: the class count is that of the class folders of train/ (1000; fewer in a fixture)
    DatasetSpec("imagenet", "train", "val", None, IMAGENET_MEAN, IMAGENET_STD, needs_root=True, builder=_imagenet,
                full_resolution=True),
    # downsampled ImageNet 64x64: labels 1..1000 in the files; ImageNet's statistics (none computed at run time)
    DatasetSpec("imagenet64", "train", "val", 1000, IMAGENET_MEAN, IMAGENET_STD, needs_root=True,
                builder=_imagenet64),
)}


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of data set ``name``; an unknown name is a one-line UserError listing the known ones."""
    spec = DATASETS.get(name)
    if spec is None:
        raise UserError(unknown_dataset(name))
    return spec


def full_resolution_problem(name: str, image_size: int) -> str:
    """Why the device loader does not serve a ``full_resolution`` data set with random-resized crops."""
    return (f"{name}'s random-resized crops are cut from its full-resolution files, and the device loader "
            f"holds every image resized to one square size ({image_size} px)")


def unknown_dataset(name: str) -> str:
    """The line that refuses data set ``name``, naming the registered ones."""
    return f"data.name: unknown data set {name!r}; expected one of: {', '.join(DATASETS)}"


# ============================================================================ loaders


Builder = Callable[["DataConfig", int, int, int, "torch.device"], "DataBundle"]


@dataclass(frozen=True)
class LoaderSpec:
    """One input path, and what it can do: the recipe check refuses what a loader does not declare."""

    name: str
    augments: tuple[str, ...]  # the data.augment modes it implements
    # data.augment_views: each sample's augmentation is drawn from its own seed, so view e mod K repeats
    augment_views: bool
    # nasty/distill.cache_logits: its TrainSource.batch_indices names each batch's samples
    logit_cache: bool
    reads_root: bool  # reads the data set from data.root (ffcv: the .beton files of data.ffcv_dir)
    rng: str  # what its augmentations draw from (named where data.augment_views is refused)
    builder: Builder  # (cfg, seed, rank, world, device) -> DataBundle of this rank


def _device_or_torch(cfg: DataConfig, seed: int, rank: int, world: int, device: torch.device) -> DataBundle:
    from nt_dist.data.device_loader import build_device_data

    return build_device_data(cfg, seed, rank, world, device)


def _torch(cfg: DataConfig, seed: int, rank: int, world: int, device: torch.device) -> DataBundle:
    from nt_dist.data.torch_loader import build_torch_data

    return build_torch_data(cfg, seed, rank, world, device)


def _ffcv(cfg: DataConfig, seed: int, rank: int, world: int, device: torch.device) -> DataBundle:
    try:
        from nt_dist.data.ffcv_loader import build_ffcv_data
    except ImportError as exc:
        warn(f"ffcv is not importable ({exc}); using the torchvision loader")
        return _torch(cfg, seed, rank, world, device)
    return build_ffcv_data(cfg, seed, rank, world, device)


_SEEDED = "a generator seeded per (seed, epoch, sample)"
LOADERS: dict[str, LoaderSpec] = {spec.name: spec for spec in (
    # device where the decoded splits fit in half the free memory, else torch (both implement the same)
    LoaderSpec("auto", AUGMENTS, augment_views=True, logit_cache=True, reads_root=True, rng=_SEEDED,
               builder=_device_or_torch),
    LoaderSpec("device", AUGMENTS, augment_views=True, logit_cache=True, reads_root=True, rng=_SEEDED,
               builder=_device_or_torch),
    LoaderSpec("torch", AUGMENTS, augment_views=True, logit_cache=True, reads_root=True, rng=_SEEDED,
               builder=_torch),
    # ffcv's pipelines have no rotation; its order is drawn inside ffcv, its augmentations from numba's RNG
    LoaderSpec("ffcv", ("none", "shift", "pad_crop_flip", "rrc_flip"), augment_views=False, logit_cache=False,
               reads_root=False, rng="a global RNG", builder=_ffcv),
)}
if tuple(LOADERS) != get_args(LoaderName):  # the recipe's type and the table name the same loaders
    raise RuntimeError(f"LoaderName {get_args(LoaderName)} and LOADERS {tuple(LOADERS)} disagree")


def loader_spec(name: str) -> LoaderSpec:
    """The spec of loader ``name`` (a recipe's ``data.loader`` is one, by its type)."""
    spec = LOADERS.get(name)
    if spec is None:
        raise UserError(f"data.loader: unknown loader {name!r}; expected one of: {', '.join(LOADERS)}")
    return spec


def loaders_with(capability: str) -> str:
    """The loaders whose spec has ``capability`` (a boolean field) true, as a recipe error names
    them: ``"auto, device or torch"``."""
    names = [name for name, spec in LOADERS.items() if getattr(spec, capability)]
    return " or ".join(filter(None, (", ".join(names[:-1]), names[-1])))
