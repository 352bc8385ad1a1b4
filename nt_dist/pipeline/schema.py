"""The pipeline file: its schema (pydantic models), :func:`load_pipeline` and the rules a file
must keep beyond its types (references between sections, reserved and duplicate labels, recipe
files that exist, folder names that stay distinct).

Nothing here builds stages: :mod:`nt_dist.pipeline.graph` expands a :class:`Pipeline`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import ConfigDict, Field

from nt_dist.errors import UserError
from nt_dist.yamlio import read_yaml_file

Kind = Literal["teacher", "nasty", "student", "baseline"]
KINDS: tuple[str, ...] = ("teacher", "nasty", "student", "baseline")
BASELINE_ROW = "student baseline"
TEACHER_COLUMN = "teacher"
_STRICT = ConfigDict(extra="forbid", frozen=True)
Overrides = dict[str, Any]


class TeacherSpec(pydantic.BaseModel):
    model_config = _STRICT
    recipe: str
    set: Overrides = Field(default_factory=dict)
    distill: bool = True  # false: only an adversary (no students, not a row)
    # an existing model (model.safetensors or its run folder): the row is served from it, not trained
    checkpoint: str = ""


class NastySpec(TeacherSpec):
    adversary: str  # a key of `teachers`


class DefenceSpec(pydantic.BaseModel):
    """A row that serves another row's teacher through a defence: its students get ``set``
    (e.g. ``{defence.name: stingy}``); the teacher is not trained again."""

    model_config = _STRICT
    teacher: str  # a key of `teachers` or `nasty`
    set: Overrides = Field(default_factory=dict)


class StudentSpec(pydantic.BaseModel):
    model_config = _STRICT
    recipe: str
    set: Overrides = Field(default_factory=dict)
    baseline: bool = True  # train this student alone too (the column's baseline)
    self: bool = False  # the student has its teacher's architecture; baseline: the row's normal teacher
    teachers: list[str] | None = None  # rows it learns from; None: every row; []: none (only the baseline)


class SweepSpec(pydantic.BaseModel):
    model_config = _STRICT
    values: list[Any] = Field(min_length=1)
    stages: list[Kind] | None = None


class SlurmResources(pydantic.BaseModel):
    """What ``--submit slurm`` asks ``sbatch`` for; a key left out comes from the stage's launcher
    config (nodes, GPUs per node) or the defaults of :mod:`nt_dist.pipeline.slurm`. A key may be
    written ``gpus-per-node`` as sbatch spells it."""

    model_config = _STRICT
    nodes: int | None = Field(default=None, ge=1)
    gpus_per_node: int | None = Field(default=None, ge=0)
    cpus_per_task: int | None = Field(default=None, ge=1)
    time: str | int | None = None  # text: an unquoted 12:00:00 is the YAML integer 43200 (checked in _check_slurm)
    partition: str | None = Field(default=None, min_length=1)
    account: str | None = Field(default=None, min_length=1)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _sbatch_spelling(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k.replace("-", "_") if isinstance(k, str) and k.replace("-", "_") in cls.model_fields else k: v
                    for k, v in value.items()}
        return value


class SlurmStageSpec(SlurmResources):
    launcher: str | None = Field(default=None, min_length=1)  # an accelerate config for these stages' jobs


class SlurmSpec(SlurmResources):
    # per stage kind (teacher, nasty, student, baseline) or entry (teachers.<label>, students.<label>, ...)
    stages: dict[str, SlurmStageSpec] = Field(default_factory=dict)


class PipelineSpec(pydantic.BaseModel):
    model_config = _STRICT
    pipeline: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    paper: str = ""
    experiment: str = ""  # "": the pipeline's name
    output_dir: str = ""  # "": runs/<pipeline>
    launcher: str = "local"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    set: Overrides = Field(default_factory=dict)
    teachers: dict[str, TeacherSpec] = Field(default_factory=dict)
    nasty: dict[str, NastySpec] = Field(default_factory=dict)
    defences: dict[str, DefenceSpec] = Field(default_factory=dict)
    students: dict[str, StudentSpec] = Field(default_factory=dict)
    sweep: dict[str, list[Any] | SweepSpec] = Field(default_factory=dict)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)


_ENTRIES: dict[str, type[pydantic.BaseModel]] = {"teachers": TeacherSpec, "nasty": NastySpec, "defences": DefenceSpec,
                                                "students": StudentSpec, "sweep": SweepSpec}


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline file; paths of its recipes are absolute."""

    spec: PipelineSpec
    path: Path

    @property
    def name(self) -> str:
        return self.spec.pipeline

    @property
    def experiment(self) -> str:
        return self.spec.experiment or self.spec.pipeline

    def recipe_path(self, relative: str) -> Path:
        return (self.path.parent / relative).resolve()


