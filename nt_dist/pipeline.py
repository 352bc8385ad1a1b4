"""``nt-dist pipeline FILE.yaml``: a paper table (or any grid) as a dependency graph of runs.

A pipeline file names normal teachers (rows), nasty teachers (rows, each against a named normal
teacher as its adversary) and students (columns, each distilled from every row and trained
alone as the column's baseline), the seeds, and an optional sweep over recipe keys::

    pipeline: table1                  # tags every run (MLflow tag `table`) and names it
    paper: table1                     # nt_dist/paper_tables.yaml key shown beside the cells
    experiment: paper-table1          # MLflow experiment of every stage
    output_dir: runs/paper/table1     # stage folders: <output_dir>/seed<k>/<stage>/...
    launcher: local                   # local | an accelerate config (cluster/single_gpu.yaml, ...)
    seeds: [0, 1, 2]
    set: {data.root: data}            # overrides for every stage
    teachers:
      ResNet-18 normal: {recipe: cifar10/teacher.yaml, set: {model.name: cifar_resnet18}}
    nasty:
      ResNet-18 nasty: {recipe: cifar10/nasty.yaml, adversary: ResNet-18 normal}
    students:
      CNN: {recipe: cifar10/student_cnn.yaml}
      self: {recipe: cifar10/student.yaml, self: true}   # the row teacher's own architecture
    sweep: {nasty.omega: [0.001, 0.004, 0.04]}           # or {key: {values: [...], stages: [...]}}
    slurm: {time: "12:00:00", nodes: 1, gpus-per-node: 1}  # sbatch options for --submit slurm

:func:`expand` turns it into :class:`Stage` s (pure: no file is read but the pipeline's); a
stage's folder is named by what shapes it (kind, label, the teacher it learns from, the sweep
values that reach it), so a normal teacher is trained once for every ω of a sweep. :func:`run`
executes the graph on this machine — in this process, or ``--parallel N`` stages at once as
subprocesses, or each through ``accelerate launch --config_file LAUNCHER`` — skipping stages
whose folder already holds the finished run of the same recipe; a failed stage stops its
dependants, not its siblings. :func:`submit_slurm` hands every stage to ``sbatch`` chained with
``--dependency=afterok`` so the cluster's scheduler runs (and requeues) the graph.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import ConfigDict, Field

from nt_dist.errors import EXIT_RUN_ERROR, UserError, one_line, say

Kind = Literal["teacher", "nasty", "student", "baseline"]
KINDS: tuple[str, ...] = ("teacher", "nasty", "student", "baseline")
BASELINE_ROW = "student baseline"
TEACHER_COLUMN = "teacher"
_STRICT = ConfigDict(extra="forbid", frozen=True)
_Overrides = dict[str, Any]


class TeacherSpec(pydantic.BaseModel):
    model_config = _STRICT
    recipe: str
    set: _Overrides = Field(default_factory=dict)
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
    set: _Overrides = Field(default_factory=dict)


class StudentSpec(pydantic.BaseModel):
    model_config = _STRICT
    recipe: str
    set: _Overrides = Field(default_factory=dict)
    baseline: bool = True  # train this student alone too (the column's baseline)
    self: bool = False  # the student has its teacher's architecture; baseline: the row's normal teacher
    teachers: list[str] | None = None  # rows it learns from; None: every row; []: none (only the baseline)


class SweepSpec(pydantic.BaseModel):
    model_config = _STRICT
    values: list[Any] = Field(min_length=1)
    stages: list[Kind] | None = None


class PipelineSpec(pydantic.BaseModel):
    model_config = _STRICT
    pipeline: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    paper: str = ""
    experiment: str = ""  # "": the pipeline's name
    output_dir: str = ""  # "": runs/<pipeline>
    launcher: str = "local"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    set: _Overrides = Field(default_factory=dict)
    teachers: dict[str, TeacherSpec] = Field(default_factory=dict)
    nasty: dict[str, NastySpec] = Field(default_factory=dict)
    defences: dict[str, DefenceSpec] = Field(default_factory=dict)
    students: dict[str, StudentSpec] = Field(default_factory=dict)
    sweep: dict[str, list[Any] | SweepSpec] = Field(default_factory=dict)
    slurm: dict[str, str | int] = Field(default_factory=dict)


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


@dataclass
class Outcome:
    stage: Stage
    status: str = "pending"  # ran | skipped | failed | blocked
    message: str = ""
    seconds: float = 0.0
    results: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- loading


def load_pipeline(path: str | os.PathLike[str]) -> Pipeline:
    """Read and validate a pipeline file; errors are one line naming the file and the key."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: pipeline file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the pipeline file ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: unreadable YAML{where}") from None
    if not isinstance(tree, dict) or "pipeline" not in tree:
        raise UserError(f"{path}: not a pipeline file (expected a mapping with a `pipeline:` name; a recipe "
                        "runs with nt-dist train)")
    try:
        spec = PipelineSpec.model_validate(tree)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("list[", "function-")))
        raise UserError(f"{path}: {key}: {err['msg'][0].lower()}{err['msg'][1:]}") from None
    pipeline = Pipeline(spec, path.resolve())
    _check(pipeline, path)
    return pipeline


