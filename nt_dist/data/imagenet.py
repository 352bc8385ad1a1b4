"""ImageNet-1k (ILSVRC-2012) read from the layouts it is distributed and commonly unpacked in.

``data.root`` is the folder that holds ``train/``::

    train/<wnid>/<wnid>_<n>.JPEG          the training images, one folder per class
    val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG   validation, sorted into class folders ...
    val/ILSVRC2012_val_<8 digits>.JPEG          ... or flat, as ILSVRC2012_img_val.tar unpacks,
                                                labelled by one of the files below

**Class index.** The position of the wnid among the sorted class folders of ``train/`` (what
torchvision's ``ImageFolder`` and ``ImageNet`` give), for both splits and every validation
layout; the class count is the number of those folders (1000 for the real data set). Within
a split, samples are in the order ``ImageFolder`` lists them: class folders sorted, file names
sorted in each; flat validation images sorted by file name.

**Validation labels**, the first that applies (a label file that is present but wrong is an
error, never a reason to try the next):

1. ``val/`` holds folders: the sorted layout (what the common ``valprep.sh`` re-sorting makes);
   the folder names are the wnids.
2. Kaggle's ``LOC_val_solution.csv`` (the "ImageNet Object Localization Challenge" download,
   which unpacks to ``<top>/LOC_val_solution.csv`` and ``<top>/ILSVRC/Data/CLS-LOC/{train,val}``):
   looked for in ``data.root``, then, only when ``data.root`` ends in ``ILSVRC/Data/CLS-LOC`` (as
   typed, made absolute; else its real path, through symlinks), in ``<top>`` (three levels up). Header ``ImageId,PredictionString``; each row an image id
   (the file name without ``.JPEG``) and its boxes, ``wnid x0 y0 x1 y1`` repeated: the first
   token is the label.
3. The ILSVRC-2012 devkit (``ILSVRC2012_devkit_t12.tar.gz`` unpacked in ``data.root``):
   ``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` holds one
   ILSVRC2012_ID per line, line *i* labelling ``ILSVRC2012_val_<i, 8 digits>.JPEG``, and
   ``ILSVRC2012_devkit_t12/data/meta.mat`` maps each ILSVRC2012_ID to its WNID (its ``synsets``
   struct; the 1000 classes are the synsets without children).

Every label file is checked against ``val/`` and ``train/``: a malformed line, a wnid that
``train/`` lacks, an image listed but absent, an image left unlabelled, a ground-truth file of
another length than ``val/``, an ILSVRC2012_ID ``meta.mat`` lacks: each is one ``UserError``
line naming the file (and line).

**Written here, and why.** torchvision 0.29 parses the devkit in ``parse_meta_mat`` and
``parse_val_groundtruth_txt``, but defines both *inside* ``parse_devkit_archive`` (not
importable), which itself only takes the ``.tar.gz`` with its md5 and writes ``meta.bin`` into
the root. :func:`read_meta_mat` and :func:`read_ground_truth` therefore follow their code
(``scipy.io.loadmat(meta.mat, squeeze_me=True)["synsets"]``, leaves where ``num_children == 0``,
``ILSVRC2012_ID -> WNID``; one ``int`` per line), reading the struct's fields by name rather
than position, with line numbers for the errors; the fixture writer's ``meta.mat`` is checked
against torchvision's own ``parse_devkit_archive`` in the tests. Kaggle's csv has no parser in
torchvision. Listing is by ``os.scandir`` (no ``stat`` per file beyond what listing gives:
ImageNet's training split is 1.28M files) and nothing is decoded at construction;
:meth:`~nt_dist.data.folders._FileDataset.check` reads the headers of splits up to 200k files.
"""

from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from nt_dist.data.folders import _FileDataset
from nt_dist.errors import UserError

