"""What each reported run changed against the paper's recipe, and what it really trained.

A run records its resolved recipe (``resolved_recipe.yaml`` in its folder; the same sections as
MLflow params) and its network (``model.safetensors`` metadata ``architecture``; the MLflow tag
``architecture``). The paper's recipe for a cell is the stage of the same kind, row and column in
the paper's pipeline file under ``recipes/paper/`` (the one named like the run's pipeline, else
the one reproducing the same paper table), resolved as ``nt-dist pipeline`` would; for a run of a
pipeline of its own, the ``recipes/paper/`` recipe file it was trained from. Every key that
differs is an override, except where a run lives and how it is logged (:data:`IGNORED`) and what
the paper's pipeline sweeps itself. A run that trained on less than the paper's recipe (fewer
epochs, a step cap, a subset of the training data: :data:`FEWER`, :data:`CAPS`) is *shrunk*.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from nt_dist.errors import UserError
from nt_dist.report_paper import label_architecture

Override = tuple[str, str, str]  # (key, ours, the paper's), as MLflow params spell values

# where a run lives, how it is named, logged and fed: not a change to what it trains
IGNORED = frozenset({
    "run.name", "run.output_dir", "run.seed", "run.role", "run.stale", "run.resume", "run.progress",
    "run.description", "run.checkpoint_every_steps", "run.keep_last", "data.root", "data.cache_dir",
    "data.ffcv_dir", "data.num_workers", "data.loader", "data.eval_batch_size", "model.compile",
    "model.channels_last", "nasty.adversary_checkpoint", "distill.teacher_checkpoint", "nasty.cache_logits",
    "distill.cache_logits"})
FEWER = ("run.epochs", "datafree.steps_per_epoch", "datafree.batches", "datafree.inversion_steps")
CAPS = ("run.max_steps", "data.train_subset")  # 0: no cap
SHRUNK_NOTE = ("† trained on less than the paper's recipe (fewer epochs, a step cap or a subset of the training "
               "data; the overrides are listed below the tables): not comparable with the paper's figure")


def param_text(value: Any) -> str:
    """A recipe value as an MLflow param holds it (``nt_dist.tracking`` logs them so)."""
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]


def override_text(override: Override) -> str:
    key, ours, paper = override
    return f"{key}: {ours} (paper {paper})"


# ----------------------------------------------------------------------------- the paper's recipes


def paper_dir() -> Path | None:
    """``recipes/paper/`` of this installation, or None where none is installed."""
    from nt_dist.quickstart import recipes_dir

    try:
        folder = recipes_dir() / "paper"
    except FileNotFoundError:
        return None
    return folder if folder.is_dir() else None


@cache
def _paper_pipelines() -> tuple[tuple[str, str, Path], ...]:
    """(pipeline name, paper table key, file) of every pipeline file under ``recipes/paper/``."""
    from nt_dist.yamlio import read_yaml_file

    folder, found = paper_dir(), []
    for path in sorted(folder.glob("*.yaml")) if folder else []:
        try:
            tree, _ = read_yaml_file(path, "pipeline file")
        except UserError:
            continue
        if isinstance(tree, dict) and "pipeline" in tree:
            found.append((str(tree["pipeline"]), str(tree.get("paper") or ""), path))
    return tuple(found)


def paper_pipeline_file(name: str, paper: str = "") -> Path | None:
    """The paper's pipeline file a report of pipeline ``name`` (of paper table ``paper``) is held
    against: the one of that name, else the one reproducing that table (``<paper>.yaml`` first)."""
    pipelines = _paper_pipelines()
    for pipeline, _, path in pipelines:
        if pipeline == name:
            return path
    same = sorted((path for _, key, path in pipelines if paper and key == paper),
                  key=lambda path: (path.stem != paper, path.name))
    return same[0] if same else None


@cache
def _pipeline_stages(path: Path) -> tuple[dict[tuple[str, str, str], tuple[Path, tuple[str, ...]]], frozenset[str]]:
    """The paper pipeline's stages by (kind, row, column) (the first sweep point's), and its swept keys."""
    from nt_dist.pipeline import expand, load_pipeline

    p = load_pipeline(path)
    stages: dict[tuple[str, str, str], tuple[Path, tuple[str, ...]]] = {}
    for stage in expand(p, seeds=[0]):
        stages.setdefault((stage.kind, stage.row, stage.column), (stage.recipe, stage.overrides))
    return stages, frozenset(p.spec.sweep)


@cache
def _resolved(recipe: Path, overrides: tuple[str, ...]) -> dict[str, str] | None:
    from nt_dist.config import flatten, load_recipe, recipe_to_dict

    try:
        return {k: param_text(v) for k, v in flatten(recipe_to_dict(load_recipe(recipe, list(overrides)))).items()}
    except UserError:
        return None


def reference(name: str, paper: str, kind: str, row: str, column: str,
              source: str) -> tuple[dict[str, str], frozenset[str], bool] | None:
    """The paper's recipe of a cell, flattened: (params, the keys the paper's pipeline sweeps,
    whether it is the cell's own stage there rather than the bare recipe file); None where the
    run has no paper recipe."""
    path = paper_pipeline_file(name, paper)
    try:
        stages, swept = _pipeline_stages(path) if path else ({}, frozenset())
    except UserError:
        stages, swept = {}, frozenset()
    if (kind, row, column) in stages:
        params = _resolved(*stages[kind, row, column])
        return (params, swept, True) if params is not None else None
    folder = paper_dir()
    if not source or folder is None or not Path(source).resolve().is_relative_to(folder.resolve()):
        return None
    params = _resolved(Path(source).resolve(), ())
    return (params, frozenset(), False) if params is not None else None


# ----------------------------------------------------------------------------- a run against it


def differences(ours: dict[str, str], paper: dict[str, str], skip: Iterable[str] = ()) -> tuple[Override, ...]:
    """(key, ours, the paper's) for every key both record that differs, in the run's order."""
    skipped = IGNORED | set(skip)
    return tuple((key, value, paper[key]) for key, value in ours.items()
                 if key in paper and value != paper[key] and key not in skipped and not key.startswith("tracking."))


def is_shrunk(overrides: Iterable[Override]) -> bool:
    """Whether any override trains on less than the paper: fewer epochs or steps, a cap the paper
    has not (or a lower one)."""
    for key, ours, paper in overrides:
        try:
            mine, theirs = float(ours), float(paper)
        except ValueError:
            continue
        if (key in FEWER and mine < theirs) or (key in CAPS and mine > 0 and (theirs == 0 or mine < theirs)):
            return True
    return False


@dataclass(frozen=True)
class Provenance:
    ran: str = ""  # the architecture the run trained, where it is not the one its label names
    overrides: tuple[Override, ...] = ()  # against the paper's recipe, but for the run's own sweep keys
    shrunk: bool = False
    compared: bool = False  # whether the run recorded a recipe and the paper has one for it


def provenance(kind: str, row: str, column: str, sweep: Iterable[str], name: str, paper: str, source: str,
               architecture: str, params: dict[str, str]) -> Provenance:
    """A run's overrides against the paper's recipe and the check of its label against the
    architecture it recorded. ``sweep``: the run's own swept keys (named in its table's heading,
    so not listed; they still make it shrunk); ``source``: the recipe file it was trained from."""
    ref = reference(name, paper, kind, row, column, source) if params or architecture else None
    label = row if kind in ("teacher", "nasty") else column
    expected = label_architecture(label) or (ref[0].get("model.name", "") if ref and ref[2] else "")
    ran = architecture if architecture and expected and architecture != expected else ""
    if ref is None or not params:
        return Provenance(ran)
    every = differences(params, ref[0], ref[1])
    own = set(sweep)
    return Provenance(ran, tuple(o for o in every if o[0] not in own), is_shrunk(every), True)


def stage_record(folder: Path) -> tuple[str, dict[str, str]]:
    """(architecture, params) a finished run folder records: its model file's ``architecture``
    (else its recipe's ``model.name``) and its resolved recipe's logged sections; ("", {}) for
    a folder without a readable ``resolved_recipe.yaml``."""
    from nt_dist.checkpoint import MODEL_FILE, read_model_metadata
    from nt_dist.config import recipe_from_dict
    from nt_dist.lineage import run_params
    from nt_dist.rundir import RECIPE_FILE
    from nt_dist.yamlio import read_yaml_file

    try:
        tree, _ = read_yaml_file(folder / RECIPE_FILE, "recipe")
        recipe = recipe_from_dict(tree, source=str(folder / RECIPE_FILE))
    except (UserError, AttributeError, TypeError):  # absent, unreadable, not a recipe
        return "", {}
    architecture = recipe.model.name
    if (folder / MODEL_FILE).is_file():
        try:
            architecture = read_model_metadata(folder / MODEL_FILE, str(folder / MODEL_FILE)).get(
                "architecture") or architecture
        except (UserError, OSError, ValueError):  # a model file the run's own users will hear about
            pass
    return architecture, {k: param_text(v) for k, v in run_params(recipe).items()}
