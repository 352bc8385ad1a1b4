"""The graph: a :class:`Pipeline` expanded into :class:`Stage` s, one run each.

:func:`expand` is pure (no file is read but the pipeline's recipes, for an architecture): per
seed and sweep point it adds the teachers, then the nasty teachers (after their adversaries),
then the defence rows (no stage: they serve another row's model), then per student column its
baseline and one student per row. A stage's folder is named by what shapes it (kind, label, the
teacher it learns from, the sweep values that reach it), so a stage a sweep does not reach is
made once and shared by every point.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from nt_dist.errors import UserError
from nt_dist.pipeline.schema import (
    BASELINE_ROW,
    KINDS,
    TEACHER_COLUMN,
    Overrides,
    Pipeline,
    PipelineSpec,
    StudentSpec,
    SweepSpec,
    TeacherSpec,
    slug,
)
from nt_dist.yamlio import read_yaml_file, safe_load

Sweep = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Stage:
    """One run of the graph. ``row``/``column`` place its result in the table: a teacher's
    column is ``teacher``; a baseline's row is ``student baseline``."""

    name: str  # unique within the pipeline: seed<k>/<kind>/<label>[/<teacher>][/<sweep>]
    kind: str
    row: str
    column: str
    seed: int
    sweep: tuple[tuple[str, Any], ...]  # the sweep values that reach this stage
    recipe: Path
    overrides: tuple[str, ...]
    output_dir: Path
    needs: tuple[str, ...] = ()  # names of the stages whose models it reads
    reference_row: str = ""  # nasty: its adversary's row; self-student: the row's normal teacher
    tags: dict[str, str] = field(default_factory=dict, hash=False)  # its MLflow tags (also in its overrides)

    @property
    def log_name(self) -> str:
        """The stage's log file name under ``<output_dir>/logs/`` (without the suffix)."""
        return self.name.replace("/", "__")


def output_root(stages: list[Stage]) -> Path:
    """The pipeline's output folder (every stage folder is <root>/seed<k>/...)."""
    return stages[0].output_dir.parents[len(Path(stages[0].name).parts) - 1] if stages else Path(".")


# ----------------------------------------------------------------------------- overrides and sweeps


def _value_text(value: Any) -> str:
    """An override's value as ``--set`` reads it back (YAML): JSON for everything but plain strings."""
    if isinstance(value, str):
        try:
            if safe_load(value) == value:
                return value
        except (yaml.YAMLError, RecursionError):  # not YAML, an alias, a key twice: quoted
            pass
    return json.dumps(value)


def _overrides(tree: Overrides) -> list[str]:
    return [f"{key}={_value_text(value)}" for key, value in tree.items()]


def sweep_targets(key: str, entry: list[Any] | SweepSpec) -> tuple[list[Any], tuple[str, ...]]:
    """The values of a sweep key and the stage kinds it changes."""
    if isinstance(entry, SweepSpec):
        values, stages = entry.values, entry.stages
    else:
        values, stages = entry, None
    if stages is None:
        section = key.split(".", 1)[0]
        stages = {"nasty": ["nasty"], "distill": ["student"]}.get(section, list(KINDS))
    return list(values), tuple(stages)


