"""Image-file data sets: Tiny-ImageNet-200 as its archive unpacks, and ImageNet-style folders.

Tiny-ImageNet-200 (``data.root`` is the unpacked ``tiny-imagenet-200/``)::

    wnids.txt                       the 200 class ids, one a line
    train/<wnid>/images/*.JPEG      500 training images per class
    val/images/*.JPEG               10,000 validation images, all in one folder ...
    val/val_annotations.txt         ... labelled here: file <TAB> wnid <TAB> x0 y0 x1 y1

A class's index is the position of its wnid in sorted order, for both splits, so training
labels and validation labels agree whatever order the annotation file lists. ImageNet-style
folders are ``root/{train,val}/<class>/<image>``, classes sorted as torchvision's ImageFolder
sorts them, taken from ``train/`` for both splits.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from nt_dist.errors import UserError

TINY_IMAGENET = ("the Tiny-ImageNet-200 archive as distributed, unpacked: data.root holds "
                 "wnids.txt, train/ and val/")


def load_rgb(path: str) -> Image.Image:
    """The image at ``path`` as RGB (grayscale JPEGs occur in Tiny-ImageNet); a file PIL cannot
    read is a UserError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except _UNREADABLE as exc:
        raise UserError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None


# what PIL raises for a file it cannot read (SyntaxError: some plugins on a malformed header)
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


DECODE_ALL_UP_TO = 20_000  # files in a split that are decoded in full before the first step
HEADERS_UP_TO = 200_000  # files in a split whose headers are read before the first step


def check_images(paths: list[str], decode: bool) -> None:
    """Open each file (``decode``: and decode it, as :func:`load_rgb` would); the first bad file
    is a UserError naming it."""
    for path in paths:
        if decode:
            load_rgb(path)
            continue
        try:
            with Image.open(path):
                pass
        except _UNREADABLE as exc:
            raise UserError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None


class _FileDataset:
    """Map-style ``(PIL RGB image, int label)`` over a list of ``(path, label)`` samples."""

    def __init__(self, classes: list[str], samples: list[tuple[str, int]]) -> None:
        self.classes, self.samples = classes, samples
        self.targets: list[int] = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_rgb(path), label

    def check(self, rank: int = 0, world: int = 1) -> None:
        """Find unreadable files before training, where that is cheap; each process checks its
        share. A split of up to 20k files (Tiny-ImageNet's validation split: ~1 s) is decoded in
        full; of up to 200k files (Tiny-ImageNet's training split, ~35 us a file) only the headers
        are read; larger splits are checked as they are read."""
        if len(self.samples) <= HEADERS_UP_TO:
            check_images([path for path, _ in self.samples[rank::world]], decode=len(self.samples) <= DECODE_ALL_UP_TO)


class TinyImageNetDataset(_FileDataset):
    """Tiny-ImageNet-200; ``split`` is train or val (the test split has no labels)."""

    def __init__(self, root: str, split: str) -> None:
        base = Path(root)
        wnids = sorted(line.strip() for line in _read_lines(base / "wnids.txt") if line.strip())
        if not wnids:
            raise UserError(f"data.root: {base / 'wnids.txt'} lists no class (expected {TINY_IMAGENET})")
        index = {wnid: i for i, wnid in enumerate(wnids)}
        super().__init__(wnids, _train_samples(base, index) if split == "train" else _val_samples(base, index))


class ImageFolderDataset(_FileDataset):
    """ImageNet-style ``root/<split>/<class>/<image>``. Classes are the sorted class folders of
    ``train/`` for both splits, so a validation folder lacking a class keeps the same labels."""

    def __init__(self, root: str, split: str) -> None:
        folders = {name: Path(root) / name for name in ("train", split)}
        for folder in folders.values():
            if not folder.is_dir():
                raise UserError(f"data.root: {folder} not found (expected one folder per class "
                                f"under {folder.name}/, ImageNet-style)")
        try:
            classes, class_to_idx = find_classes(str(folders["train"]))
            _, split_classes = find_classes(str(folders[split]))
            unknown = sorted(set(split_classes) - set(classes))
            if unknown:
                raise UserError(f"data.root: {folders[split] / unknown[0]} is a class that train/ does not have")
            samples = make_dataset(str(folders[split]), class_to_idx, IMG_EXTENSIONS, allow_empty=split != "train")
        except FileNotFoundError as exc:  # no class folders, or a training class with no images
            raise UserError(f"data.root: {folders[split]}: {exc}") from None
        super().__init__(classes, samples)


def _train_samples(base: Path, index: dict[str, int]) -> list[tuple[str, int]]:
    samples = []
    for wnid, label in index.items():
        folder = base / "train" / wnid / "images"
        files = sorted(folder.glob("*.JPEG")) if folder.is_dir() else []
        if not files:
            raise UserError(f"data.root: {folder} not found or holds no .JPEG (expected {TINY_IMAGENET})")
        samples += [(str(path), label) for path in files]
    return samples


def _val_samples(base: Path, index: dict[str, int]) -> list[tuple[str, int]]:
    annotations = base / "val" / "val_annotations.txt"
    images = base / "val" / "images"
    lines = _read_lines(annotations)
    present = {path.name for path in images.iterdir()} if images.is_dir() else set()
    samples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in index:
            raise UserError(f"data.root: {annotations}, line {number}: expected "
                            f"'file<TAB>wnid<TAB>bbox' with a wnid listed in wnids.txt")
        name, wnid = fields[0].strip(), fields[1].strip()
        if name not in present:
            raise UserError(f"data.root: {images / name} not found (listed in {annotations}; "
                            f"expected {TINY_IMAGENET})")
        samples.append((str(images / name), index[wnid]))
    return sorted(samples)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"data.root: {path} not found (expected {TINY_IMAGENET})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"data.root: {path}: unreadable ({type(exc).__name__})") from None
