"""Figures: the paper's logit-response figure and the report's sweep plots (PNG, Agg, no pyplot).

:func:`plot_logits` draws Fig. 1 of Ma et al. (ICLR 2021, "Undistillable"): for a few
evaluation images, the temperature softmax ``softmax(logits / tau)`` of a normal teacher next
to that of a nasty one, at the nasty teacher's own τ_A unless told otherwise
(:func:`nasty_tau`), each teacher's wrong top-1 marked. The numbers behind the picture come
from :func:`responses` (and the pure :func:`softmax_responses`, :func:`misclassified`), so they
can be checked without looking at pixels; the PNG's metadata repeats them (:func:`logits_metadata`).
:func:`sweep_plot` draws accuracy-versus-hyperparameter lines with error bars.

Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas: no pyplot, no global
backend switch, nothing left open. Every PNG is written through a temporary file in the same
folder and renamed into place, so a reader never sees half a picture.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from nt_dist.checkpoint import load_frozen_model, read_model_metadata, resolve_model_file
from nt_dist.data import DATASETS, build_dataset, num_classes_of
from nt_dist.data.transforms import EVAL_CROP_RATIO, Normalise, build_transform
from nt_dist.errors import UserError
from nt_dist.frozen_network import frozen_logits
from nt_dist.models import build_model
from nt_dist.rundir import RECIPE_FILE
from nt_dist.yamlio import read_yaml_file

__all__ = ["log_x", "misclassified", "nasty_tau", "plot_logits", "responses", "softmax_responses", "sweep_figure",
           "sweep_plot"]

Point = tuple[float, float, float]  # (x, mean, std)

LOG_X_RATIO = 50.0  # a sweep whose positive x span this factor or more gets a log x axis
HIGHLIGHT, PLAIN = "tab:red", "tab:gray"
DEFAULT_TAU = 4.0  # the paper's τ_A on CIFAR-10, for a nasty teacher that records none
ROLES = ("normal", "nasty")


# ============================================================================ numbers


def softmax_responses(logits: Tensor, tau: float) -> Tensor:
    """``softmax(logits / tau)`` over the last dimension, in fp32: the responses a student
    distilling at temperature ``tau`` sees."""
    return torch.softmax(logits.float() / _checked_tau(tau), dim=-1)


def _checked_tau(tau: Any) -> float:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise UserError(f"--tau: must be a positive number, got {tau!r}")
    return float(tau)


def pick_indices(targets: Sequence[int], count: int, seed: int) -> list[int]:
    """``count`` sample indices drawn deterministically from ``seed``: one per class while
    classes remain (classes and their samples both in a seeded random order), then further
    samples in the same order."""
    if count < 1:
        raise UserError(f"--count: must be at least 1, got {count}")
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen: list[int] = []
    seen: set[int] = set()
    for index in order:
        if int(targets[index]) not in seen:
            seen.add(int(targets[index]))
            chosen.append(index)
            if len(chosen) == count:
                return chosen
    taken = set(chosen)
    chosen += [index for index in order if index not in taken][:count - len(chosen)]
    return chosen


def misclassified(labels: Tensor, logits: Tensor) -> list[int]:
    """The rows whose top-1 (argmax of ``logits``, [N, classes]) is not ``labels`` ([N])."""
    return [int(i) for i in (logits.argmax(dim=-1) != labels).nonzero().flatten()]


def _recorded(model_file: Path, section: str) -> dict[str, Any]:
    """A section of the run folder's ``resolved_recipe.yaml`` beside ``model_file``, or {} (a
    bare model file, or an unreadable recipe)."""
    try:
        tree, _ = read_yaml_file(model_file.parent / RECIPE_FILE, "recipe")
    except UserError:  # no such file, unreadable, not YAML
        return {}
    found = tree.get(section) if isinstance(tree, dict) else None
    return found if isinstance(found, dict) else {}


def _recorded_data(model_file: Path) -> dict[str, Any]:
    return _recorded(model_file, "data")


def nasty_tau(nasty: Path, tau: float | None = None) -> tuple[float, str]:
    """The τ to draw at and where it came from, for the title: ``tau`` when given (``--tau``);
    else the τ_A the nasty teacher was trained with, from its model file's metadata (``tau_a``)
    or, in its run folder, ``nasty.tau`` of ``resolved_recipe.yaml`` when that run's
    ``run.role`` is nasty; else 4.0, the paper's CIFAR-10 τ_A. A corrupt ``tau_a`` is a UserError."""
    if tau is not None:
        return _checked_tau(tau), "--tau"
    model_file = resolve_model_file(str(nasty), "nasty")
    recorded = read_model_metadata(model_file, "nasty").get("tau_a")
    if recorded is not None:
        try:
            value = float(recorded)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"nasty: {model_file}: corrupt metadata: tau_a is {recorded!r}, not a positive number")
        return value, "the nasty teacher's τ_A, from its metadata"
    if _recorded(model_file, "run").get("role") == "nasty":
        value = _recorded(model_file, "nasty").get("tau")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return float(value), f"the nasty teacher's τ_A, nasty.tau of its {RECIPE_FILE}"
    return DEFAULT_TAU, "default: the nasty teacher records no τ_A; --tau sets it"


