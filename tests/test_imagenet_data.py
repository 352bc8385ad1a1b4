"""ImageNet-1k (ILSVRC-2012) and ImageNet 64x64 read from fixtures in their exact distributed
layouts (nt_dist.data.imagenet, nt_dist.data.imagenet64; writers in nt_dist.data.synthetic)."""

from __future__ import annotations

import pickle
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import documented_errors
from conftest_data import assert_one_line_error
from test_data_layouts import Exploit  # a pickle that runs a shell command

from nt_dist.config import DataConfig, load_recipe
from nt_dist.data import build_data, build_dataset, dataset_spec
from nt_dist.data.imagenet import read_meta_mat
from nt_dist.data.synthetic import WrittenImageNet, random_images, write_imagenet, write_imagenet64
from nt_dist.data.transforms import Normalise
from nt_dist.errors import UserError

CPU = torch.device("cpu")
# Written in this order (the devkit's ILSVRC2012_IDs 1, 2, 3 follow it): not sorted, so an index taken
# from the written, csv or ID order would differ from the sorted position.
WNIDS = ["n02119789", "n01440764", "n01530575"]
SORTED = sorted(WNIDS)
COLOURS = {"n02119789": (220, 30, 30), "n01440764": (30, 220, 30), "n01530575": (30, 30, 220)}
VAL_WNIDS = ["n02119789", "n01530575", "n02119789", "n01440764", "n01530575"]  # val image k = VAL_WNIDS[k - 1]
GROUND_TRUTH = Path("ILSVRC2012_devkit_t12") / "data" / "ILSVRC2012_validation_ground_truth.txt"


def _solid(colour: tuple[int, int, int], n: int, size: int = 16) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (n, size, size, 3)).copy()


def write(root: Path, layout: str) -> WrittenImageNet:
    return write_imagenet(root, {w: _solid(COLOURS[w], 2) for w in WNIDS},
                          [(_solid(COLOURS[w], 1)[0], w) for w in VAL_WNIDS], layout)  # type: ignore[arg-type]


def names(dataset: object) -> list[tuple[str, int]]:
    return [(Path(path).name, label) for path, label in dataset.samples]  # type: ignore[attr-defined]


def colour_label(dataset: object, i: int) -> int:
    """The class whose colour image ``i`` shows (the channel that dominates it)."""
    image, _ = dataset[i]  # type: ignore[index]
    channel = int(np.asarray(image).mean(axis=(0, 1)).argmax())
    return SORTED.index(next(w for w, colour in COLOURS.items() if int(np.argmax(colour)) == channel))


# ============================================================================ ImageNet layouts


def test_imagenet_training_classes_are_the_sorted_wnid_folders(tmp_path: Path) -> None:
    written = write(tmp_path, "sorted")
    train = build_dataset("imagenet", str(written.root), "train")
    assert train.classes == written.classes == SORTED and len(train.classes) == 3  # no 1000 hard-coded
    assert names(train) == written.train and train.targets == [0, 0, 1, 1, 2, 2]
    assert [name for name, _ in written.train][:2] == ["n01440764_12.JPEG", "n01440764_5.JPEG"]  # sorted as text
    assert all(colour_label(train, i) == label for i, label in enumerate(train.targets))
    assert dataset_spec("imagenet").num_classes is None and dataset_spec("imagenet").splits == ("train", "val")