def _check(p: Pipeline, path: Path) -> None:
    spec = p.spec
    if not spec.teachers and not spec.students:
        raise UserError(f"{path}: teachers: a pipeline needs teachers or students")
    rows = [*spec.teachers, *spec.nasty, *spec.defences]
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
    for label, student in spec.students.items():
        for row in student.teachers or []:
            if row not in rows:
                raise UserError(f"{path}: students.{label}.teachers: {row!r} is not a row ({', '.join(rows)})")
        if label == TEACHER_COLUMN:
            raise UserError(f"{path}: students.{label}: {TEACHER_COLUMN!r} is reserved for the teachers' column")
    for section, entries in (("teachers", spec.teachers), ("nasty", spec.nasty), ("students", spec.students)):
        for label, entry in entries.items():
            if not p.recipe_path(entry.recipe).is_file():
                raise UserError(f"{path}: {section}.{label}.recipe: {p.recipe_path(entry.recipe)} not found")
            if not _slug(label):
                raise UserError(f"{path}: {section}.{label}: a label needs a letter or digit")
    for label, teacher in spec.teachers.items():
        if teacher.checkpoint and not Path(teacher.checkpoint).exists():
            raise UserError(f"{path}: teachers.{label}.checkpoint: {teacher.checkpoint} not found")
    for kind, labels in (("nasty", rows), ("students", list(spec.students))):
        slugs = [_slug(label) for label in labels]
        clash = next((label for label, slug in zip(labels, slugs, strict=True) if slugs.count(slug) > 1), None)
        if clash is not None:
            raise UserError(f"{path}: {kind}.{clash}: its folder name {_slug(clash)!r} is shared with another label")
    for key in spec.sweep:
        if key.count(".") != 1:
            raise UserError(f"{path}: sweep.{key}: expected a recipe key section.key (e.g. nasty.omega)")
    if len(set(spec.seeds)) != len(spec.seeds) or any(s < 0 for s in spec.seeds):
        raise UserError(f"{path}: seeds: expected distinct non-negative integers, got {spec.seeds}")


