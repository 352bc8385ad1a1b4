"""The data set and loader tables (nt_dist.data.specs): every reader follows them, an unknown
name is one line wherever it is met, and the recipe check's loader rules are the loaders' own
declarations."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest_data import assert_one_line_error

from nt_dist.audit import dataset_classes
from nt_dist.config import DataConfig, load_recipe
from nt_dist.data import (
    AUGMENTS,
    DATASETS,
    LOADERS,
    build_data,
    build_dataset,
    data_inputs,
    dataset_spec,
    loader_spec,
    loaders_with,
    num_classes_of,
)
from nt_dist.data.synthetic import (
    random_images,
    write_cifar10,
    write_cifar100,
    write_imagefolder,
    write_imagenet,
    write_imagenet64,
    write_tinyimagenet,
)
from nt_dist.data.transforms import Normalise, normalisation
from nt_dist.errors import UserError

CPU = torch.device("cpu")
NAMES = "digits, cifar10, cifar100, tinyimagenet, imagefolder, imagenet, imagenet64"
UNKNOWN = f"data.name: unknown data set 'mnist'; expected one of: {NAMES}"
TINY_WNIDS = [f"n{i:08d}" for i in range(200)]  # the real archive's class count


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every registered data set in its distribution layout (digits: the embedded one)."""
    base = tmp_path_factory.mktemp("registry")
    write_cifar10(base / "c10")
    write_cifar100(base / "c100")
    images = random_images(len(TINY_WNIDS) + 4, 8, seed=1)
    write_tinyimagenet(base / "tiny", TINY_WNIDS, {w: images[i:i + 1] for i, w in enumerate(TINY_WNIDS)},
                       [(images[200 + j], TINY_WNIDS[j * 7]) for j in range(4)], quality=80)
    pixels = random_images(10, 8, seed=2)
    write_imagefolder(base / "folder", {"train": {"ant": pixels[:2], "bee": pixels[2:4], "cow": pixels[4:6]},
                                        "val": {"ant": pixels[6:8], "cow": pixels[8:]}})
    wnids = ["n02119789", "n01440764", "n04592741", "n01443537"]
    inet = write_imagenet(base / "inet", {w: pixels[i:i + 2] for i, w in enumerate(wnids)},
                          [(pixels[8], wnids[0]), (pixels[9], wnids[2]), (pixels[0], wnids[3])], "devkit")
    big = random_images(12, 64, seed=3)  # one image in each of the 10 training files, 2 validation images
    write_imagenet64(base / "i64", [(big[i:i + 1], [1 + 111 * i]) for i in range(10)], (big[10:], [7, 1000]))
    return {"digits": "", "cifar10": str(base / "c10"), "cifar100": str(base / "c100"), "tinyimagenet": str(base / "tiny"),
            "imagefolder": str(base / "folder"), "imagenet": str(inet.root), "imagenet64": str(base / "i64")}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def recipe_error(path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(path, list(overrides))
    assert_one_line_error(info.value)
    return str(info.value)


# ============================================================================ data sets


def test_the_table_lists_the_data_sets_in_their_order():
    assert ", ".join(DATASETS) == NAMES
    assert all(name == spec.name for name, spec in DATASETS.items())


@pytest.mark.parametrize("name", list(DATASETS))
def test_each_spec_matches_what_its_builder_reads(roots: dict[str, str], name: str):
    """Class count and splits as declared; the training and evaluation split agree on classes."""
    spec = dataset_spec(name)
    train, evaluation = (build_dataset(name, roots[name], split) for split in spec.splits)
    expected = {"digits": (10, 1437, 360), "cifar10": (10, 20, 6), "cifar100": (100, 20, 6),
                "tinyimagenet": (200, 200, 4), "imagefolder": (3, 6, 4), "imagenet": (4, 8, 3),
                "imagenet64": (1000, 10, 2)}[name]
    assert (num_classes_of(train), len(train), len(evaluation)) == expected
    assert spec.num_classes in (None, num_classes_of(train))
    assert list(evaluation.classes) == list(train.classes)
    assert max(evaluation.targets) < num_classes_of(train)
    assert spec.needs_root == bool(roots[name])
    other = "val" if spec.eval_split == "test" else "test"
    with pytest.raises(UserError) as info:
        build_dataset(name, roots[name], other)
    assert str(info.value) == (f"data set {name!r} has splits {spec.train_split} and {spec.eval_split}, "
                               f"not {other!r}")


@pytest.mark.parametrize("name", list(DATASETS))
def test_the_audit_counts_classes_from_the_spec_or_the_folder(roots: dict[str, str], name: str):
    recipe = SimpleNamespace(model=SimpleNamespace(num_classes=0), data=SimpleNamespace(name=name, root=roots[name]))
    assert dataset_classes(recipe) == {"imagefolder": 3, "imagenet": 4, "tinyimagenet": 200, "cifar100": 100,
                                       "imagenet64": 1000}.get(name, 10)
    recipe.model.num_classes = 7
    assert dataset_classes(recipe) == 7


def test_the_audit_reads_an_image_folder_but_never_a_declared_one(tmp_path: Path):
    """A declared class count is not read from disk: a missing CIFAR root still counts 100."""
    recipe = SimpleNamespace(model=SimpleNamespace(num_classes=0),
                             data=SimpleNamespace(name="cifar100", root=str(tmp_path / "nowhere")))
    assert dataset_classes(recipe) == 100
    recipe.data.name = "imagefolder"
    with pytest.raises(UserError) as info:
        dataset_classes(recipe)
    assert_one_line_error(info.value, "data.root", str(tmp_path / "nowhere" / "train"))


def test_normalisation_is_the_specs_statistics():
    for name, spec in DATASETS.items():
        assert normalisation(name) == (spec.mean, spec.std) and len(spec.mean) == len(spec.std) == 3
    pixels = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    mean, std = torch.tensor(DATASETS["cifar10"].mean), torch.tensor(DATASETS["cifar10"].std)
    torch.testing.assert_close(Normalise("cifar10", CPU)(pixels)[0, :, 0, 0], (1 - mean) / std)


def test_an_unknown_data_set_is_one_line_at_recipe_load(tmp_path: Path):
    path = write(tmp_path, "data: {name: mnist}\n")
    assert recipe_error(path) == f"{path}: {UNKNOWN}"
    assert recipe_error(write(tmp_path, "data: {}\n"), ["data.name=mnist"]) == f"{path}: {UNKNOWN}"


@pytest.mark.parametrize("where", ["normalisation", "Normalise", "build_dataset", "dataset_spec", "build_data",
                                   "audit"])
def test_an_unknown_data_set_is_the_same_line_everywhere(where: str):
    """No fallback: normalisation used to take ImageNet's statistics for any unknown name."""
    calls = {"normalisation": lambda: normalisation("mnist"), "Normalise": lambda: Normalise("mnist", CPU),
             "build_dataset": lambda: build_dataset("mnist", "", "train"), "dataset_spec": lambda: dataset_spec("mnist"),
             "build_data": lambda: build_data(DataConfig(name="mnist", loader="torch"), 0, 0, 1, CPU),
             "audit": lambda: dataset_classes(SimpleNamespace(model=SimpleNamespace(num_classes=0),
                                                              data=SimpleNamespace(name="mnist", root="")))}
    with pytest.raises(UserError) as info:
        calls[where]()
    assert str(info.value) == UNKNOWN


@pytest.mark.parametrize("name", list(DATASETS))
@pytest.mark.parametrize("loader", list(LOADERS))
def test_data_root_is_required_where_the_spec_and_the_loader_read_it(tmp_path: Path, name: str, loader: str):
    path = write(tmp_path, f"data: {{name: {name}, loader: {loader}}}\n")
    if dataset_spec(name).needs_root and loader_spec(loader).reads_root:
        assert recipe_error(path) == f"{path}: data.root: required for data set {name!r}"
    else:
        assert load_recipe(path).data.root == ""
    assert load_recipe(path, ["data.root=/somewhere"]).data.name == name


def test_data_inputs_name_the_specs_splits(roots: dict[str, str]):
    cfg = DataConfig(name="tinyimagenet", root=roots["tinyimagenet"], image_size=8, batch_size=4, loader="torch",
                     augment="none")
    inputs = data_inputs(cfg, build_data(cfg, 0, 0, 1, CPU))
    assert [(i.name, i.context, i.profile["images"], i.profile["classes"]) for i in inputs] == [
        ("tinyimagenet-train", "train", 200, 200), ("tinyimagenet-val", "eval", 4, 200)]


# ============================================================================ loaders


def test_the_recipe_types_are_the_tables():
    hints = typing.get_type_hints(DataConfig)
    assert typing.get_args(hints["loader"]) == tuple(LOADERS) == ("auto", "device", "torch", "ffcv")
    assert typing.get_args(hints["augment"]) == AUGMENTS == ("none", "shift", "pad_crop_flip", "rotate_flip", "rrc_flip")
    assert all(set(spec.augments) <= set(AUGMENTS) for spec in LOADERS.values())


def test_the_loaders_declare_what_the_recipe_check_refused():
    assert loaders_with("augment_views") == loaders_with("logit_cache") == "auto, device or torch"
    assert [name for name, spec in LOADERS.items() if not spec.reads_root] == ["ffcv"]
    assert LOADERS["ffcv"].augments == ("none", "shift", "pad_crop_flip", "rrc_flip")  # no rotation


def test_the_device_augmentations_are_the_declared_modes():
    from nt_dist.data.device_aug import MODES

    assert set(LOADERS["device"].augments) == set(LOADERS["auto"].augments) == set(MODES)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_augment_views_follow_the_loader_spec(tmp_path: Path, loader: str):
    path = write(tmp_path, f"data: {{loader: {loader}, augment_views: 4}}\n")
    if loader_spec(loader).augment_views:
        assert load_recipe(path).data.augment_views == 4
    else:
        assert recipe_error(path) == (f"{path}: data.augment_views: needs data.loader: auto, device or torch "
                                      "(ffcv draws augmentations from a global RNG)")


@pytest.mark.parametrize("section", ["nasty", "distill"])
@pytest.mark.parametrize("loader", list(LOADERS))
def test_the_logit_cache_follows_the_loader_spec(tmp_path: Path, section: str, loader: str):
    path = write(tmp_path, f"data: {{loader: {loader}, augment: none}}\n{section}: {{cache_logits: true}}\n")
    if loader_spec(loader).logit_cache:
        assert getattr(load_recipe(path), section).cache_logits is True
    else:
        assert recipe_error(path) == f"{path}: {section}.cache_logits: needs data.loader: auto, device or torch"


def test_the_rules_are_read_from_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A loader that stops declaring a capability is refused for it, in a line naming the rest."""
    monkeypatch.setitem(LOADERS, "torch", dataclasses.replace(LOADERS["torch"], augment_views=False, rng="a die"))
    monkeypatch.setitem(LOADERS, "auto", dataclasses.replace(LOADERS["auto"], logit_cache=False))
    path = write(tmp_path, "data: {loader: torch, augment_views: 2}\n")
    assert recipe_error(path) == (f"{path}: data.augment_views: needs data.loader: auto or device "
                                  "(torch draws augmentations from a die)")
    assert recipe_error(path, ["data.loader=auto", "data.augment_views=0", "data.augment=none",
                               "nasty.cache_logits=true"]) == (
        f"{path}: nasty.cache_logits: needs data.loader: device or torch")


@pytest.mark.parametrize("loader", ["device", "torch"])
def test_each_loader_implements_its_declared_augmentations(tmp_path: Path, loader: str):
    """One batch of every declared mode: images as trained, and batch_indices naming its samples."""
    for augment in loader_spec(loader).augments:
        cfg = DataConfig(name="digits", image_size=8, batch_size=16, loader=loader, augment=augment,
                         cache_dir=str(tmp_path / "cache"))
        bundle = build_data(cfg, 0, 0, 1, CPU)
        images, labels = next(iter(bundle.train.epoch(1)))
        assert images.shape == (16, 3, 8, 8) and images.dtype == torch.float32, augment
        first = bundle.train.batch_indices(1)[0]
        reference = build_dataset("digits", "", "train")
        assert labels.tolist() == [reference.targets[i] for i in first], augment
        assert len(bundle.train.batch_indices(1, start_step=3)) == bundle.train.steps_per_epoch - 3 == 1437 // 16 - 3


def test_an_ffcv_source_has_no_batch_indices():
    pytest.importorskip("ffcv")
    from nt_dist.data.ffcv_loader import AUGMENTS as FFCV_AUGMENTS
    from nt_dist.data.ffcv_loader import FfcvTrainSource

    assert FFCV_AUGMENTS == LOADERS["ffcv"].augments
    source = FfcvTrainSource([None] * 3, None, None, None)  # type: ignore[arg-type]
    assert source.steps_per_epoch == 3
    with pytest.raises(NotImplementedError, match="cache_logits"):
        source.batch_indices(0)


def test_ffcv_refuses_an_undeclared_augmentation():
    pytest.importorskip("ffcv")
    with pytest.raises(UserError) as info:
        build_data(DataConfig(loader="ffcv", ffcv_dir="/nowhere", augment="rotate_flip"), 0, 0, 1, CPU)
    assert str(info.value) == ("data.augment: 'rotate_flip' has no FFCV pipeline; with data.loader: ffcv use one of "
                               "none, shift, pad_crop_flip, rrc_flip, or set data.loader: torch")


def test_an_unknown_loader_is_one_line():
    with pytest.raises(UserError) as info:
        loader_spec("dali")
    assert str(info.value) == "data.loader: unknown loader 'dali'; expected one of: auto, device, torch, ffcv"


# ============================================================================ imports


@pytest.mark.parametrize("module", ["nt_dist.config", "nt_dist.data", "nt_dist.data.specs"])
def test_the_recipe_side_imports_light_from_a_fresh_interpreter(module: str):
    """config reads the tables; neither it nor the data package pulls in torch or torchvision."""
    code = (f"import sys, {module}; heavy = sorted({{'torch', 'torchvision', 'ffcv'}} & set(sys.modules)); "
            "print(heavy or 'light')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "light"


@pytest.mark.parametrize("order", [("nt_dist.data", "nt_dist.config"), ("nt_dist.config", "nt_dist.data"),
                                   ("nt_dist.data.device_loader", "nt_dist.config"),
                                   ("nt_dist.data.torch_loader", "nt_dist.config")])
def test_no_import_order_meets_a_cycle(order: tuple[str, str]):
    proc = subprocess.run([sys.executable, "-c", f"import {order[0]}, {order[1]}"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_synthetic_writers_are_importable_outside_the_tests():
    """Benchmarks write data sets through nt_dist.data.synthetic, never through tests/."""
    repo = Path(__file__).resolve().parents[1]
    for folder in ("nt_dist", "benchmarks", "cluster", "docs"):
        for path in (repo / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert "conftest" not in text and "from tests" not in text and "import tests" not in text, path
    images = random_images(3, 4, seed=0)
    assert images.shape == (3, 4, 4, 3) and images.dtype == np.uint8
