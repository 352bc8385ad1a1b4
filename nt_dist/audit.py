"""``nt-dist audit``: how well a teacher resists being stolen, before it is released.

The teacher under audit (usually a nasty teacher) and a reference (a normal teacher of the same
architecture) face a battery of attacks (:mod:`nt_dist.objectives`: Hinton KD over a grid of τ_s
and α, top-k KD, the Skeptical Student, DAFL, DeepInversion); the reference is also served
through the other defences (:mod:`nt_dist.defences`: Stingy top-k, logit noise), and the
student is trained alone. The battery is an ordinary pipeline file (``<out>/audit.yaml``: rows
are the given models, columns the attacks), run by the same pipeline and launcher code as the
paper's tables, so ``--parallel``, ``--launcher`` and resuming behave as they do there.

For each attack, the **protection margin** of a row is how far below the student the same
attack steals from the reference its stolen student lands::

    margin = top1(student ← reference, attack) − top1(student ← row, attack)

positive: the row withholds what the attack takes from a normal teacher; zero or negative: it
withholds nothing. The student alone is reported beside it for scale (a data-free attack far
below it is weak on any teacher, which says nothing of the teacher). The verdict per attack
reads the margin of the teacher under audit against ``--threshold`` (points), and the report's
first line counts them: ``protected against N of M attacks; weak against …``. The teachers' own
cost is their test top-1 as released (through the defence, for defence rows) against the
reference's. The report itself (margins, verdicts, Markdown, CSV, chart) is
:mod:`nt_dist.audit_render`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from nt_dist import objectives
from nt_dist.audit_render import (
    ALONE,
    AUDITED,
    REFERENCE,
    Protection,
    bar_chart,
    bottom_line,
    csv_text,
    markdown,
    protections,
    verdict,
)
from nt_dist.errors import UserError, say

__all__ = ["ALONE", "AUDITED", "REFERENCE", "AuditPlan", "Protection", "bar_chart", "bottom_line", "check",
           "csv_text", "markdown", "protections", "run_audit", "verdict"]

DEFENCES = ("stingy", "noise")


@dataclass(frozen=True)
class AuditPlan:
    """What ``nt-dist audit`` was asked for (paths as given)."""

    teacher: str
    reference: str
    recipe: Path  # the student's recipe: data set, network, optimiser, budgets of each attack
    attacks: tuple[str, ...] = field(default_factory=objectives.attack_names)  # every registered attack
    kd_taus: tuple[float, ...] = (4.0, 20.0)
    kd_alphas: tuple[float, ...] = (0.5, 0.9)
    top_k: int = 2  # of the top-k KD attack
    stingy_k: int = 0  # logits the Stingy defence keeps; 0: the authors' ratio of the classes (0.2, 0.1 from 100)
    defences: tuple[str, ...] = DEFENCES
    student: str = ""  # "": the recipe's network; "self": the audited teacher's architecture; else a name
    seeds: tuple[int, ...] = (0,)
    out: Path = Path("runs/audit")
    name: str = "audit"
    experiment: str = ""  # "": the name
    threshold: float = 2.0
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    label: str
    checkpoint: Path
    defence: dict[str, Any] = field(default_factory=dict)  # defence.* overrides of its students


def parse_attacks(names: list[str]) -> tuple[str, ...]:
    """``--attacks``: registered attack names (``all``: every one, in registration order)."""
    registered = objectives.attack_names()
    if names == ["all"]:
        return registered
    for name in names:
        if name not in registered:
            raise UserError(f"--attacks: unknown attack {name!r}; expected: {', '.join(registered)} (or all)")
    return tuple(dict.fromkeys(names))


def parse_defences(names: list[str]) -> tuple[str, ...]:
    if names == ["none"]:
        return ()
    for name in names:
        if name not in DEFENCES:
            raise UserError(f"--defences: unknown defence {name!r}; expected: {', '.join(DEFENCES)} (or none)")
    return tuple(dict.fromkeys(names))


def attack_columns(plan: AuditPlan) -> dict[str, dict[str, Any]]:
    """Column label -> the student overrides of that attack, in the report's order (each
    attack's :meth:`~nt_dist.objectives.Objective.audit_columns`)."""
    columns: dict[str, dict[str, Any]] = {}
    for name in plan.attacks:
        columns.update(objectives.attack(name, "--attacks").audit_columns(plan))
    return columns