def sweep_points(p: Pipeline) -> list[dict[str, Any]]:
    """The cartesian product of the sweep's values (``[{}]`` without a sweep)."""
    keys = list(p.spec.sweep)
    values = [sweep_targets(k, p.spec.sweep[k])[0] for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def _architecture(p: Pipeline, entry: TeacherSpec) -> str:
    """``model.name`` of a teacher entry: its ``set``, the pipeline's ``set``, else its recipe file."""
    for overrides in (entry.set, p.spec.set):
        if isinstance(overrides.get("model.name"), str):
            return overrides["model.name"]
    try:
        tree, _ = read_yaml_file(p.recipe_path(entry.recipe), "recipe")
        return str(tree["model"]["name"])
    except (UserError, KeyError, TypeError):  # the stage's own run reports what is wrong with the file
        return ""


# ----------------------------------------------------------------------------- building stages


class _Row(NamedTuple):
    """A row of the table as its students see it."""

    stage: Stage | None  # the stage that trains its model; None for a given model
    architecture: str  # its model.name, or "" when unknown
    model: str  # where its model is (a stage folder or a given checkpoint)
    serve: Overrides  # what its students add: a defence row's serving settings


def _stage_name(seed: int, kind: str, label: str, via: str, sweep: Sweep) -> str:
    parts = [f"seed{seed}", kind, slug(label)] + ([slug(via)] if via else [])
    if sweep:
        parts.append("_".join(f"{slug(k)}-{slug(str(v))}" for k, v in sweep))
    return "/".join(parts)


def _tags(spec: PipelineSpec, kind: str, row: str, column: str, seed: int, sweep: Sweep,
          reference_row: str) -> dict[str, str]:
    tags = {"table": spec.pipeline, "row": row, "column": column, "seed": str(seed), "stage": kind,
            **{f"sweep.{k}": str(v) for k, v in sweep}}
    if reference_row:
        tags["reference_row"] = reference_row
    if spec.paper:
        tags["paper"] = spec.paper
    return tags


@dataclass
class _Graph:
    """The stages of one :func:`expand` call, by name in the order they were added, and what
    every stage shares."""

    p: Pipeline
    out: Path
    extra: list[str]
    targets: dict[str, tuple[str, ...]]  # sweep key -> the stage kinds it reaches
    stages: dict[str, Stage] = field(default_factory=dict)

    def reach(self, kind: str, point: dict[str, Any], upstream: Sweep = ()) -> Sweep:
        """The sweep values that shape a stage: its own kind's and those of the stage it reads."""
        own = tuple((k, v) for k, v in point.items() if kind in self.targets[k])
        return tuple(sorted(set(own) | set(upstream), key=lambda kv: list(point).index(kv[0])))

    def add(self, kind: str, label: str, row: str, column: str, seed: int, sweep: Sweep, recipe: str,
            entry_set: Overrides, managed: dict[str, Any], needs: tuple[str, ...] = (), via: str = "",
            reference_row: str = "") -> Stage:
        """The stage of that name, made once. Overrides apply in order: the pipeline's ``set``, the
        entry's ``set``, ``extra``, the sweep's values, then what the pipeline manages."""
        spec = self.p.spec
        name = _stage_name(seed, kind, label, via, sweep)
        if name in self.stages:
            return self.stages[name]
        folder = self.out / name
        tags = _tags(spec, kind, row, column, seed, sweep, reference_row)
        # run.stale: a stage whose input model was retrained is trained again, never kept
        managed = {"run.seed": seed, "run.output_dir": str(folder), "run.name": f"{spec.pipeline}/{name}",
                   "run.stale": "replace",
                   "tracking.experiment": self.p.experiment, "tracking.tags": tags, **managed}
        overrides = (*_overrides(spec.set), *_overrides(entry_set), *self.extra, *_overrides(dict(sweep)),
                     *_overrides(managed))
        stage = Stage(name, kind, row, column, seed, sweep, self.p.recipe_path(recipe), overrides, folder, needs,
                      reference_row, tags)
        self.stages[name] = stage
        return stage


def _teachers(g: _Graph, seed: int, point: dict[str, Any]) -> dict[str, _Row]:
    """The normal teachers' rows: a stage each, or the given model."""
    rows: dict[str, _Row] = {}
    for label, t in g.p.spec.teachers.items():
        if t.checkpoint:
            rows[label] = _Row(None, _architecture(g.p, t), str(Path(t.checkpoint).resolve()), {})
            continue
        stage = g.add("teacher", label, label, TEACHER_COLUMN, seed, g.reach("teacher", point), t.recipe, t.set,
                      {"run.role": "teacher"})
        rows[label] = _Row(stage, _architecture(g.p, t), str(stage.output_dir), {})
    return rows


def _nasty(g: _Graph, seed: int, point: dict[str, Any], rows: dict[str, _Row]) -> None:
    """The nasty teachers' rows, each trained after (and against) its adversary's model."""
    for label, n in g.p.spec.nasty.items():
        adversary = rows[n.adversary]
        upstream = adversary.stage.sweep if adversary.stage is not None else ()
        stage = g.add("nasty", label, label, TEACHER_COLUMN, seed, g.reach("nasty", point, upstream), n.recipe,
                      n.set, {"run.role": "nasty", "nasty.adversary_checkpoint": adversary.model},
                      (adversary.stage.name,) if adversary.stage is not None else (), reference_row=n.adversary)
        rows[label] = _Row(stage, _architecture(g.p, n), str(stage.output_dir), {})


def _defences(spec: PipelineSpec, rows: dict[str, _Row]) -> None:
    """The defence rows: another row's model, served with the defence's settings (no stage)."""
    for label, d in spec.defences.items():
        rows[label] = rows[d.teacher]._replace(serve=d.set)


def _normal_row(spec: PipelineSpec, row: str) -> str:
    """The normal teacher behind a row: itself, a nasty row's adversary, a defence's teacher's."""
    base = spec.defences[row].teacher if row in spec.defences else row
    return spec.nasty[base].adversary if base in spec.nasty else base


def _student(g: _Graph, seed: int, point: dict[str, Any], column: str, s: StudentSpec, row: str,
             teacher: _Row) -> None:
    """The student of ``column`` distilled from ``row``'s model."""
    managed: dict[str, Any] = {**teacher.serve, "run.role": "student", "distill.teacher_checkpoint": teacher.model}
    reference = ""
    if s.self:
        if not teacher.architecture:
            raise UserError(f"{g.p.path}: students.{column}.self: the row {row!r} does not set "
                            "model.name, so its architecture is unknown here")
        managed["model.name"] = teacher.architecture
        reference = _normal_row(g.p.spec, row)
    upstream = teacher.stage.sweep if teacher.stage is not None else ()
    g.add("student", column, row, column, seed, g.reach("student", point, upstream), s.recipe, s.set, managed,
          (teacher.stage.name,) if teacher.stage is not None else (), via=row, reference_row=reference)


def _students(g: _Graph, seed: int, point: dict[str, Any], rows: dict[str, _Row]) -> None:
    """Per student column: its baseline (trained alone), then a student per row it learns from."""
    spec = g.p.spec
    distilled = [r for r, entry in [*spec.teachers.items(), *spec.nasty.items()] if entry.distill]
    distilled += list(spec.defences)
    for column, s in spec.students.items():
        if s.baseline and not s.self:
            g.add("baseline", column, BASELINE_ROW, column, seed, g.reach("baseline", point), s.recipe, s.set,
                  {"run.role": "baseline"})
        for row in (s.teachers if s.teachers is not None else distilled):
            _student(g, seed, point, column, s, row, rows[row])


def expand(p: Pipeline, *, seeds: Iterable[int] | None = None, extra: Iterable[str] = (),
           output_dir: str | None = None) -> list[Stage]:
    """Every stage of the graph, dependencies before dependants, each once.

    Overrides apply in order: the recipe file, the pipeline's ``set``, the entry's ``set``,
    ``extra`` (the command line's ``--set``), the sweep's values, then what the pipeline
    manages (seed, folder, names, tags, the teacher or adversary checkpoint)."""
    spec = p.spec
    g = _Graph(p, Path(output_dir or spec.output_dir or f"runs/{spec.pipeline}"), list(extra),
               {k: sweep_targets(k, v)[1] for k, v in spec.sweep.items()})
    for seed in (list(seeds) if seeds is not None else spec.seeds):
        for point in sweep_points(p):
            rows = _teachers(g, seed, point)
            _nasty(g, seed, point, rows)
            _defences(spec, rows)
            _students(g, seed, point, rows)
    return list(g.stages.values())
