"""The paper as data for ``nt-dist report``: its printed tables (``nt_dist/paper_tables.yaml``),
what its labels name in our model registry, and where each ablation sweep meets a table.

Ma et al. plot their ablations (ω, τ_A, τ_s, α, the share of training data) as figures whose
numbers are not transcribed (``../shared/PAPER.md`` holds only the tables). Each of our ablation
pipelines (``recipes/paper/ablation_*.yaml``) keeps every setting of a table but the swept one,
and its sweep passes through that table's setting: the table's figures there are the one
published point of each of its curves, which the sweep plots draw beside ours.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from nt_dist.pipeline import BASELINE_ROW, TEACHER_COLUMN
from nt_dist.yamlio import parse_yaml

# The paper's names for its networks -> our ``model.name``; a label is checked against the
# architecture its models record when it is one of these names or starts with one and a space
# ("ResNet-18 nasty", "ResNet-18 (CNN)": Table 4's nasty ResNet-18 trained against a CNN).
ARCHITECTURES = {
    "CNN": "cifar_cnn",
    "ResNetC-20": "cifar_resnet20",
    "ResNetC-32": "cifar_resnet32",
    "ResNet-18": "cifar_resnet18",
    "ResNet-34": "cifar_resnet34",
    "ResNet-50": "cifar_resnet50",
    "ResNeXt-29": "cifar_resnext29",
    "ShuffleNetV2": "cifar_shufflenetv2",
    "MobileNetV2": "cifar_mobilenetv2",
}

# pipeline -> swept key -> (the table whose setting it passes through, the swept value there)
SWEEPS: dict[str, dict[str, tuple[str, float]]] = {
    "ablation_omega": {"nasty.omega": ("table1", 0.004)},           # CIFAR-10: ω = 0.004 (paper)
    "ablation_tau_a": {"nasty.tau": ("table1", 4.0)},               # τ_A = 4
    "ablation_tau_s_cifar10": {"distill.tau": ("table1", 4.0)},     # τ_s = τ_A = 4
    "ablation_tau_s_cifar100": {"distill.tau": ("table2", 20.0)},   # CIFAR-100: τ_s = τ_A = 20
    "ablation_alpha": {"distill.alpha": ("table1", 0.9)},           # α = 0.9
    "ablation_share": {"data.train_subset": ("table1", 50000.0)},   # all 50,000 training images
}


@cache
def paper_tables() -> dict[str, Any]:
    """The paper's Tables 1-6 as shipped in the package (``nt_dist/paper_tables.yaml``)."""
    text = resources.files("nt_dist").joinpath("paper_tables.yaml").read_text(encoding="utf-8")
    return parse_yaml(text, "nt_dist/paper_tables.yaml")


def paper_cell(table: str, row: str, column: str) -> tuple[float, float | None] | None:
    entry = paper_tables().get(table, {}).get("rows", {}).get(row, {}).get(column)
    return (float(entry[0]), None if entry[1] is None else float(entry[1])) if entry else None


def label_architecture(label: str) -> str:
    """The ``model.name`` a paper label (or a label that is one of our names) stands for; "" for
    another label ("self", "DAFL student", "mlp")."""
    names = {**ARCHITECTURES, **{name: name for name in ARCHITECTURES.values()}}
    for name in sorted(names, key=len, reverse=True):
        if label == name or label.startswith(name + " "):
            return names[name]
    return ""


def series_label(row: str, column: str) -> str:
    """A cell as a sweep plot names its line: ``CNN alone``, ``CNN ← ResNet-18 nasty``, or the
    teacher row's own label."""
    if column == TEACHER_COLUMN:
        return row
    return f"{column} alone" if row == BASELINE_ROW else f"{column} ← {row}"


def paper_points(pipeline: str, key: str) -> tuple[str, dict[str, tuple[float, float]]]:
    """Where the paper published a point of the ``pipeline``'s curves against ``key``: a caption
    (``Table 1 at nasty.omega = 0.004``) and series label -> (x, top-1); ("", {}) where it did not."""
    table, at = SWEEPS.get(pipeline, {}).get(key, ("", 0.0))
    if table not in paper_tables():
        return "", {}
    points = {series_label(row, column): (at, float(cell[0]))
              for row, cells in paper_tables()[table]["rows"].items() for column, cell in cells.items()}
    caption = f"{paper_tables()[table]['title'].split(':')[0]} at {key} = {at:g}"
    return caption, points