IMAGENET = "ILSVRC-2012 as distributed: data.root holds train/<wnid>/*.JPEG and val/"
KAGGLE_CSV = "LOC_val_solution.csv"
KAGGLE_HEADER = "ImageId,PredictionString"
KAGGLE_TAIL = ("ILSVRC", "Data", "CLS-LOC")  # data.root inside Kaggle's download: the csv is 3 levels up
DEVKIT = Path("ILSVRC2012_devkit_t12") / "data"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META_MAT = "meta.mat"
VAL_NAME = "ILSVRC2012_val_{:08d}"  # + extension: the image that line i of the ground truth labels

Samples = list[tuple[str, int]]
Labels = dict[str, tuple[str, int]]  # image id (file name without extension) -> (wnid, line of the label file)


class ImageNetDataset(_FileDataset):
    """ILSVRC-2012, ``split`` train or val: map-style ``(PIL RGB image, int label)`` with
    ``classes`` (the sorted wnids of ``train/``), ``targets``, ``samples`` (path, label) and
    ``label_source`` (what the labels were read from: a folder or a label file)."""

    def __init__(self, root: str, split: str) -> None:
        base = Path(root)
        wnids = class_folders(base)
        index = {wnid: i for i, wnid in enumerate(wnids)}
        if split == "train":
            samples, self.label_source = train_samples(base, index), str(base / "train")
        else:
            samples, self.label_source = val_samples(base, index)
        super().__init__(wnids, samples)


def class_folders(base: Path) -> list[str]:
    """The sorted class folders of ``train/`` (as torchvision's ``find_classes``)."""
    train = base / "train"
    try:
        with os.scandir(train) as entries:
            wnids = sorted(entry.name for entry in entries if entry.is_dir())
    except FileNotFoundError:
        raise UserError(f"data.root: {train} not found (expected {IMAGENET})") from None
    except NotADirectoryError:
        raise UserError(f"data.root: {train} is not a folder (expected {IMAGENET})") from None
    except OSError as exc:
        raise UserError(f"data.root: {train}: unreadable ({exc.strerror or exc})") from None
    if not wnids:
        raise UserError(f"data.root: {train} holds no class folder (expected train/<wnid>/*.JPEG, "
                        "e.g. train/n01440764/n01440764_10026.JPEG)")
    return wnids


def train_samples(base: Path, index: dict[str, int]) -> Samples:
    samples: Samples = []
    for wnid, label in index.items():
        folder = base / "train" / wnid
        names, _ = _listing(folder)
        if not names:
            raise UserError(f"data.root: {folder} holds no image ({_EXTENSIONS}); every class folder of "
                            "train/ needs at least one")
        top = str(folder)
        samples += [(os.path.join(top, name), label) for name in names]
    return samples


def val_samples(base: Path, index: dict[str, int]) -> tuple[Samples, str]:
    """The validation samples and where their labels came from, in the documented order."""
    val = base / "val"
    if not val.is_dir():
        raise UserError(f"data.root: {val} not found (expected val/<wnid>/*.JPEG, or the flat "
                        f"val/ILSVRC2012_val_*.JPEG with {KAGGLE_CSV} or the ILSVRC2012 devkit)")
    names, folders = _listing(val)
    if folders:
        if names:
            raise UserError(f"data.root: {val} holds both class folders ({folders[0]}, ...) and images "
                            f"({names[0]}, ...); expected one layout: val/<wnid>/*.JPEG or a flat val/")
        return _sorted_val(val, folders, index), str(val)
    if not names:
        raise UserError(f"data.root: {val} holds no image (expected val/<wnid>/*.JPEG or val/ILSVRC2012_val_*.JPEG)")
    stems = {os.path.splitext(name)[0]: name for name in names}
    csvs = csv_candidates(base)
    for csv in csvs:
        if csv.is_file():
            return _match(val, stems, read_kaggle_csv(csv, index, base / "train"), csv, index), str(csv)
    ground_truth = base / DEVKIT / GROUND_TRUTH
    if ground_truth.is_file():
        labels = read_devkit(ground_truth, len(names), val, index, base / "train")
        return _match(val, stems, labels, ground_truth, index), str(ground_truth)
    looked = " and ".join(str(csv) for csv in csvs)
    raise UserError(f"data.root: {val} holds {len(names)} images directly but no label file: looked for {looked}, "
                    f"then {ground_truth} (with {META_MAT} beside it); or sort val/ into val/<wnid>/ folders")