# ----------------------------------------------------------------------------- the graph


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def _value_text(value: Any) -> str:
    """An override's value as ``--set`` reads it back (YAML): JSON for everything but plain strings."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def _overrides(tree: _Overrides) -> list[str]:
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


def expand(p: Pipeline, *, seeds: Iterable[int] | None = None, extra: Iterable[str] = (),
           output_dir: str | None = None) -> list[Stage]:
    """Every stage of the graph, dependencies before dependants, each once.

    Overrides apply in order: the recipe file, the pipeline's ``set``, the entry's ``set``,
    ``extra`` (the command line's ``--set``), the sweep's values, then what the pipeline
    manages (seed, folder, names, tags, the teacher or adversary checkpoint)."""
    spec = p.spec
    out = Path(output_dir or spec.output_dir or f"runs/{spec.pipeline}")
    extra = list(extra)
    targets = {k: sweep_targets(k, v)[1] for k, v in spec.sweep.items()}
    stages: dict[str, Stage] = {}

    def reach(kind: str, point: dict[str, Any], upstream: tuple[tuple[str, Any], ...] = ()) -> tuple:
        own = tuple((k, v) for k, v in point.items() if kind in targets[k])
        return tuple(sorted(set(own) | set(upstream), key=lambda kv: list(point).index(kv[0])))

    def add(kind: str, label: str, row: str, column: str, seed: int, sweep: tuple, recipe: str,
            entry_set: _Overrides, managed: dict[str, Any], needs: tuple[str, ...] = (), via: str = "",
            reference_row: str = "") -> Stage:
        parts = [f"seed{seed}", kind, _slug(label)] + ([_slug(via)] if via else [])
        if sweep:
            parts.append("_".join(f"{_slug(k)}-{_slug(str(v))}" for k, v in sweep))
        name = "/".join(parts)
        if name in stages:
            return stages[name]
        folder = out / name
        tags = {"table": spec.pipeline, "row": row, "column": column, "seed": str(seed), "stage": kind,
                **{f"sweep.{k}": str(v) for k, v in sweep}}
        if reference_row:
            tags["reference_row"] = reference_row
        if spec.paper:
            tags["paper"] = spec.paper
        managed = {"run.seed": seed, "run.output_dir": str(folder), "run.name": f"{spec.pipeline}/{name}",
                   "tracking.experiment": p.experiment, "tracking.tags": tags, **managed}
        overrides = (*_overrides(spec.set), *_overrides(entry_set), *extra, *_overrides(dict(sweep)),
                     *_overrides(managed))
        stage = Stage(name, kind, row, column, seed, sweep, p.recipe_path(recipe), overrides, folder, needs,
                      reference_row, tags)
        stages[name] = stage
        return stage

    for seed in (list(seeds) if seeds is not None else spec.seeds):
        for point in sweep_points(p):
            rows: dict[str, tuple[Stage, str]] = {}  # row label -> (its stage, its architecture or "")
            # row label -> (its stage, or None for a given model; its architecture or ""; where its model is;
            # what its students add: a defence row's serving settings)
            rows: dict[str, tuple[Stage | None, str, str, _Overrides]] = {}
            for label, t in spec.teachers.items():
                if t.checkpoint:
                    rows[label] = (None, _architecture(p, t), str(Path(t.checkpoint).resolve()), {})
                    continue
                stage = add("teacher", label, label, TEACHER_COLUMN, seed, reach("teacher", point), t.recipe,
                            t.set, {"run.role": "teacher"})
                rows[label] = (stage, _architecture(p, t), str(stage.output_dir), {})
            for label, n in spec.nasty.items():
                adversary, _, where, _ = rows[n.adversary]
                upstream = adversary.sweep if adversary is not None else ()
                stage = add("nasty", label, label, TEACHER_COLUMN, seed, reach("nasty", point, upstream),
                            n.recipe, n.set, {"run.role": "nasty", "nasty.adversary_checkpoint": where},
                            (adversary.name,) if adversary is not None else (), reference_row=n.adversary)
                rows[label] = (stage, _architecture(p, n), str(stage.output_dir), {})
            for label, d in spec.defences.items():
                stage, arch, where, _ = rows[d.teacher]
                rows[label] = (stage, arch, where, d.set)
            distilled = [r for r, spec_ in [*spec.teachers.items(), *spec.nasty.items()] if spec_.distill]
            distilled += list(spec.defences)
            for column, s in spec.students.items():
                if s.baseline and not s.self:
                    add("baseline", column, BASELINE_ROW, column, seed, reach("baseline", point), s.recipe, s.set,
                        {"run.role": "baseline"})
                for row in (s.teachers if s.teachers is not None else distilled):
                    teacher, arch, where, serve = rows[row]
                    managed: dict[str, Any] = {**serve, "run.role": "student", "distill.teacher_checkpoint": where}
                    reference = ""
                    if s.self:
                        if not arch:
                            raise UserError(f"{p.path}: students.{column}.self: the row {row!r} does not set "
                                            "model.name, so its architecture is unknown here")
                        managed["model.name"] = arch
                        base = spec.defences[row].teacher if row in spec.defences else row
                        reference = spec.nasty[base].adversary if base in spec.nasty else base
                    upstream = teacher.sweep if teacher is not None else ()
                    add("student", column, row, column, seed, reach("student", point, upstream), s.recipe,
                        s.set, managed, (teacher.name,) if teacher is not None else (), via=row,
                        reference_row=reference)
    return list(stages.values())


def _architecture(p: Pipeline, entry: TeacherSpec) -> str:
    """``model.name`` of a teacher entry: its ``set``, the pipeline's ``set``, else its recipe file."""
    for overrides in (entry.set, p.spec.set):
        if isinstance(overrides.get("model.name"), str):
            return overrides["model.name"]
    try:
        tree = yaml.safe_load(p.recipe_path(entry.recipe).read_text(encoding="utf-8"))
        return str(tree["model"]["name"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return ""


# ----------------------------------------------------------------------------- running


def stage_state(stage: Stage) -> tuple[str, dict[str, Any]]:
    """``finished`` (with its final metrics) when the stage's folder holds the exported run of
    the same recipe; ``todo`` otherwise. A folder holding another recipe is a UserError."""
    from nt_dist.checkpoint import MODEL_FILE
    from nt_dist.config import load_recipe
    from nt_dist.rundir import inspect

    recipe = load_recipe(stage.recipe, list(stage.overrides))
    state = inspect(recipe, str(stage.recipe))
    if state.kind == "finished" and state.results and (stage.output_dir / MODEL_FILE).is_file():
        return "finished", dict(state.results.get("final", {}))
    return "todo", {}


def stage_command(stage: Stage, launcher: str) -> list[str]:
    """The command that trains ``stage`` in a fresh process (``python -m nt_dist.train`` or
    ``accelerate launch --config_file LAUNCHER -m nt_dist.train``)."""
    args = ["-m", "nt_dist.train", str(stage.recipe), *sum((["--set", o] for o in stage.overrides), [])]
    if launcher == "local":
        return [sys.executable, *args]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    return [accelerate, "launch", "--config_file", str(Path(launcher).resolve()), *args]


def _train_here(stage: Stage) -> dict[str, Any]:
    from nt_dist.config import load_recipe
    from nt_dist.train import train

    return dict(train(load_recipe(stage.recipe, list(stage.overrides)), source=str(stage.recipe)))


def _train_subprocess(stage: Stage, launcher: str, log: Path) -> dict[str, Any]:
    from nt_dist.errors import RunError

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as sink:
        code = subprocess.call(stage_command(stage, launcher), stdout=sink, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if code != 0:
        lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "error:" in line] or lines[-1:]
        raise RunError(f"exit {code}: {errors[-1] if errors else '(no output)'} (log: {log})")
    state, results = stage_state(stage)
    if state != "finished":
        raise RunError(f"exit 0 but {stage.output_dir} holds no finished run (log: {log})")
    return results


def run(p: Pipeline, stages: list[Stage], *, launcher: str | None = None, parallel: int = 1,
        echo: Callable[[str], None] = say) -> list[Outcome]:
    """Run the graph on this machine. ``parallel`` > 1 (or a launcher config) trains each stage
    in its own process, its output in ``<output_dir>/logs/<stage>.log``; otherwise stages run
    in this process, in order, their output on the terminal."""
    from nt_dist.errors import Preempted, RunError

    launcher = launcher or p.spec.launcher
    if launcher != "local" and not Path(launcher).is_file():
        raise UserError(f"{p.path}: launcher: {launcher} not found (local, or an accelerate config such as "
                        "cluster/single_gpu.yaml)")
    outcomes = {s.name: Outcome(s) for s in stages}
    logs = output_root(stages) / "logs"
    separate = parallel > 1 or launcher != "local"

    def one(stage: Stage) -> None:
        outcome = outcomes[stage.name]
        started = time.perf_counter()
        try:
            state, results = stage_state(stage)
            if state == "finished":
                outcome.status, outcome.results = "skipped", results
                return
            echo(f"nt-dist pipeline: start {stage.name}")
            if separate:
                results = _train_subprocess(stage, launcher, logs / f"{stage.log_name}.log")
            else:
                results = _train_here(stage)
            outcome.status, outcome.results = "ran", results
        except (UserError, RunError) as exc:
            outcome.status, outcome.message = "failed", str(exc)
        except Preempted as exc:  # Ctrl-C or the scheduler: the stage checkpointed; stop the pipeline
            exc.where = str(stage.output_dir)  # type: ignore[attr-defined]
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bug in one stage must not end its siblings
            outcome.status, outcome.message = "failed", one_line(f"{type(exc).__name__}: {exc}")
        finally:
            outcome.seconds = time.perf_counter() - started
        if outcome.status == "failed":
            echo(f"nt-dist pipeline: FAILED {stage.name}: {outcome.message}")
        else:
            echo(f"nt-dist pipeline: done {stage.name}: top-1 {outcome.results.get('test_top1', float('nan')):.2f} "
                 f"({outcome.seconds:.0f} s)")

    def ready(stage: Stage) -> str:
        """``go``, ``wait`` or ``blocked`` (an input failed or was blocked)."""
        inputs = [outcomes[n].status for n in stage.needs]
        if any(s in ("failed", "blocked") for s in inputs):
            return "blocked"
        return "go" if all(s in ("ran", "skipped") for s in inputs) else "wait"

    pending = list(stages)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        running: dict[Future[None], Stage] = {}
        while pending or running:
            for stage in list(pending):
                verdict = ready(stage)
                if verdict == "blocked":
                    failed = next(n for n in stage.needs if outcomes[n].status in ("failed", "blocked"))
                    outcomes[stage.name].status, outcomes[stage.name].message = "blocked", f"needs {failed}"
                    pending.remove(stage)
                elif verdict == "go" and len(running) < max(1, parallel):
                    pending.remove(stage)
                    if parallel <= 1:
                        one(stage)
                    else:
                        running[pool.submit(one, stage)] = stage
            if running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    running.pop(future)
                    future.result()
            elif pending and all(ready(s) == "wait" for s in pending):
                raise RuntimeError("pipeline graph has a cycle or a missing stage")  # expand() makes neither
    return [outcomes[s.name] for s in stages]


def output_root(stages: list[Stage]) -> Path:
    """The pipeline's output folder (every stage folder is <root>/seed<k>/...)."""
    return stages[0].output_dir.parents[len(Path(stages[0].name).parts) - 1] if stages else Path(".")


def summary(outcomes: list[Outcome]) -> str:
    """What ran, what was skipped, what failed and what could not run, one line each for the last two."""
    counts = {k: sum(o.status == k for o in outcomes) for k in ("ran", "skipped", "failed", "blocked")}
    lines = [f"{len(outcomes)} stages: {counts['ran']} ran, {counts['skipped']} skipped (already finished), "
             f"{counts['failed']} failed, {counts['blocked']} not run (an input failed)"]
    for o in outcomes:
        if o.status == "failed":
            lines.append(f"  failed   {o.stage.name}: {o.message}")
        elif o.status == "blocked":
            lines.append(f"  not run  {o.stage.name}: {o.message}")
    return "\n".join(lines)


def exit_code(outcomes: list[Outcome]) -> int:
    return EXIT_RUN_ERROR if any(o.status in ("failed", "blocked") for o in outcomes) else 0


# ----------------------------------------------------------------------------- SLURM


def default_sbatch_script() -> Path:
    return Path(__file__).resolve().parents[1] / "cluster" / "slurm" / "train.sbatch"


def submit_slurm(p: Pipeline, stages: list[Stage], *, launcher: str | None = None,
                 script: Path | None = None, echo: Callable[[str], None] = say) -> dict[str, str]:
    """Submit every unfinished stage with ``sbatch``, each chained to its inputs' jobs with
    ``--dependency=afterok`` (and ``--kill-on-invalid-dep=yes``, so a failed input cancels its
    dependants instead of leaving them pending). Returns stage name -> job id, also written to
    ``<output_dir>/slurm_jobs.json``. The cluster runs, requeues and shows the graph."""
    launcher = launcher or p.spec.launcher
    script = script or default_sbatch_script()
    if launcher == "local":
        raise UserError(f"{p.path}: launcher: --submit slurm needs an accelerate config for each job, e.g. "
                        "--launcher cluster/single_gpu.yaml (or cluster/multi_node.yaml)")
    if not Path(launcher).is_file():
        raise UserError(f"{p.path}: launcher: {launcher} not found")
    if not script.is_file():
        raise UserError(f"{script}: the SLURM job script is missing (pass --sbatch-script)")
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("sbatch: not found on PATH (--submit slurm runs on a SLURM login node)")
    root = output_root(stages)
    jobs: dict[str, str] = {}
    for stage in stages:
        if stage_state(stage)[0] == "finished":
            echo(f"nt-dist pipeline: skip {stage.name} (already finished)")
            continue
        after = [jobs[n] for n in stage.needs if n in jobs]
        options = [f"--{k}={v}" for k, v in p.spec.slurm.items()]
        command = [sbatch, "--parsable", f"--job-name={p.name}/{stage.name}",
                   f"--output={(root / 'logs').resolve()}/{stage.log_name}-%j.out", *options]
        if after:
            command += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
        command += [str(script), str(stage.recipe), *sum((["--set", o] for o in stage.overrides), [])]
        (root / "logs").mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "NT_ACCELERATE_CONFIG": str(Path(launcher).resolve())})
        job = proc.stdout.strip().split(";")[0]
        if proc.returncode != 0 or not job:
            raise UserError(f"sbatch refused {stage.name}: {one_line(proc.stderr or proc.stdout)} "
                            f"(submitted so far: {len(jobs)}; see {root / 'slurm_jobs.json'})")
        jobs[stage.name] = job
        echo(f"nt-dist pipeline: job {job} {stage.name}" + (f" after {','.join(after)}" if after else ""))
        _write_jobs(root, jobs)
    _write_jobs(root, jobs)
    return jobs


def _write_jobs(root: Path, jobs: dict[str, str]) -> None:
    from nt_dist.checkpoint import atomic_write_text

    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "slurm_jobs.json", json.dumps(jobs, indent=1) + "\n")


def describe_plan(stages: list[Stage], launcher: str) -> str:
    """``--dry-run``: each stage, its inputs and the command that would train it."""
    lines = []
    for stage in stages:
        needs = f"  (after {', '.join(stage.needs)})" if stage.needs else ""
        lines.append(f"{stage.name}{needs}\n    {shlex.join(stage_command(stage, launcher))}")
    return "\n".join(lines)