@pytest.mark.parametrize("layout", ["sorted", "kaggle", "devkit"])
def test_imagenet_validation_labels_are_sorted_wnid_positions_in_every_layout(tmp_path: Path, layout: str) -> None:
    written = write(tmp_path, layout)
    val = build_dataset("imagenet", str(written.root), "val")
    assert val.classes == build_dataset("imagenet", str(written.root), "train").classes == SORTED
    assert names(val) == written.val
    by_file = sorted(zip([f"ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, 6)], VAL_WNIDS, strict=True),
                     key=lambda pair: (SORTED.index(pair[1]) if layout == "sorted" else 0, pair[0]))
    assert val.targets == [SORTED.index(wnid) for _, wnid in by_file]
    assert all(colour_label(val, i) == label for i, label in enumerate(val.targets))
    expected_source = {"sorted": written.root / "val", "kaggle": tmp_path / "LOC_val_solution.csv",
                       "devkit": written.root / GROUND_TRUTH}[layout]
    assert val.label_source == str(expected_source) and written.label_file in (None, expected_source)
    if layout == "kaggle":
        assert written.root == tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
        rows = (tmp_path / "LOC_val_solution.csv").read_text().splitlines()
        assert rows[0] == "ImageId,PredictionString" and [r.split(",")[0] for r in rows[1:]] != sorted(
            r.split(",")[0] for r in rows[1:])  # the rows in another order than the files, as Kaggle's


def test_kaggle_csv_in_data_root_comes_first_and_three_levels_up_only_under_cls_loc(tmp_path: Path) -> None:
    written = write(tmp_path / "k", "kaggle")
    top_csv = tmp_path / "k" / "LOC_val_solution.csv"
    (written.root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\ngarbage\n")
    with pytest.raises(UserError) as info:  # data.root's csv is read first (and a bad one is no reason to go on)
        build_dataset("imagenet", str(written.root), "val")
    assert_one_line_error(info.value, str(written.root / "LOC_val_solution.csv"), "line 2")
    shutil.move(top_csv, written.root / "LOC_val_solution.csv")
    val = build_dataset("imagenet", str(written.root), "val")
    assert names(val) == written.val and val.label_source == str(written.root / "LOC_val_solution.csv")
    shutil.move(written.root / "LOC_val_solution.csv", top_csv)
    link = tmp_path / "link"
    link.symlink_to(written.root)  # a symlink to .../ILSVRC/Data/CLS-LOC: its real path is Kaggle's
    assert build_dataset("imagenet", str(link), "val").label_source == str(top_csv.resolve())
    renamed = written.root.rename(written.root.with_name("CLS-LOC-copy"))  # no longer Kaggle's path
    with pytest.raises(UserError) as info:
        build_dataset("imagenet", str(renamed), "val")
    assert_one_line_error(info.value, "no label file", str(renamed / "LOC_val_solution.csv"), str(GROUND_TRUTH))
    assert str(top_csv) not in str(info.value)


def test_label_sources_follow_the_documented_preference(tmp_path: Path) -> None:
    """Sorted folders, then Kaggle's csv, then the devkit: a later source is not even read."""
    written = write(tmp_path / "sorted", "sorted")
    (written.root / "LOC_val_solution.csv").write_text("not a csv")
    assert names(build_dataset("imagenet", str(written.root), "val")) == written.val
    written = write(tmp_path / "kaggle", "kaggle")
    (written.root / GROUND_TRUTH).parent.mkdir(parents=True)
    (written.root / GROUND_TRUTH).write_text("not\nthe ground truth\n")
    assert build_dataset("imagenet", str(written.root), "val").label_source == str(tmp_path / "kaggle" /
                                                                                  "LOC_val_solution.csv")


def test_the_devkit_fixture_reads_back_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's own parse_devkit_archive (the md5 of the real archive skipped) reads the
    fixture's meta.mat and ground truth as our reader does."""
    import torchvision.datasets.imagenet as tv

    written = write(tmp_path / "inet", "devkit")
    archive = tmp_path / "tv" / "ILSVRC2012_devkit_t12.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(written.root / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    monkeypatch.setattr(tv, "_verify_archive", lambda *args: None)
    tv.parse_devkit_archive(str(archive.parent), archive.name)
    wnid_to_classes, val_wnids = tv.load_meta_file(str(archive.parent))
    assert val_wnids == VAL_WNIDS and sorted(wnid_to_classes) == SORTED  # the parent synsets are no class
    assert read_meta_mat(written.root / GROUND_TRUTH.with_name("meta.mat")) == {1: WNIDS[0], 2: WNIDS[1], 3: WNIDS[2]}
    assert [SORTED.index(w) for w in val_wnids] == build_dataset("imagenet", str(written.root), "val").targets


# ============================================================================ ImageNet errors


class Case(NamedTuple):
    layout: str
    split: str
    mutate: Callable[[WrittenImageNet], object]
    fragments: Callable[[WrittenImageNet], list[str]]
    doc: str = ""  # the docs/errors.md row whose line this is, exactly


def _lines(path: Path, number: int, text: str | None) -> None:
    """Line ``number`` (1-based) of ``path`` replaced by ``text`` (None: removed)."""
    lines = path.read_text().splitlines()
    lines[number - 1:number] = [] if text is None else [text]
    path.write_text("".join(f"{line}\n" for line in lines))


def _csv(w: WrittenImageNet) -> Path:
    return w.root.parents[2] / "LOC_val_solution.csv"


def _csv_line(w: WrittenImageNet, k: int) -> int:
    return next(n for n, line in enumerate(_csv(w).read_text().splitlines(), 1)
                if line.startswith(f"ILSVRC2012_val_{k:08d},"))


def _val(w: WrittenImageNet, k: int) -> Path:
    return w.root / "val" / f"ILSVRC2012_val_{k:08d}.JPEG"


def _empty(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.mkdir()


IMAGENET_ERRORS = {
    "no train/": Case("sorted", "val", lambda w: shutil.rmtree(w.root / "train"),
                      lambda w: [f"{w.root / 'train'} not found"], "an ImageNet `data.root` without `train/`"),
    "train/ without class folders": Case("sorted", "train", lambda w: _empty(w.root / "train"),
                                         lambda w: [str(w.root / "train"), "no class folder"]),
    "a class folder without images": Case("sorted", "train", lambda w: _empty(w.root / "train" / SORTED[1]),
                                          lambda w: [str(w.root / "train" / SORTED[1]), "holds no image"]),
    "no val/": Case("sorted", "val", lambda w: shutil.rmtree(w.root / "val"),
                    lambda w: [f"{w.root / 'val'} not found", "LOC_val_solution.csv"]),
    "an empty val/": Case("devkit", "val", lambda w: _empty(w.root / "val"),
                          lambda w: [str(w.root / "val"), "holds no image"]),
    "val/ mixing folders and images": Case(
        "sorted", "val", lambda w: shutil.copy(next((w.root / "val" / SORTED[0]).iterdir()), _val(w, 9)),
        lambda w: [str(w.root / "val"), "both class folders", "ILSVRC2012_val_00000009.JPEG"]),
    "a val/ class train/ lacks": Case("sorted", "val", lambda w: (w.root / "val" / "n09999999").mkdir(),
                                      lambda w: [str(w.root / "val" / "n09999999"), "train/ does not have"]),
    "a flat val/ without a label file": Case(
        "kaggle", "val", lambda w: _csv(w).unlink(),
        lambda w: ["5 images directly but no label file", str(w.root / "LOC_val_solution.csv"), str(_csv(w)),
                   str(w.root / GROUND_TRUTH), "meta.mat"], "a flat ImageNet `val/` with no label file"),
    "a csv without its header": Case("kaggle", "val", lambda w: _lines(_csv(w), 1, "ImageId,Prediction"),
                                     lambda w: [f"{_csv(w)}, line 1", "'ImageId,PredictionString'"]),
    "a malformed csv line": Case("kaggle", "val", lambda w: _lines(_csv(w), 3, "ILSVRC2012_val_00000002"),
                                 lambda w: [f"{_csv(w)}, line 3", "expected 'ImageId,wnid"],
                                 "a malformed line in Kaggle's `LOC_val_solution.csv`"),
    "a csv row without boxes": Case("kaggle", "val", lambda w: _lines(_csv(w), 4, "ILSVRC2012_val_00000002, "),
                                    lambda w: [f"{_csv(w)}, line 4"]),
    "a csv wnid train/ lacks": Case(
        "kaggle", "val", lambda w: _lines(_csv(w), 2, "ILSVRC2012_val_00000001,n09999999 1 2 3 4"),
        lambda w: [f"{_csv(w)}, line 2", "'n09999999'", str(w.root / "train")],
        "an ImageNet label file naming a wnid that `train/` lacks"),
    "a csv listing an image twice": Case(
        "kaggle", "val", lambda w: _lines(_csv(w), 7, "ILSVRC2012_val_00000003,n01440764 1 2 3 4"),
        lambda w: [f"{_csv(w)}, line 7", f"listed twice (first on line {_csv_line(w, 3)})"]),
    "a csv listing an image val/ lacks": Case(
        "kaggle", "val", lambda w: _val(w, 3).unlink(),
        lambda w: [f"{_csv(w)}, line {_csv_line(w, 3)}", f"ILSVRC2012_val_00000003 is not in {w.root / 'val'}"]),
    "a csv leaving an image unlabelled": Case(
        "kaggle", "val", lambda w: _lines(_csv(w), _csv_line(w, 4), None),
        lambda w: [f"{_val(w, 4)}: not labelled by {_csv(w)}", "1 of the 5 images"],
        "ImageNet validation images that no label file labels"),
    "a devkit without meta.mat": Case("devkit", "val", lambda w: (w.root / GROUND_TRUTH).with_name("meta.mat").unlink(),
                                      lambda w: [f"{(w.root / GROUND_TRUTH).with_name('meta.mat')} not found"]),
    "a meta.mat that is no MATLAB file": Case(
        "devkit", "val", lambda w: (w.root / GROUND_TRUTH).with_name("meta.mat").write_bytes(b"MATLAB? no"),
        lambda w: [str((w.root / GROUND_TRUTH).with_name("meta.mat")), "not the devkit's meta.mat"]),
    "a ground truth longer than val/": Case(
        "devkit", "val", lambda w: _val(w, 5).unlink(),
        lambda w: [f"{w.root / GROUND_TRUTH} has 5 lines but {w.root / 'val'} holds 4 images"]),
    "a ground truth shorter than val/": Case(
        "devkit", "val", lambda w: shutil.copy(_val(w, 1), _val(w, 6)),
        lambda w: [f"{w.root / GROUND_TRUTH} has 5 lines but {w.root / 'val'} holds 6 images"],
        "an ImageNet devkit ground truth of another length than `val/`"),
    "a ground truth line that is no integer": Case("devkit", "val", lambda w: _lines(w.root / GROUND_TRUTH, 2, "two"),
                                                   lambda w: [f"{w.root / GROUND_TRUTH}, line 2", "'two'"]),
    "an ILSVRC2012_ID meta.mat lacks": Case(
        "devkit", "val", lambda w: _lines(w.root / GROUND_TRUTH, 2, "9"),
        lambda w: [f"{w.root / GROUND_TRUTH}, line 2: ILSVRC2012_ID 9 is not a class"],
        "an ILSVRC2012_ID that the devkit's `meta.mat` lacks"),
    "an ILSVRC2012_ID of a synset with children": Case(
        "devkit", "val", lambda w: _lines(w.root / GROUND_TRUTH, 2, "4"),
        lambda w: [f"{w.root / GROUND_TRUTH}, line 2: ILSVRC2012_ID 4 is not a class"]),
    "an ILSVRC2012_ID whose wnid train/ lacks": Case(
        "devkit", "val", lambda w: shutil.rmtree(w.root / "train" / WNIDS[0]),
        lambda w: [f"{w.root / GROUND_TRUTH}, line 1: ILSVRC2012_ID 1 is {WNIDS[0]}", str(w.root / "train")]),
    "a ground truth naming an image val/ lacks": Case(
        "devkit", "val", lambda w: _val(w, 3).rename(w.root / "val" / "extra.JPEG"),
        lambda w: [f"{w.root / GROUND_TRUTH}, line 3: ILSVRC2012_val_00000003 is not in {w.root / 'val'}"],
        "an ImageNet label file listing an image that is not in `val/`"),
}


@pytest.mark.parametrize("case", list(IMAGENET_ERRORS))
def test_imagenet_problems_are_one_line_errors_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               case: str) -> None:
    """Relative paths (as a recipe would give them), so a documented line can be compared exactly."""
    layout, split, mutate, fragments, doc = IMAGENET_ERRORS[case]
    monkeypatch.chdir(tmp_path)
    written = write(Path("imagenet"), layout)
    mutate(written)
    with pytest.raises(UserError) as info:
        build_dataset("imagenet", str(written.root), split)
    assert_one_line_error(info.value, "data.root: ", *fragments(written))
    if doc:
        assert f"nt-dist: error: {info.value}" == documented_errors()[doc]


# ============================================================================ ImageNet 64x64


def coordinate_images(n: int) -> np.ndarray:
    """Red = row, green = column, blue = the image's number: a swapped plane or axis shows."""
    rows, cols = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    images = np.empty((n, 64, 64, 3), dtype=np.uint8)
    images[..., 0], images[..., 1] = rows * 3, cols * 2 + 1
    images[..., 2] = (np.arange(n) * 7 % 256)[:, None, None]
    return images


def write64(root: Path, nested: bool = False, protocol: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
    batches = [(coordinate_images(3) if i == 0 else random_images(3, 64, seed=i), [1 + i, 1000, 500 - i])
               for i in range(10)]
    return write_imagenet64(root, batches, (random_images(4, 64, seed=99), [7, 1, 1000, 3]), nested=nested,
                            protocol=protocol)


def test_imagenet64_pixels_are_the_rows_written_plane_by_plane(tmp_path: Path) -> None:
    expected = write64(tmp_path)
    rows = pickle.loads((tmp_path / "train_data_batch_1").read_bytes())["data"]
    train = build_dataset("imagenet64", str(tmp_path), "train")
    assert train.images.shape == (30, 64, 64, 3) and train.images.dtype == np.uint8
    assert train.images.flags["C_CONTIGUOUS"]
    assert np.array_equal(train.images, expected["train"][0]) and train.targets == expected["train"][1]
    assert train.targets[:3] == [0, 999, 499]  # label - 1
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (64, 64) and label == 0
    assert image.getpixel((5, 2)) == (6, 11, 0) == tuple(rows[0][[2 * 64 + 5, 4096 + 2 * 64 + 5, 8192 + 2 * 64 + 5]])
    val = build_dataset("imagenet64", str(tmp_path), "val")
    assert np.array_equal(val.images, expected["val"][0]) and val.targets == [6, 0, 999, 2]
    assert val.classes == train.classes == [str(i) for i in range(1000)] and dataset_spec("imagenet64").num_classes == 1000


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_imagenet64_flat_and_nested_read_the_same(tmp_path: Path, protocol: int) -> None:
    flat, nested = write64(tmp_path / "flat", protocol=protocol), write64(tmp_path / "nested", True, protocol)
    assert (tmp_path / "nested" / "Imagenet64_train" / "train_data_batch_10").is_file()
    assert (tmp_path / "nested" / "Imagenet64_val" / "val_data").is_file()
    assert not (tmp_path / "nested" / "val_data").exists()
    for split in ("train", "val"):
        a, b = (build_dataset("imagenet64", str(tmp_path / name), split) for name in ("flat", "nested"))
        assert np.array_equal(a.images, b.images) and a.targets == b.targets == flat[split][1] == nested[split][1]
        assert np.array_equal(a.images, flat[split][0])


def test_imagenet64_reads_python2_pickles_with_byte_keys(tmp_path: Path) -> None:
    expected = write64(tmp_path)
    images, labels = expected["val"]
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    with (tmp_path / "val_data").open("wb") as handle:
        pickle.dump({b"data": planes, b"labels": [label + 1 for label in labels]}, handle, protocol=2)
    val = build_dataset("imagenet64", str(tmp_path), "val")
    assert np.array_equal(val.images, images) and val.targets == labels


def test_imagenet64_fills_one_array_without_concatenating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real training split is 15.7 GB: joining ten arrays would hold it twice."""
    expected = write64(tmp_path)

    for name in ("concatenate", "vstack", "stack", "append"):
        monkeypatch.setattr(np, name, lambda *args, **kwargs: pytest.fail("the reader joined arrays"))
    train = build_dataset("imagenet64", str(tmp_path), "train")
    monkeypatch.undo()
    assert np.array_equal(train.images, expected["train"][0])
    assert train.images.base is not None and train.images.base.shape[1:] == (64, 64, 3)  # a view of the one array


def _rewrite(path: Path, tree: object) -> None:
    path.write_bytes(pickle.dumps(tree, protocol=2))


def _val_tree(rows: int, width: int = 12288, labels: list[int] | None = None) -> dict[str, object]:
    return {"data": np.zeros((rows, width), dtype=np.uint8), "labels": [1] * rows if labels is None else labels}


# case -> (split, how to break the flat fixture "imagenet64" (None: write nothing), fragments, docs/errors.md row)
IMAGENET64_ERRORS: dict[str, tuple[str, Callable[[Path], object] | None, list[str], str]] = {
    "no files": ("train", None, ["imagenet64/train_data_batch_1 not found", "Imagenet64_train"],
                 "a missing ImageNet 64x64 batch file"),
    "a missing batch": ("train", lambda r: (r / "train_data_batch_7").unlink(),
                        ["imagenet64/train_data_batch_7 not found", "train_data_batch_1..10"], ""),
    "a batch moved to Imagenet64_train/": (  # the first file is flat: the flat layout, whole
        "train", lambda r: ((r / "Imagenet64_train").mkdir(), shutil.move(r / "train_data_batch_10", r / "Imagenet64_train")),
        ["imagenet64/train_data_batch_10 not found"], ""),
    "the npz variant": ("val", lambda r: (r / "val_data").rename(r / "val_data.npz"),
                        ["imagenet64/val_data not found", "imagenet64/val_data.npz is the npz variant"], ""),
    "not a pickle": ("val", lambda r: (r / "val_data").write_bytes(b"PK\x03\x04 a zip, not a pickle"),
                     ["imagenet64/val_data is not a readable ImageNet 64x64 pickle"],
                     "an ImageNet 64x64 file that is not such a pickle"),
    "a pickle that runs code": ("val", lambda r: _rewrite(r / "val_data", {"data": Exploit(r / "pwned")}),
                                ["imagenet64/val_data", "UnpicklingError"], ""),
    "a list, not a dict": ("val", lambda r: _rewrite(r / "val_data", [1, 2]), ["holds a list, not a dict"], ""),
    "no labels": ("val", lambda r: _rewrite(r / "val_data", {"data": np.zeros((1, 12288), np.uint8)}),
                  ["has no 'labels' entry"], ""),
    "rows of the 32x32 variant": ("val", lambda r: _rewrite(r / "val_data", _val_tree(2, 3072)),
                                  ["imagenet64/val_data: rows of 3072 values", "only the 64x64 variant is read"],
                                  "ImageNet 32x32 files read as `imagenet64`"),
    "rows of no variant": ("val", lambda r: _rewrite(r / "val_data", _val_tree(2, 100)),
                           ["rows of 100 values; only the 64x64 variant"], ""),
    "float pixels": ("val", lambda r: _rewrite(r / "val_data", {"data": np.zeros((1, 12288)), "labels": [1]}),
                     ["holds float64, expected uint8"], ""),
    "a label 0": ("val", lambda r: _rewrite(r / "val_data", _val_tree(2, labels=[3, 0])),
                  ["imagenet64/val_data: label 0 of row 1 is outside 1..1000"], "an ImageNet 64x64 label outside 1..1000"),
    "a label 1001": ("val", lambda r: _rewrite(r / "val_data", _val_tree(2, labels=[1001, 4])),
                     ["label 1001 of row 0 is outside 1..1000"], ""),
    "text labels": ("val", lambda r: _rewrite(r / "val_data", _val_tree(1, labels=["cat"])),
                    ["'labels' is not a list of integers"], ""),
    "fewer labels than rows": ("val", lambda r: _rewrite(r / "val_data", _val_tree(2, labels=[3])),
                               ["imagenet64/val_data: 1 labels but 2 rows"],
                               "an ImageNet 64x64 file with fewer labels than rows"),
}


@pytest.mark.parametrize("case", list(IMAGENET64_ERRORS))
def test_imagenet64_problems_are_one_line_errors_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 case: str) -> None:
    split, mutate, fragments, doc = IMAGENET64_ERRORS[case]
    monkeypatch.chdir(tmp_path)
    root = Path("imagenet64")
    if mutate is not None:
        write64(root)
        mutate(root)
    with pytest.raises(UserError) as info:
        build_dataset("imagenet64", str(root), split)
    assert_one_line_error(info.value, "data.root: ", *fragments)
    assert not (root / "pwned").exists()
    if doc:
        assert f"nt-dist: error: {info.value}" == documented_errors()[doc]


def test_a_nested_layout_missing_a_batch_names_it_in_its_subfolder(tmp_path: Path) -> None:
    write64(tmp_path, nested=True)
    (tmp_path / "Imagenet64_train" / "train_data_batch_3").unlink()
    with pytest.raises(UserError) as info:
        build_dataset("imagenet64", str(tmp_path), "train")
    assert_one_line_error(info.value, f"{tmp_path / 'Imagenet64_train' / 'train_data_batch_3'} not found")
    assert len(build_dataset("imagenet64", str(tmp_path), "val")) == 4  # the other split is whole
    shutil.rmtree(tmp_path / "Imagenet64_val")
    with pytest.raises(UserError) as info:
        build_dataset("imagenet64", str(tmp_path), "val")
    assert_one_line_error(info.value, f"{tmp_path / 'val_data'} not found", "Imagenet64_val/val_data")


# ============================================================================ recipes and loaders


@pytest.mark.parametrize("name", ["imagenet", "imagenet64"])
def test_recipes_accept_both_data_sets(tmp_path: Path, name: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"data: {{name: {name}, root: /data/{name}, image_size: 64, augment: rrc_flip}}\n")
    assert load_recipe(path).data.name == name
    path.write_text(f"data: {{name: {name}}}\n")
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: data.root: required for data set {name!r}"


def test_the_torch_loader_batches_imagenet(tmp_path: Path) -> None:
    written = write(tmp_path, "kaggle")
    cfg = DataConfig(name="imagenet", root=str(written.root), image_size=32, augment="rrc_flip", batch_size=2,
                     eval_batch_size=4, loader="torch")
    bundle = build_data(cfg, seed=0, rank=0, world=1, device=CPU)
    assert bundle.num_classes == 3 and bundle.train_size == 6 and bundle.eval_size == 5
    images, labels = next(iter(bundle.train.epoch(0)))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.cat([labels for _, labels in bundle.eval.batches()]).tolist() == [label for _, label in written.val]


def test_the_device_loader_serves_imagenet64_pixels_as_written(tmp_path: Path) -> None:
    expected = write64(tmp_path / "i64")
    common = dict(name="imagenet64", root=str(tmp_path / "i64"), image_size=64, augment="none", batch_size=2,
                  eval_batch_size=3)
    device = build_data(DataConfig(**common, loader="device", cache_dir=str(tmp_path / "cache")), 0, 0, 1, CPU)
    torch_path = build_data(DataConfig(**common, loader="torch"), 0, 0, 1, CPU)
    assert device.num_classes == torch_path.num_classes == 1000 and device.train_size == 30
    got = list(device.eval.batches())
    images, labels = torch.cat([b[0] for b in got]), torch.cat([b[1] for b in got])
    written = torch.from_numpy(expected["val"][0]).permute(0, 3, 1, 2)
    torch.testing.assert_close(images, Normalise("imagenet64", CPU)(written), rtol=0, atol=0)
    assert labels.tolist() == expected["val"][1]
    reference = list(torch_path.eval.batches())
    torch.testing.assert_close(images, torch.cat([b[0] for b in reference]), rtol=0, atol=0)
    train_images, _ = next(iter(device.train.epoch(0)))
    assert train_images.shape == (2, 3, 64, 64)