def csv_candidates(base: Path) -> list[Path]:
    """Where Kaggle's csv is looked for, in order: ``data.root``; then, where ``data.root`` is
    Kaggle's ``<top>/ILSVRC/Data/CLS-LOC``, ``<top>``: ``data.root/../../..`` taken lexically
    when the absolute path of ``data.root`` ends in ``ILSVRC/Data/CLS-LOC``, else three levels
    above its real path when that (through symlinks) ends so."""
    places = [base / KAGGLE_CSV]
    if Path(os.path.abspath(base)).parts[-3:] == KAGGLE_TAIL:
        places.append(Path(os.path.normpath(base / ".." / ".." / "..")) / KAGGLE_CSV)
    elif (real := base.resolve()).parts[-3:] == KAGGLE_TAIL:
        places.append(real.parents[2] / KAGGLE_CSV)
    return places


def read_kaggle_csv(path: Path, index: dict[str, int], train: Path) -> Labels:
    """Image id -> (wnid, line) from Kaggle's ``LOC_val_solution.csv``: the first token of each
    row's PredictionString is its label."""
    lines = _read_lines(path, "utf-8-sig")  # tolerate a byte-order mark, should a copy have one
    if not lines or lines[0].strip() != KAGGLE_HEADER:
        raise UserError(f"data.root: {path}, line 1: expected the header {KAGGLE_HEADER!r} (Kaggle's {KAGGLE_CSV})")
    labels: Labels = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.strip().split(",")
        tokens = fields[1].split() if len(fields) == 2 else []
        if not fields[0].strip() or not tokens:
            raise UserError(f"data.root: {path}, line {number}: expected 'ImageId,wnid x0 y0 x1 y1 ...' "
                            "(e.g. 'ILSVRC2012_val_00008726,n02119789 255 142 454 329')")
        image, wnid = fields[0].strip(), tokens[0]
        if wnid not in index:
            raise UserError(f"data.root: {path}, line {number}: wnid {wnid!r} is not a class folder of {train}")
        if image in labels:
            raise UserError(f"data.root: {path}, line {number}: {image} is listed twice (first on line "
                            f"{labels[image][1]})")
        labels[image] = (wnid, number)
    return labels


def read_devkit(ground_truth: Path, count: int, val: Path, index: dict[str, int], train: Path) -> Labels:
    """Image id -> (wnid, line) from the devkit: line *i* of the ground truth labels
    ``ILSVRC2012_val_<i>``, through ``meta.mat``'s ILSVRC2012_ID -> WNID."""
    meta = ground_truth.with_name(META_MAT)
    if not meta.is_file():
        raise UserError(f"data.root: {meta} not found ({ground_truth} names classes by ILSVRC2012_ID; "
                        f"{META_MAT} maps them to wnids: unpack the whole ILSVRC2012_devkit_t12.tar.gz)")
    ids = read_ground_truth(ground_truth)
    if len(ids) != count:
        raise UserError(f"data.root: {ground_truth} has {len(ids)} lines but {val} holds {count} images "
                        f"(line i labels ILSVRC2012_val_<i, 8 digits>.JPEG)")
    wnid_of = read_meta_mat(meta)
    labels: Labels = {}
    for number, ilsvrc_id in enumerate(ids, start=1):
        wnid = wnid_of.get(ilsvrc_id)
        if wnid is None:
            raise UserError(f"data.root: {ground_truth}, line {number}: ILSVRC2012_ID {ilsvrc_id} is not a class "
                            f"of {meta} (its synsets without children)")
        if wnid not in index:
            raise UserError(f"data.root: {ground_truth}, line {number}: ILSVRC2012_ID {ilsvrc_id} is {wnid} "
                            f"({meta}), which is not a class folder of {train}")
        labels[VAL_NAME.format(number)] = (wnid, number)
    return labels


