"""Data sets read from their original layouts (CIFAR pickles, Tiny-ImageNet, ImageNet folders)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest_data import assert_one_line_error

from nt_dist.config import DataConfig
from nt_dist.data import build_data, build_dataset
from nt_dist.data.synthetic import random_images, write_cifar10, write_cifar100, write_imagefolder, write_tinyimagenet
from nt_dist.errors import UserError

# Listed unsorted, as in the real wnids.txt; class index = position in sorted order.
WNIDS = ["n01641577", "n01443537", "n01629819"]
COLOURS = {"n01443537": (220, 30, 30), "n01629819": (30, 220, 30), "n01641577": (30, 30, 220)}
# Validation labels deliberately in neither wnids.txt nor sorted order.
VAL_WNIDS = ["n01629819", "n01641577", "n01443537", "n01641577", "n01629819"]


def _solid(colour: tuple[int, int, int], n: int, size: int = 16) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (n, size, size, 3)).copy()


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    write_cifar10(base / "c10")
    write_cifar100(base / "c100")
    write_tinyimagenet(base / "tiny", WNIDS, {w: _solid(COLOURS[w], 3) for w in WNIDS},
                       [(_solid(COLOURS[w], 1)[0], w) for w in VAL_WNIDS])
    images = random_images(12, 16)
    write_imagefolder(base / "folder", {"train": {"dog": images[:3], "cat": images[3:6]},
                                        "val": {"dog": images[6:9], "cat": images[9:]}})
    return {"cifar10": base / "c10", "cifar100": base / "c100", "tinyimagenet": base / "tiny",
            "imagefolder": base / "folder"}


def test_cifar10_pixels_labels_and_classes(tmp_path: Path) -> None:
    expected = write_cifar10(tmp_path)
    for split in ("train", "test"):
        dataset = build_dataset("cifar10", str(tmp_path), split)
        images, labels = expected[split]
        assert len(dataset) == len(images) and dataset.targets == labels
        for i in (0, len(dataset) - 1):
            image, label = dataset[i]
            assert image.mode == "RGB" and np.array_equal(np.asarray(image), images[i]) and label == labels[i]
    assert dataset.classes[:2] == ["airplane", "automobile"] and len(dataset.classes) == 10


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    expected = write_cifar100(tmp_path)
    dataset = build_dataset("cifar100", str(tmp_path), "train")
    assert len(dataset.classes) == 100 and dataset.targets == expected["train"][1]
    assert np.array_equal(np.asarray(dataset[5][0]), expected["train"][0][5])


def test_cifar_partial_or_damaged_root_is_one_line_error(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    base = tmp_path / "cifar-10-batches-py"
    (base / "data_batch_3").unlink()
    with pytest.raises(UserError) as info:
        build_dataset("cifar10", str(tmp_path), "train")
    assert_one_line_error(info.value, "data.root", str(base / "data_batch_3"), "CIFAR-10")
    build_dataset("cifar10", str(tmp_path), "test")  # the test split is still whole
    (base / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(UserError) as info:
        build_dataset("cifar10", str(tmp_path), "test")
    assert_one_line_error(info.value, str(base / "test_batch"))
    with pytest.raises(UserError) as info:
        build_dataset("cifar100", str(tmp_path / "nowhere"), "train")
    assert_one_line_error(info.value, str(tmp_path / "nowhere" / "cifar-100-python"))


def test_tinyimagenet_val_labels_come_from_annotations(roots: dict[str, Path]) -> None:
    train = build_dataset("tinyimagenet", str(roots["tinyimagenet"]), "train")
    val = build_dataset("tinyimagenet", str(roots["tinyimagenet"]), "val")
    assert train.classes == val.classes == sorted(WNIDS)
    assert val.targets == [sorted(WNIDS).index(w) for w in VAL_WNIDS]
    assert len(train) == 9 and train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Same colour, same label: the two splits agree on what each index means.
    colour_of = {label: np.asarray(train[i][0]).mean(axis=(0, 1)).argmax() for i, label in enumerate(train.targets)}
    for i, label in enumerate(val.targets):
        image, _ = val[i]
        assert image.mode == "RGB" and np.asarray(image).mean(axis=(0, 1)).argmax() == colour_of[label]


def test_tinyimagenet_missing_pieces_are_one_line_errors(tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    write_tinyimagenet(root, WNIDS, {w: _solid(COLOURS[w], 2) for w in WNIDS},
                       [(_solid(COLOURS[w], 1)[0], w) for w in VAL_WNIDS])
    removed_one_by_one = [("val", root / "val" / "images" / "val_3.JPEG"),
                          ("val", root / "val" / "val_annotations.txt"),
                          ("train", root / "train" / WNIDS[1] / "images"),
                          ("train", root / "wnids.txt")]
    for split, path in removed_one_by_one:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        with pytest.raises(UserError) as info:
            build_dataset("tinyimagenet", str(root), split)
        assert_one_line_error(info.value, "data.root", str(path))


def test_tinyimagenet_unknown_wnid_in_annotations(tmp_path: Path) -> None:
    write_tinyimagenet(tmp_path, WNIDS, {w: _solid(COLOURS[w], 1) for w in WNIDS},
                       [(_solid(COLOURS[WNIDS[0]], 1)[0], "n99999999")])
    with pytest.raises(UserError) as info:
        build_dataset("tinyimagenet", str(tmp_path), "val")
    assert_one_line_error(info.value, "val_annotations.txt", "line 1")


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    write_tinyimagenet(tmp_path, WNIDS, {w: _solid(COLOURS[w], 1) for w in WNIDS},
                       [(_solid(COLOURS[WNIDS[0]], 1)[0], WNIDS[0])])
    broken = tmp_path / "val" / "images" / "val_0.JPEG"
    broken.write_bytes(b"\xff\xd8 truncated")
    dataset = build_dataset("tinyimagenet", str(tmp_path), "val")
    with pytest.raises(UserError) as info:
        dataset[0]
    assert_one_line_error(info.value, str(broken), "unreadable image")


def test_imagefolder_sorted_classes_and_errors(roots: dict[str, Path], tmp_path: Path) -> None:
    train = build_dataset("imagefolder", str(roots["imagefolder"]), "train")
    assert train.classes == ["cat", "dog"] and train.targets == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(np.asarray(train[0][0]), random_images(12, 16)[3])  # cat/0.png
    images = random_images(2, 8)
    write_imagefolder(tmp_path, {"train": {"ant": images, "bee": images, "cow": images}})
    with pytest.raises(UserError) as info:
        build_dataset("imagefolder", str(tmp_path), "val")
    assert_one_line_error(info.value, "data.root", str(tmp_path / "val"))
    write_imagefolder(tmp_path, {"val": {"cow": images}})  # a validation set lacking classes ...
    val = build_dataset("imagefolder", str(tmp_path), "val")
    assert val.classes == ["ant", "bee", "cow"] and val.targets == [2, 2]  # ... keeps train's labels
    write_imagefolder(tmp_path, {"val": {"dog": images}})
    with pytest.raises(UserError) as info:
        build_dataset("imagefolder", str(tmp_path), "val")
    assert_one_line_error(info.value, str(tmp_path / "val" / "dog"))
    (tmp_path / "train" / "empty_class").mkdir()
    with pytest.raises(UserError) as info:
        build_dataset("imagefolder", str(tmp_path), "train")
    assert_one_line_error(info.value, str(tmp_path / "train"), "empty_class")


@pytest.mark.parametrize("name, size, augment, n_train, n_eval, classes", [
    ("cifar10", 32, "pad_crop_flip", 20, 6, 10),
    ("cifar100", 32, "pad_crop_flip", 20, 6, 100),
    ("tinyimagenet", 16, "rrc_flip", 9, 5, 3),
    ("imagefolder", 16, "rrc_flip", 6, 6, 2),
])
def test_build_data_torch_loader_batches(roots: dict[str, Path], name: str, size: int, augment: Any,
                                         n_train: int, n_eval: int, classes: int) -> None:
    cfg = DataConfig(name=name, root=str(roots[name]), image_size=size, batch_size=2, eval_batch_size=4,
                     augment=augment, loader="torch")
    bundle = build_data(cfg, seed=0, rank=0, world=1, device=torch.device("cpu"))
    assert bundle.num_classes == classes and bundle.train_size == n_train
    batches = list(bundle.train.epoch(0))
    assert len(batches) == bundle.train.steps_per_epoch == n_train // 2
    images, labels = batches[0]
    assert images.shape == (2, 3, size, size) and images.dtype == torch.float32
    assert labels.shape == (2,) and labels.dtype == torch.int64
    assert sum(len(labels) for _, labels in bundle.eval.batches()) == len(bundle.eval) == n_eval


def test_cifar_reader_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    target = tmp_path / "cifar-10-batches-py" / "test_batch"
    target.write_bytes(pickle.dumps({b"data": Exploit(tmp_path / "pwned"), b"labels": []}, protocol=2))
    with pytest.raises(UserError) as info:
        build_dataset("cifar10", str(tmp_path), "test")
    assert_one_line_error(info.value, str(target), "UnpicklingError")
    assert not (tmp_path / "pwned").exists()


class Exploit:
    """Unpickling this runs a shell command (that touches ``path``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.path}",))