def slug(text: str) -> str:
    """A label as a folder name: lower case, runs of anything but letters, digits and dots as ``-``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def load_pipeline(path: str | os.PathLike[str]) -> Pipeline:
    """Read and validate a pipeline file; errors are one line naming the file and the key."""
    path = Path(path)
    tree, _ = read_yaml_file(path, "pipeline file")
    if not isinstance(tree, dict) or "pipeline" not in tree:
        raise UserError(f"{path}: not a pipeline file (expected a mapping with a `pipeline:` name; a recipe "
                        "runs with nt-dist train)")
    try:
        spec = PipelineSpec.model_validate(tree)
    except pydantic.ValidationError as exc:
        raise UserError(f"{path}: {_describe(exc.errors())}") from None
    pipeline = Pipeline(spec, path.resolve())
    _check(pipeline, path)
    return pipeline


def _describe(errors: list[Any]) -> str:
    """The first error as ``key: problem``; an unknown key as the recipes say it, with the keys allowed."""
    # a sweep entry is a list or a SweepSpec: for a mapping, the SweepSpec branch's error is the one that explains
    err = next((e for e in errors if not (e["type"] == "list_type" and "list[any]" in e["loc"]
                                          and isinstance(e["input"], dict))), errors[0])
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("list[", "function-")) and p != "SweepSpec"]
    if err["type"] == "extra_forbidden":
        model = _model_at(loc)
        known = f"; expected one of: {', '.join(model.model_fields)}" if model else ""
        return f"{'.'.join(loc)}: unknown key{known}"
    return f"{'.'.join(loc)}: {err['msg'][0].lower()}{err['msg'][1:]}"


def _model_at(loc: list[str]) -> type[pydantic.BaseModel] | None:
    """The model whose unknown key ``loc`` names (to list the keys it allows)."""
    if len(loc) == 1:
        return PipelineSpec
    if loc[0] == "slurm":
        return SlurmSpec if len(loc) == 2 else SlurmStageSpec if len(loc) == 4 and loc[1] == "stages" else None
    return _ENTRIES.get(loc[0]) if len(loc) == 3 else None


def _check(p: Pipeline, path: Path) -> None:
    """The rules the types do not hold, in the order their errors are reported."""
    _check_rows(p.spec, path)
    _check_students(p.spec, path)
    _check_entries(p, path)
    _check_folder_names(p.spec, path)
    _check_sweep_and_seeds(p.spec, path)
    _check_slurm(p.spec, path)


def _rows(spec: PipelineSpec) -> list[str]:
    """Every row label: teachers, nasty and defences share one namespace."""
    return [*spec.teachers, *spec.nasty, *spec.defences]


def _check_rows(spec: PipelineSpec, path: Path) -> None:
    if not spec.teachers and not spec.students:
        raise UserError(f"{path}: teachers: a pipeline needs teachers or students")
    rows = _rows(spec)
    if len(set(rows)) != len(rows) or BASELINE_ROW in rows:
        raise UserError(f"{path}: nasty: a row label is used twice (teachers, nasty and defences share one "
                        f"namespace; {BASELINE_ROW!r} is reserved)")
    for label, nasty in spec.nasty.items():
        if nasty.adversary not in spec.teachers:
            raise UserError(f"{path}: nasty.{label}.adversary: {nasty.adversary!r} is not a key of teachers "
                            f"({', '.join(spec.teachers) or 'none'})")
        if nasty.checkpoint:
            raise UserError(f"{path}: nasty.{label}.checkpoint: a given model is a teachers entry (a nasty row is "
                            "trained against its adversary)")
    for label, defence in spec.defences.items():
        if defence.teacher not in [*spec.teachers, *spec.nasty]:
            raise UserError(f"{path}: defences.{label}.teacher: {defence.teacher!r} is not a key of teachers or "
                            "nasty")


def _check_students(spec: PipelineSpec, path: Path) -> None:
    rows = _rows(spec)
    for label, student in spec.students.items():
        for row in student.teachers or []:
            if row not in rows:
                raise UserError(f"{path}: students.{label}.teachers: {row!r} is not a row ({', '.join(rows)})")
        if label == TEACHER_COLUMN:
            raise UserError(f"{path}: students.{label}: {TEACHER_COLUMN!r} is reserved for the teachers' column")


def _check_entries(p: Pipeline, path: Path) -> None:
    """Every recipe file exists, every label names a folder, every given model exists."""
    spec = p.spec
    for section, entries in (("teachers", spec.teachers), ("nasty", spec.nasty), ("students", spec.students)):
        for label, entry in entries.items():
            if not p.recipe_path(entry.recipe).is_file():
                raise UserError(f"{path}: {section}.{label}.recipe: {p.recipe_path(entry.recipe)} not found")
            if not slug(label):
                raise UserError(f"{path}: {section}.{label}: a label needs a letter or digit")
    for label, teacher in spec.teachers.items():
        if teacher.checkpoint and not Path(teacher.checkpoint).exists():
            raise UserError(f"{path}: teachers.{label}.checkpoint: {teacher.checkpoint} not found")


def _check_folder_names(spec: PipelineSpec, path: Path) -> None:
    """Two labels of one namespace must not share a folder name."""
    for kind, labels in (("nasty", _rows(spec)), ("students", list(spec.students))):
        slugs = [slug(label) for label in labels]
        clash = next((label for label, s in zip(labels, slugs, strict=True) if slugs.count(s) > 1), None)
        if clash is not None:
            raise UserError(f"{path}: {kind}.{clash}: its folder name {slug(clash)!r} is shared with another label")


def _check_sweep_and_seeds(spec: PipelineSpec, path: Path) -> None:
    for key, entry in spec.sweep.items():
        if key.count(".") != 1:
            raise UserError(f"{path}: sweep.{key}: expected a recipe key section.key (e.g. nasty.omega)")
        values = entry.values if isinstance(entry, SweepSpec) else entry
        folders: dict[str, Any] = {}
        for position, value in enumerate(values, 1):
            if isinstance(value, (dict, list)):
                kind = "a mapping" if isinstance(value, dict) else "a list"
                raise UserError(f"{path}: sweep.{key}: value {position} is {kind}; a sweep value is one number, "
                                "text or true/false")
            name = slug(str(value))
            if name in folders:
                raise UserError(f"{path}: sweep.{key}: values {folders[name]!r} and {value!r} would share the "
                                f"folder name {name!r}")
            folders[name] = value
    if len(set(spec.seeds)) != len(spec.seeds) or any(s < 0 for s in spec.seeds):
        raise UserError(f"{path}: seeds: expected distinct non-negative integers, got {spec.seeds}")


SLURM_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2}|UNLIMITED|INFINITE)$")
SLURM_ENTRY_SECTIONS = ("teachers", "nasty", "students")


def _check_slurm(spec: PipelineSpec, path: Path) -> None:
    """``slurm.stages`` keys name a stage kind or an entry; ``time`` is sbatch's text."""
    for key, entry in [("slurm", spec.slurm), *((f"slurm.stages.{k}", v) for k, v in spec.slurm.stages.items())]:
        if isinstance(entry.time, int):
            raise UserError(f"{path}: {key}.time: {entry.time} is a number; write sbatch's time as quoted text, "
                            'e.g. "12:00:00" (YAML reads an unquoted 12:00:00 as the integer 43200)')
        if entry.time is not None and not SLURM_TIME.match(entry.time):
            raise UserError(f"{path}: {key}.time: {entry.time!r}: expected sbatch's MINUTES, HH:MM:SS or "
                            "DAYS-HH:MM:SS")
    for key, entry in spec.slurm.stages.items():
        section, _, label = key.partition(".")
        if key not in KINDS and not (section in SLURM_ENTRY_SECTIONS and label in getattr(spec, section)):
            raise UserError(f"{path}: slurm.stages.{key}: not a stage kind ({', '.join(KINDS)}) nor an entry "
                            "(teachers.<label>, nasty.<label>, students.<label>)")
        if entry.launcher == "local":
            raise UserError(f"{path}: slurm.stages.{key}.launcher: a SLURM job needs an accelerate config "
                            "(e.g. cluster/single_gpu.yaml), not local")