def read_ground_truth(path: Path) -> list[int]:
    """One ILSVRC2012_ID per line (torchvision's ``parse_val_groundtruth_txt``, with line numbers);
    blank lines at the end are ignored, elsewhere they are malformed."""
    lines = _read_lines(path, "utf-8")
    while lines and not lines[-1].strip():
        lines.pop()
    ids = []
    for number, line in enumerate(lines, start=1):
        try:
            ids.append(int(line.strip()))
        except ValueError:
            raise UserError(f"data.root: {path}, line {number}: expected one ILSVRC2012_ID (an integer), "
                            f"got {line.strip()[:40]!r}") from None
    return ids


def read_meta_mat(path: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID of the synsets without children in the devkit's ``meta.mat``
    (torchvision's ``parse_meta_mat``, reading the fields by name)."""
    import numpy as np
    import scipy.io

    try:
        synsets = scipy.io.loadmat(str(path), squeeze_me=True)["synsets"]
        ids, wnids, children = (np.atleast_1d(synsets[field]) for field in ("ILSVRC2012_ID", "WNID", "num_children"))
        return {int(i): str(w) for i, w, c in zip(ids, wnids, children, strict=True) if int(c) == 0}
    except Exception as exc:  # noqa: BLE001  loadmat raises many types; all mean "not the devkit's meta.mat"
        raise UserError(f"data.root: {path}: not the devkit's {META_MAT} (a MATLAB file whose 'synsets' struct has "
                        f"ILSVRC2012_ID, WNID and num_children; {type(exc).__name__})") from None


# ------------------------------------------------------------------------------- internals

_EXTENSIONS = ", ".join(IMG_EXTENSIONS)


def _listing(folder: Path) -> tuple[list[str], list[str]]:
    """The sorted image files (by extension, as torchvision's ``IMG_EXTENSIONS``) and sorted
    sub-folders of ``folder``, from one ``os.scandir``."""
    names, folders = [], []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():
                    folders.append(entry.name)
                elif entry.name.lower().endswith(IMG_EXTENSIONS):
                    names.append(entry.name)
    except OSError as exc:
        raise UserError(f"data.root: {folder}: unreadable ({exc.strerror or exc})") from None
    return sorted(names), sorted(folders)


def _sorted_val(val: Path, folders: list[str], index: dict[str, int]) -> Samples:
    unknown = [name for name in folders if name not in index]
    if unknown:
        raise UserError(f"data.root: {val / unknown[0]} is a class that train/ does not have")
    samples: Samples = []
    for wnid in folders:
        names, _ = _listing(val / wnid)
        top = str(val / wnid)
        samples += [(os.path.join(top, name), index[wnid]) for name in names]
    if not samples:
        raise UserError(f"data.root: {val} holds class folders but no image ({_EXTENSIONS})")
    return samples


def _match(val: Path, stems: dict[str, str], labels: Labels, source: Path, index: dict[str, int]) -> Samples:
    """The flat validation images labelled by ``labels`` (read from ``source``), sorted by file
    name: every listed image must be in ``val/``, every image of ``val/`` listed."""
    for image, (_, number) in labels.items():
        if image not in stems:
            raise UserError(f"data.root: {source}, line {number}: {image} is not in {val} (no {image}.JPEG)")
    unlabelled = sorted(stems[stem] for stem in stems if stem not in labels)
    if unlabelled:
        raise UserError(f"data.root: {val / unlabelled[0]}: not labelled by {source} ({len(unlabelled)} of "
                        f"the {len(stems)} images in {val} are not)")
    top = str(val)
    return sorted((os.path.join(top, stems[image]), index[wnid]) for image, (wnid, _) in labels.items())


def _read_lines(path: Path, encoding: str) -> list[str]:
    try:
        return path.read_text(encoding=encoding).splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"data.root: {path}: unreadable ({type(exc).__name__})") from None