def _defence_rows(plan: AuditPlan, classes: int) -> dict[str, dict[str, Any]]:
    from nt_dist.config import DefenceConfig
    from nt_dist.defences import stingy_k

    rows: dict[str, dict[str, Any]] = {}
    for name in plan.defences:
        if name == "stingy":
            k = stingy_k(DefenceConfig(name="stingy", top_k=plan.stingy_k), classes)
            rows[f"{REFERENCE} + Stingy top-{k}"] = {"defence.name": "stingy", "defence.top_k": k}
        elif name == "noise":
            rows[f"{REFERENCE} + noise"] = {"defence.name": "noise"}
    return rows


# ----------------------------------------------------------------------------- checks


def _model_file(path: str, key: str) -> Path:
    from nt_dist.checkpoint import resolve_model_file

    return resolve_model_file(path, key).resolve()


class Checked(NamedTuple):
    teacher: Path  # the model files, resolved
    reference: Path
    student: str  # the stolen student's network
    recipe: Any  # the student recipe with the audit's overrides


def check(plan: AuditPlan) -> Checked:
    """Every mistake before anything is trained: the model files, their architectures and
    class counts against the student recipe's data set."""
    from nt_dist.checkpoint import read_model_metadata
    from nt_dist.config import load_recipe
    from nt_dist.models import UnknownModelError, check_model_name

    teacher = _model_file(plan.teacher, "--teacher")
    reference = _model_file(plan.reference, "--reference")
    meta_t = read_model_metadata(teacher, "--teacher")
    meta_r = read_model_metadata(reference, "--reference")
    recipe = load_recipe(plan.recipe, list(plan.overrides))
    classes = dataset_classes(recipe)
    for key, path, meta in (("--teacher", teacher, meta_t), ("--reference", reference, meta_r)):
        if not meta.get("architecture"):
            raise UserError(f"{key}: {path} records no architecture (export it with nt-dist)")
        if meta.get("num_classes") and str(meta["num_classes"]).isdigit() and int(meta["num_classes"]) != classes:
            raise UserError(f"{key}: {path} has {meta['num_classes']} classes but the data set of {plan.recipe} "
                            f"({recipe.data.name}) has {classes}")
        try:
            check_model_name(meta["architecture"])
        except UnknownModelError as exc:
            raise UserError(f"{key}: {path} records architecture {meta['architecture']!r}, "
                            f"which this install cannot build: {exc}") from None
    arch_t, arch_r = meta_t["architecture"], meta_r["architecture"]
    needs_same = [f"--student {plan.student}"] * (plan.student == "self") + [
        f"the defences ({', '.join(plan.defences)}) served through the reference"] * bool(plan.defences)
    if arch_t != arch_r and needs_same:
        raise UserError(f"--reference: {reference} holds a {arch_r!r} but the teacher under audit is a {arch_t!r}; "
                        f"{' and '.join(needs_same)} compare one architecture: pass a reference of the same "
                        "architecture (or --defences none with a named --student)")
    student = arch_t if plan.student == "self" else plan.student or recipe.model.name
    try:
        check_model_name(student)
    except UnknownModelError as exc:
        raise UserError(f"--student: {exc}") from None
    return Checked(teacher, reference, student, recipe)


def dataset_classes(recipe: Any) -> int:
    """The class count of the recipe's data set, read as cheaply as its layout allows: the
    model's, its :class:`~nt_dist.data.DatasetSpec`'s, or (an image folder) its class folders."""
    from nt_dist.data import build_dataset, dataset_spec, num_classes_of

    if recipe.model.num_classes:
        return int(recipe.model.num_classes)
    spec = dataset_spec(recipe.data.name)
    if spec.num_classes is not None:
        return spec.num_classes
    return num_classes_of(build_dataset(recipe.data.name, recipe.data.root, spec.eval_split))


# ----------------------------------------------------------------------------- the pipeline


def pipeline_tree(plan: AuditPlan, teacher: Path, reference: Path, student: str, classes: int = 10) -> dict[str, Any]:
    """The battery as a pipeline file (what ``<out>/audit.yaml`` holds); ``classes``: the data set's."""
    recipe = str(plan.recipe.resolve())
    common = {"model.name": student}
    students: dict[str, Any] = {ALONE: {"recipe": recipe, "set": dict(common), "teachers": [], "baseline": True}}
    for label, overrides in attack_columns(plan).items():
        students[label] = {"recipe": recipe, "set": {**common, **overrides}, "baseline": False}
    return {
        "pipeline": plan.name, "paper": "", "experiment": plan.experiment or plan.name,
        "output_dir": str(plan.out.resolve()), "launcher": "local", "seeds": list(plan.seeds),
        "set": dict(_pairs(plan.overrides)),
        "teachers": {REFERENCE: {"recipe": recipe, "checkpoint": str(reference)},
                     AUDITED: {"recipe": recipe, "checkpoint": str(teacher)}},
        "defences": {label: {"teacher": REFERENCE, "set": overrides} for label, overrides in _defence_rows(plan, classes).items()},
        "students": students,
    }