def _describe_model(model_file: Path, key: str) -> dict[str, Any]:
    """What an exported model was trained on: data set, class count, image size, evaluation
    protocol (None where unknown). The model file's metadata first, then the run's recipe."""
    meta = read_model_metadata(model_file, key)  # the weights are read once, when the network is built
    recipe = _recorded_data(model_file)
    described: dict[str, Any] = {
        "dataset": meta.get("dataset") or recipe.get("name"),
        "num_classes": meta.get("num_classes"),
        # the evaluation resolution (data.eval_image_size, else data.image_size)
        "image_size": (meta.get("eval_image_size") or recipe.get("eval_image_size") or meta.get("image_size")
                       or recipe.get("image_size")),
        # evaluation resizes, except after rrc_flip training (centre crop of crop_ratio of the shorter side)
        "augment": recipe.get("augment"),
        "crop_ratio": float(meta.get("eval_crop_ratio") or recipe.get("eval_crop_ratio") or EVAL_CROP_RATIO),
        "root": recipe.get("root") or "",
    }
    for field in ("num_classes", "image_size"):
        value = described[field]
        if value is not None and not str(value).isdigit():
            raise UserError(f"{key}: {model_file}: corrupt metadata: {field} is {value!r}, not a count")
        described[field] = int(value) if value is not None else None
    return described


