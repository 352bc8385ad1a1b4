"""Small data sets written in the exact layouts their distribution archives unpack to.

For tests and benchmarks, where nothing can be downloaded: CIFAR-10/100 python pickles,
Tiny-ImageNet-200 folders and annotations, ImageNet-style class folders, and real pixels
(scikit-learn's digits) to fill them with. Every writer returns what a reader should find, so
tests compare against it rather than against a second reader.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CIFAR10_NAMES", "digit_images", "random_images", "write_cifar10", "write_cifar100", "write_imagefolder",
           "write_tinyimagenet"]

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
