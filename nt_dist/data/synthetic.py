"""Small data sets written in the exact layouts their distribution archives unpack to.

For tests and benchmarks, where nothing can be downloaded: CIFAR-10/100 python pickles,
Tiny-ImageNet-200 folders and annotations, ImageNet-style class folders, ILSVRC-2012 (its
training folders, and its validation split sorted, flat with Kaggle's csv, or flat with the
devkit's ground truth and ``meta.mat``), the ImageNet 64x64 pickles, and real pixels
(scikit-learn's digits) to fill them with. Every writer returns what a reader should find, so
tests compare against it rather than against a second reader.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

__all__ = ["CIFAR10_NAMES", "WrittenImageNet", "digit_images", "random_images", "write_cifar10", "write_cifar100",
           "write_imagefolder", "write_imagenet", "write_imagenet64", "write_tinyimagenet"]

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def random_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """``n`` random uint8 RGB images, NHWC (fine for raw storage; JPEG needs smoother ones)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def digit_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 real scikit-learn digits as RGB uint8 ``size`` x ``size`` images, and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im, mode="L").resize((size, size), Image.Resampling.BILINEAR)) for im in small])
    return np.repeat(big[..., None], 3, axis=3), digits.target.astype(np.int64)


def _pickle(path: Path, tree: dict[bytes, object]) -> None:
    # Protocol 2 and bytes keys: what Python 2's cPickle archives load as with encoding="bytes".
    with path.open("wb") as handle:
        pickle.dump(tree, handle, protocol=2)