def _agree(normal: Path, nasty: Path, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The common description of both teachers; a field known for both that differs is a UserError."""
    common: dict[str, Any] = {}
    for field in ("dataset", "num_classes", "image_size"):
        if a[field] is not None and b[field] is not None and a[field] != b[field]:
            raise UserError(f"{normal} and {nasty} differ in {field}: {a[field]!r} vs {b[field]!r}; "
                            "compare teachers trained on the same data")
        common[field] = a[field] if a[field] is not None else b[field]
    protocols = {p for p in (_protocol(a["augment"]), _protocol(b["augment"])) if p}
    if len(protocols) > 1:
        raise UserError(f"{normal} and {nasty} differ in their evaluation transform (data.augment: "
                        f"{a['augment']!r} vs {b['augment']!r})")
    common["augment"] = "rrc_flip" if protocols == {"rrc"} else "none"
    common["root"] = a["root"] or b["root"]
    common["crop_ratio"] = a["crop_ratio"]
    for field, what in (("dataset", "data set"), ("image_size", "image size")):
        if common[field] is None:
            raise UserError(f"{normal} and {nasty} record no {what} (metadata {field!r}, no {RECIPE_FILE} "
                            "beside them); export them with nt-dist")
    return common


def _protocol(augment: Any) -> str | None:
    return None if augment is None else ("rrc" if augment == "rrc_flip" else "resize")


def responses(normal: Path, nasty: Path, *, tau: float | None = None, count: int = 4, data_root: str = "",
              split: str = "", seed: int = 0) -> dict[str, Any]:
    """Both teachers' temperature-softmax responses on ``count`` evaluation images, at ``tau``
    (None: the nasty teacher's own τ_A, see :func:`nasty_tau`).

    ``normal``/``nasty`` are run folders or ``model.safetensors`` files of exported teachers;
    they must agree on data set, class count and image size. The data set comes from their
    metadata; ``data_root`` is needed for any but digits (default: the root recorded in the
    run folder's recipe). ``split`` "" means the data set's evaluation split. Images go through
    the training's evaluation transform and normalisation; both networks run in eval mode, in
    fp32, on the CPU.

    Returns a dict: ``indices`` (into the split), ``labels`` ([N] int64), ``images`` (the
    normalised [N, 3, H, W] network input), ``pixels`` ([N, H, W, 3] uint8, what is shown),
    ``normal_logits``/``nasty_logits`` and ``normal_probs``/``nasty_probs`` ([N, classes]),
    ``normal_wrong``/``nasty_wrong`` (the rows whose top-1 is not the label), ``class_names``,
    ``tau`` and ``tau_source`` (what chose it), ``dataset``, ``split``.
    """
    files = resolve_model_file(str(normal), "normal"), resolve_model_file(str(nasty), "nasty")
    tau, tau_source = nasty_tau(files[1], tau)
    _checked_tau(tau)  # a bad --tau fails before any data is read
    common = _agree(normal, nasty, _describe_model(files[0], "normal"), _describe_model(files[1], "nasty"))
    name = common["dataset"]
    spec = DATASETS.get(name)
    if spec is None:
        raise UserError(f"{files[0]}: unknown data set {name!r} in its metadata; expected one of: {', '.join(DATASETS)}")
    root = data_root or common["root"]
    if spec.needs_root and not root:
        raise UserError(f"--data-root: required for the {name} data set of {normal} and {nasty}")
    split = split or spec.eval_split
    dataset = build_dataset(name, root, split)
    classes = num_classes_of(dataset)
    indices = pick_indices(dataset.targets, count, seed)
    transform = build_transform(name, common["augment"], common["image_size"], train=False,
                                crop_ratio=common["crop_ratio"])
    samples = [dataset[i] for i in indices]
    pixels = torch.stack([transform(image) for image, _ in samples])  # uint8 [N, 3, H, W]
    images = Normalise(name, torch.device("cpu"))(pixels)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    result: dict[str, Any] = {"indices": indices, "labels": labels, "images": images,
                              "pixels": pixels.permute(0, 2, 3, 1).contiguous(), "class_names": list(dataset.classes),
                              "tau": tau, "tau_source": tau_source, "dataset": name, "split": split}
    for role, file in zip(ROLES, files, strict=True):
        network, _ = load_frozen_model("", str(file), classes, role, build_model)
        logits = frozen_logits(network.cpu().float(), images, "fp32")
        result[f"{role}_logits"] = logits
        result[f"{role}_probs"] = softmax_responses(logits, tau)
        result[f"{role}_wrong"] = misclassified(labels, logits)
    return result


# ============================================================================ figures


def _class_name(names: list[str], index: int) -> str:
    return names[index] if index < len(names) else str(index)


def logits_figure(data: dict[str, Any]) -> Figure:
    """One row per image: the image, then the normal and the nasty teacher's responses as bars,
    the true class in red; both bar charts of a row share their y scale. A teacher whose top-1
    is wrong gets its top-1 bar edged in red and a red "✗ top-1: <class>" under its panel."""
    n, classes = data["normal_probs"].shape
    tau, names = data["tau"], data["class_names"]
    bars = min(max(0.25 * classes, 3.0), 7.0)  # inches per bar chart
    fig = Figure(figsize=(1.8 + 2 * bars, 1.9 * n + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 3, squeeze=False, gridspec_kw={"width_ratios": [1.0, 3.0, 3.0]})
    for row in range(n):
        label = int(data["labels"][row])
        image_ax = axes[row][0]
        image_ax.imshow(data["pixels"][row].numpy(), interpolation="nearest")
        image_ax.set_title(f"true: {_class_name(names, label)}", fontsize=9)
        image_ax.set_xticks([])
        image_ax.set_yticks([])
        top = max(float(data["normal_probs"][row].max()), float(data["nasty_probs"][row].max()))
        for col, role in enumerate(ROLES, start=1):
            ax = axes[row][col]
            probs = data[f"{role}_probs"][row].numpy()
            colours = [HIGHLIGHT if c == label else PLAIN for c in range(classes)]
            drawn = ax.bar(range(classes), probs, color=colours, width=0.8)
            ax.set_ylim(0, min(1.0, top * 1.15) or 1.0)
            ax.set_title(f"{role} teacher, softmax(z/τ), τ={tau:g}", fontsize=9)
            if row in data[f"{role}_wrong"]:
                predicted = int(data[f"{role}_logits"][row].argmax())
                drawn[predicted].set_edgecolor(HIGHLIGHT)
                drawn[predicted].set_linewidth(2.0)
                # below the axis, where no bar can reach it
                ax.set_xlabel(f"✗ top-1: {_class_name(names, predicted)}", fontsize=8, color=HIGHLIGHT,
                              fontweight="bold")
            if classes <= 20:
                ax.set_xticks(range(classes), [_class_name(names, c) for c in range(classes)],
                              fontsize=7, rotation=0 if max(len(s) for s in names[:classes]) <= 3 else 60)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{logits_title(data)}\n{_wrong_summary(data)}", fontsize=10)
    return fig


def logits_title(data: dict[str, Any]) -> str:
    """The figure's title: data set, split, τ and what chose it."""
    return f"{data['dataset']} {data['split']}: normal vs nasty teacher, τ={data['tau']:g} ({data['tau_source']})"


def _wrong_summary(data: dict[str, Any]) -> str:
    n = len(data["labels"])
    return ", ".join(f"{role}: top-1 wrong on {len(data[f'{role}_wrong'])} of {n}" for role in ROLES)


def logits_metadata(data: dict[str, Any]) -> dict[str, str]:
    """What the PNG records (``PIL.Image.open(path).text``): ``Title``, ``Description``, ``Tau``,
    ``TauSource``, and per teacher ``MisclassifiedNormal``/``MisclassifiedNasty``, the count of
    images whose top-1 is wrong."""
    return {"Title": logits_title(data), "Description": _wrong_summary(data), "Tau": f"{data['tau']:g}",
            "TauSource": data["tau_source"],
            **{f"Misclassified{role.capitalize()}": str(len(data[f"{role}_wrong"])) for role in ROLES}}


def plot_logits(normal: Path, nasty: Path, out: Path, *, tau: float | None = None, count: int = 4,
                data_root: str = "", split: str = "", seed: int = 0) -> Path:
    """Draw the normal and the nasty teacher's ``softmax(logits / tau)`` on ``count`` evaluation
    images (Fig. 1 of Ma et al.) into the PNG ``out``; ``tau`` None: the nasty teacher's τ_A
    (:func:`nasty_tau`); see :func:`responses`, :func:`logits_metadata`. Returns ``out``."""
    data = responses(normal, nasty, tau=tau, count=count, data_root=data_root, split=split, seed=seed)
    return save_png(logits_figure(data), Path(out), metadata=logits_metadata(data))


def log_x(xs: Sequence[float]) -> bool:
    """Whether a sweep over ``xs`` wants a log x axis: all positive and spanning >= 50x."""
    finite = [x for x in xs if math.isfinite(x)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= LOG_X_RATIO


def sweep_figure(*, title: str, xlabel: str, ylabel: str, series: dict[str, list[Point]]) -> Figure:
    """One line per series through its (x, mean) points, sorted by x, with ±std error bars
    (a missing or non-finite std draws none); log x axis per :func:`log_x`; legend, grid."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [float(x) for points in series.values() for x, _, _ in points]
    for label, points in series.items():
        if not points:
            continue
        ordered = sorted((float(x), float(m), float(s)) for x, m, s in points)
        ax.errorbar([p[0] for p in ordered], [p[1] for p in ordered],
                    yerr=[p[2] if math.isfinite(p[2]) else 0.0 for p in ordered],
                    marker="o", markersize=4, capsize=3, linewidth=1.5, label=label)
    if log_x(xs):
        ax.set_xscale("log")
    if not xs:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color=PLAIN)
    elif any(points for points in series.values()):
        ax.legend(fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def sweep_plot(path: Path, *, title: str, xlabel: str, ylabel: str, series: dict[str, list[Point]]) -> Path:
    """Write :func:`sweep_figure` as the PNG ``path``; returns ``path``."""
    return save_png(sweep_figure(title=title, xlabel=xlabel, ylabel=ylabel, series=series), Path(path))


def save_png(fig: Figure, path: Path, dpi: int = 110, *, metadata: dict[str, str] | None = None,
             tight: bool = False) -> Path:
    """Write ``fig`` as a PNG through a temporary file in the same folder and a rename;
    ``metadata``: PNG text chunks; ``tight``: crop to what is drawn (a legend outside the axes)."""
    if path.is_dir():
        raise UserError(f"{path} is a folder; name the PNG file to write")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png", dpi=dpi, metadata=metadata, bbox_inches="tight" if tight else None)
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"{path}: cannot write the figure ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