def _pairs(overrides: tuple[str, ...]) -> list[tuple[str, Any]]:
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected section.key=value (e.g. run.epochs=5)")
        pairs.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    return pairs


def write_pipeline(plan: AuditPlan, tree: dict[str, Any]) -> Path:
    from nt_dist.fileio import atomic_write_text

    path = plan.out / "audit.yaml"
    plan.out.mkdir(parents=True, exist_ok=True)
    header = ("# Written by nt-dist audit: the attack battery as a pipeline file. Run it again with\n"
              f"#   nt-dist pipeline {path}\n")
    atomic_write_text(path, header + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
    return path


# ----------------------------------------------------------------------------- teachers


def released_top1s(recipe: Any, rows: dict[str, tuple[Path, str, dict[str, Any]]]) -> dict[str, float]:
    """Test top-1 (percent) of each row's model as released (through its ``defence.*``
    settings), on the evaluation split of ``recipe``'s data set, read once; one process.
    ``rows``: label -> (model file, the option naming it, defence settings)."""
    from nt_dist.checkpoint import load_frozen_model
    from nt_dist.config import DefenceConfig
    from nt_dist.data import build_data
    from nt_dist.defences import release
    from nt_dist.evaluation import evaluate
    from nt_dist.models import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_data(recipe.data, recipe.run.seed, 0, 1, device)
    scores = {}
    for label, (model_file, key, defence) in rows.items():
        network, _ = load_frozen_model("", str(model_file), data.num_classes, key, build_model)
        settings = DefenceConfig(**{k.removeprefix("defence."): v for k, v in defence.items()})
        scores[label] = evaluate(release(network.to(device), settings, recipe.run.seed), data.eval)["test_top1"]
    return scores


# ----------------------------------------------------------------------------- the command


def run_audit(plan: AuditPlan, *, parallel: int = 1, launcher: str | None = None, dry_run: bool = False,
              log: bool = True) -> int:
    """Check, write ``<out>/audit.yaml``, run it, evaluate the teachers as released, write the
    protection report (Markdown, CSV, PNG) and log it to MLflow. Returns the exit code."""
    from nt_dist import pipeline, report
    from nt_dist.fileio import atomic_write_text

    teacher, reference, student, recipe = check(plan)
    classes = dataset_classes(recipe)
    tree = pipeline_tree(plan, teacher, reference, student, classes)
    path = write_pipeline(plan, tree)
    spec = pipeline.load_pipeline(path)
    stages = pipeline.expand(spec)
    if dry_run:
        print(pipeline.describe_plan(stages, launcher or "local"))
        return 0
    say(f"nt-dist audit: {len(stages)} runs ({path})")
    outcomes = pipeline.run(spec, stages, launcher=launcher, parallel=parallel)
    print(pipeline.summary(outcomes))
    results, _ = report.from_stages(stages)
    models = {REFERENCE: (reference, "--reference", {}), AUDITED: (teacher, "--teacher", {}),
              **{label: (reference, "--reference", d) for label, d in _defence_rows(plan, classes).items()}}
    rows = list(models)
    teachers = released_top1s(recipe, models)
    table = protections(results, list(attack_columns(plan)))
    text = markdown(plan, student, recipe.data.name, teachers, rows, table, len(plan.seeds))  # the bottom line first
    folder = plan.out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / "audit.md", folder / "audit.csv", folder / "audit.png"]
    atomic_write_text(files[0], text)
    atomic_write_text(files[1], csv_text(teachers, rows, table))
    bar_chart(table, rows, files[2], f"{plan.name}: {Path(plan.teacher).name} vs {Path(plan.reference).name}",
              bottom_line(table, plan.threshold))
    print("\n" + text)
    where = ""
    enabled, uri = report.tracking_of(spec, stages)
    if log and enabled:
        run_id = report.log_to_mlflow(files, spec.experiment, uri, plan.name, "", text)
        where = f"; MLflow run {plan.name}/report ({run_id}) in experiment {spec.experiment}"
    say(f"nt-dist audit: {bottom_line(table, plan.threshold)}; report in {folder}{where}")
    return pipeline.exit_code(outcomes)