def _planes(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R plane, G plane, B plane


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """``root/cifar-10-batches-py/`` with 5 training batches of ``per_batch`` images."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits: dict[str, tuple[np.ndarray, list[int]]] = {}
    train_images, train_labels = [], []
    for i in range(1, 6):
        images = random_images(per_batch, seed=seed * 100 + i)
        labels = rng.integers(0, 10, per_batch).tolist()
        _pickle(base / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels,
                                           b"data": _planes(images),
                                           b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)]})
        train_images.append(images)
        train_labels += labels
    splits["train"] = (np.concatenate(train_images), train_labels)
    images, labels = random_images(n_test, seed=seed * 100 + 99), rng.integers(0, 10, n_test).tolist()
    _pickle(base / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": labels,
                                  b"data": _planes(images), b"filenames": [b"t.png"] * n_test})
    splits["test"] = (images, labels)
    _pickle(base / "batches.meta", {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
                                    b"label_names": [name.encode() for name in CIFAR10_NAMES]})
    return splits


def write_cifar100(root: Path, n_train: int = 20, n_test: int = 6, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """``root/cifar-100-python/`` with ``train``, ``test`` and ``meta`` (fine and coarse labels)."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, fine = random_images(n, seed=seed * 100 + n), rng.integers(0, 100, n).tolist()
        _pickle(base / split, {b"filenames": [b"x.png"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
                               b"coarse_labels": [label // 5 for label in fine], b"data": _planes(images)})
        splits[split] = (images, fine)
    _pickle(base / "meta", {b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
                            b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)]})
    return splits


def write_tinyimagenet(root: Path, wnids: Sequence[str], train: dict[str, np.ndarray],
                       val: Sequence[tuple[np.ndarray, str]], quality: int = 95) -> list[tuple[str, str]]:
    """``root/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt}``.

    ``wnids`` is written in the order given (the real file is not sorted); ``val`` in the order
    given, so labels can be made to disagree with any folder order. Returns the
    ``(val file, wnid)`` annotations.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{wnid}\n" for wnid in wnids))
    for wnid, images in train.items():
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True, exist_ok=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for j, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{wnid}_{j}.JPEG", quality=quality)
    (root / "val" / "images").mkdir(parents=True, exist_ok=True)
    annotations = []
    for j, (image, wnid) in enumerate(val):
        Image.fromarray(image).save(root / "val" / "images" / f"val_{j}.JPEG", quality=quality)
        annotations.append((f"val_{j}.JPEG", wnid))
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{name}\t{wnid}\t0\t0\t63\t63\n" for name, wnid in annotations))
    return annotations


def write_imagefolder(root: Path, split_images: dict[str, dict[str, np.ndarray]]) -> None:
    """``root/<split>/<class>/<i>.png`` (PNG: lossless, so pixels can be compared exactly)."""
    for split, classes in split_images.items():
        for name, images in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j, image in enumerate(images):
                Image.fromarray(image).save(folder / f"{j}.png")


# ------------------------------------------------------------------------------- ImageNet

# the fields of the devkit's meta.mat synsets struct, in its order (torchvision's parse_meta_mat reads by position)
SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
                 "num_train_images")
KAGGLE_TAIL = ("ILSVRC", "Data", "CLS-LOC")


@dataclass(frozen=True)
class WrittenImageNet:
    """What :func:`write_imagenet` wrote: the ``data.root`` to read and what a reader finds there."""

    root: Path  # data.root (Kaggle: <top>/ILSVRC/Data/CLS-LOC)
    classes: list[str]  # the sorted wnids: a class index is a position here
    train: list[tuple[str, int]]  # (file name, class index) in the order a reader lists them
    val: list[tuple[str, int]]
    label_file: Path | None  # the csv or the ground truth (None: val/ sorted into class folders)


def write_imagenet(root: Path, train: dict[str, np.ndarray], val: Sequence[tuple[np.ndarray, str]],
                   val_layout: Literal["sorted", "kaggle", "devkit"] = "sorted", quality: int = 95,
                   seed: int = 0) -> WrittenImageNet:
    """ILSVRC-2012 with the real file names: ``train/<wnid>/<wnid>_<n>.JPEG`` and validation image
    *k* (1-based, in the order of ``val``) as ``ILSVRC2012_val_<k, 8 digits>.JPEG``.

    ``val_layout``: ``sorted``, ``root/val/<wnid>/``; ``kaggle``, Kaggle's download:
    ``root/LOC_val_solution.csv`` (rows shuffled, as Kaggle's are; one or two boxes a row),
    ``root/LOC_synset_mapping.txt`` and ``root/ILSVRC/Data/CLS-LOC/{train,val/}``, flat;
    ``devkit``, flat ``root/val/`` and ``root/ILSVRC2012_devkit_t12/data/`` with ``meta.mat``
    and ``ILSVRC2012_validation_ground_truth.txt``. The devkit's ILSVRC2012_IDs number the
    wnids in the order of ``train`` (the real IDs are not in sorted order either), and
    ``meta.mat`` adds two synsets with children (not classes) as the real one has 860.
    """
    rng = np.random.default_rng(seed)
    base = root.joinpath(*KAGGLE_TAIL) if val_layout == "kaggle" else root
    classes = sorted(train)
    index = {wnid: i for i, wnid in enumerate(classes)}
    train_files = []
    for wnid, images in train.items():
        folder = base / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for j, image in enumerate(images):
            name = f"{wnid}_{7 * j + 5}.JPEG"  # numbered with gaps, as the real files: 5, 12, 19, ...
            Image.fromarray(image).save(folder / name, quality=quality)
            train_files.append((wnid, name))
    val_files = []
    for k, (image, wnid) in enumerate(val, start=1):
        folder = base / "val" / wnid if val_layout == "sorted" else base / "val"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"ILSVRC2012_val_{k:08d}.JPEG"
        Image.fromarray(image).save(folder / name, quality=quality)
        val_files.append((wnid, name))
    (base / "val").mkdir(parents=True, exist_ok=True)
    label_file: Path | None = None
    if val_layout == "kaggle":
        label_file = root / "LOC_val_solution.csv"
        rows = []
        for wnid, name in val_files:
            boxes = [f"{wnid} {x} {x + 3} {x + 40} {x + 50}" for x in rng.integers(0, 100, rng.integers(1, 3))]
            rows.append(f"{name.removesuffix('.JPEG')},{' '.join(boxes)} \n")
        label_file.write_text("ImageId,PredictionString\n" + "".join(rows[i] for i in rng.permutation(len(rows))))
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{wnid} class {wnid}\n" for wnid in classes))
    elif val_layout == "devkit":
        label_file = _write_devkit(root, list(train), [wnid for wnid, _ in val_files])
    # the reader's order: sorted class folders, then names (sorted layout); names (flat)
    val_order = sorted(val_files) if val_layout == "sorted" else sorted(val_files, key=lambda file: file[1])
    return WrittenImageNet(root=base, classes=classes, train=[(name, index[wnid]) for wnid, name in sorted(train_files)],
                           val=[(name, index[wnid]) for wnid, name in val_order], label_file=label_file)


def _write_devkit(root: Path, wnids: list[str], val_wnids: list[str]) -> Path:
    """``ILSVRC2012_devkit_t12/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt}``:
    ILSVRC2012_ID i + 1 is ``wnids[i]``; two parent synsets follow the leaves."""
    from scipy.io import savemat

    folder = root / "ILSVRC2012_devkit_t12" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    ids = {wnid: i for i, wnid in enumerate(wnids, start=1)}
    none = np.zeros((1, 0), dtype=np.uint16)
    rows = [(i, wnid, f"class {wnid}, synonym", f"gloss of {wnid}", 0, none, 0, 1300) for wnid, i in ids.items()]
    half = max(1, len(wnids) // 2)
    for parent, members in ((len(wnids) + 1, list(ids.values())[:half]), (len(wnids) + 2, [len(wnids) + 1])):
        rows.append((parent, f"n{90000000 + parent:08d}", f"parent {parent}", "a synset with children",
                     len(members), np.array([members], dtype=np.uint16), 1, 0))
    synsets = np.empty((len(rows), 1), dtype=[(field, object) for field in SYNSET_FIELDS])
    for i, row in enumerate(rows):
        synsets[i, 0] = tuple(value if isinstance(value, (str, np.ndarray)) else np.array(value, dtype=np.uint16)
                              for value in row)
    savemat(str(folder / "meta.mat"), {"synsets": synsets})
    ground_truth = folder / "ILSVRC2012_validation_ground_truth.txt"
    ground_truth.write_text("".join(f"{ids[wnid]}\n" for wnid in val_wnids))
    return ground_truth


def write_imagenet64(root: Path, train_batches: Sequence[tuple[np.ndarray, Sequence[int]]],
                     val: tuple[np.ndarray, Sequence[int]], nested: bool = False,
                     protocol: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The ImageNet 64x64 pickles: ``train_data_batch_<i>`` (i from 1; the real split has 10) and
    ``val_data``, flat in ``root`` or (``nested``) in ``root/Imagenet64_train/`` and
    ``root/Imagenet64_val/``. Each is a dict with text keys ``data`` (uint8 [N, 12288]: R, G, B
    planes), ``labels`` (a list of ints, 1..1000) and, in training files, ``mean`` (the mean
    training row, float64). Images are NHWC uint8 64x64. Returns each split's images and class
    indices (label - 1), as a reader should find them."""
    train_dir = root / "Imagenet64_train" if nested else root
    val_dir = root / "Imagenet64_val" if nested else root
    for folder in (train_dir, val_dir):
        folder.mkdir(parents=True, exist_ok=True)
    mean = np.concatenate([_planes(images) for images, _ in train_batches]).mean(axis=0)
    for i, (images, labels) in enumerate(train_batches, start=1):
        with (train_dir / f"train_data_batch_{i}").open("wb") as handle:
            pickle.dump({"data": _planes(images), "labels": list(map(int, labels)), "mean": mean}, handle,
                        protocol=protocol)
    with (val_dir / "val_data").open("wb") as handle:
        pickle.dump({"data": _planes(val[0]), "labels": list(map(int, val[1]))}, handle, protocol=protocol)
    return {"train": (np.concatenate([images for images, _ in train_batches]),
                      [int(label) - 1 for _, labels in train_batches for label in labels]),
            "val": (val[0], [int(label) - 1 for label in val[1]])}
