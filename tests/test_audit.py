"""`nt-dist audit`: the attack battery against a teacher and a reference, and its protection report."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from nt_dist import audit, pipeline
from nt_dist.checkpoint import export_model
from nt_dist.errors import UserError
from nt_dist.models import create_model
from nt_dist.report import Result

REPO = Path(__file__).resolve().parents[1]
NT_DIST = str(Path(sys.executable).with_name("nt-dist"))
ATTACK_RECIPE = REPO / "recipes" / "digits_attack.yaml"


def fake_model(folder: Path, architecture: str = "cifar_cnn", classes: int = 10, recorded: str = "") -> Path:
    """An exported model with random weights: enough for every check made before training.
    ``recorded``: the architecture its metadata names, if not the one it holds."""
    folder.mkdir(parents=True, exist_ok=True)
    model = create_model(architecture, num_classes=classes)
    export_model(model.state_dict(), folder / "model.safetensors",
                 {"architecture": recorded or architecture, "num_classes": str(classes), "role": "teacher",
                  "dataset": "digits"})
    return folder


def cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([NT_DIST, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(("case", "expected"), [
    ("classes", "nt-dist: error: --teacher: {t}/model.safetensors has 100 classes but the data set of "
                "{recipe} (digits) has 10"),
    ("attack", "nt-dist: error: --attacks: unknown attack 'dafI'; expected: kd, topk, skeptical, dafl, "
               "deepinversion (or all)"),
    ("architecture", "nt-dist: error: --reference: {r}/model.safetensors holds a 'mlp' but the teacher under audit "
                     "is a 'cifar_cnn'; the defences (stingy, noise) served through the reference compare one "
                     "architecture: pass a reference of the same architecture (or --defences none with a named "
                     "--student)"),
    ("self", "nt-dist: error: --reference: {r}/model.safetensors holds a 'mlp' but the teacher under audit is a "
             "'cifar_cnn'; --student self compare one architecture: pass a reference of the same architecture "
             "(or --defences none with a named --student)"),
    ("missing", "nt-dist: error: --teacher: {t}/nope not found (expected a model.safetensors "
                "written by nt-dist, or the run folder holding it)"),
    ("unknown", "nt-dist: error: --teacher: {t}/model.safetensors records architecture 'cifar_cnn9', which this "
                "install cannot build: unknown model 'cifar_cnn9'; close matches: cifar_cnn, cifar_resnext29, "
                "cifar_resnet8"),
    ("student", "nt-dist: error: --student: unknown model 'cifar_cnm'; close matches: cifar_cnn, cifar_resnet8, "
                "cifar_resnet50, cifar_resnet34, cifar_resnet32, cifar_resnet20"),
])
def test_bad_inputs_end_in_one_line_before_anything_is_trained(case: str, expected: str, tmp_path: Path):
    teacher = fake_model(tmp_path / "t", classes=100 if case == "classes" else 10,
                         recorded="cifar_cnn9" if case == "unknown" else "")
    reference = fake_model(tmp_path / "r", "mlp" if case in ("architecture", "self") else "cifar_cnn")
    args = ["audit", "--teacher", str(teacher), "--reference", str(reference), "--out", str(tmp_path / "out")]
    if case == "attack":
        args += ["--attacks", "kd", "dafI"]
    if case == "self":
        args += ["--student", "self", "--defences", "none"]
    if case == "missing":
        args[2] = str(teacher / "nope")
    if case == "student":
        args += ["--student", "cifar_cnm"]
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [expected.format(t=teacher, r=reference, recipe=ATTACK_RECIPE)]
    assert not (tmp_path / "out").exists()


def test_a_reference_of_another_architecture_is_fine_without_defences_and_a_named_student(tmp_path: Path):
    teacher, reference = fake_model(tmp_path / "t"), fake_model(tmp_path / "r", "mlp")
    plan = audit.AuditPlan(str(teacher), str(reference), ATTACK_RECIPE, defences=())
    assert audit.check(plan).student == "cifar_resnet8"  # the recipe's student


# ----------------------------------------------------------------------------- the battery as a pipeline


def test_the_battery_is_a_pipeline_of_given_rows_defence_rows_and_attack_columns(tmp_path: Path):
    teacher, reference = fake_model(tmp_path / "t"), fake_model(tmp_path / "r")
    plan = audit.AuditPlan(str(teacher), str(reference), ATTACK_RECIPE, kd_taus=(4.0, 20.0), kd_alphas=(0.9,),
                           top_k=3, out=tmp_path / "out", seeds=(0, 1))
    columns = audit.attack_columns(plan)
    assert list(columns) == ["KD τ=4 α=0.9", "KD τ=20 α=0.9", "top-3 KD", "Skeptical", "DAFL", "DeepInversion"]
    checked = audit.check(plan)
    path = audit.write_pipeline(plan, audit.pipeline_tree(plan, *checked[:3]))
    stages = pipeline.expand(pipeline.load_pipeline(path))
    # per seed: the student alone once, and each of 6 attacks from 4 rows; no teacher is trained
    assert len(stages) == 2 * (1 + 6 * 4)
    assert {s.kind for s in stages} == {"baseline", "student"} and all(not s.needs for s in stages)
    by_name = {s.name: s for s in stages}
    # Stingy keeps the authors' share of the classes (0.2 of 10: k = 2), whatever k top-k KD uses
    stingy = by_name["seed1/student/top-3-kd/reference-stingy-top-2"]
    assert stingy.row == "reference + Stingy top-2" and stingy.column == "top-3 KD"
    overrides = dict(o.split("=", 1) for o in stingy.overrides)
    assert overrides["distill.teacher_checkpoint"] == str(reference / "model.safetensors")
    assert (overrides["defence.name"], overrides["defence.top_k"]) == ("stingy", "2")
    assert (overrides["distill.method"], overrides["distill.top_k"]) == ("topk", "3")
    audited = dict(o.split("=", 1) for o in by_name["seed0/student/dafl/under-audit"].overrides)
    assert audited["distill.teacher_checkpoint"] == str(teacher / "model.safetensors")
    assert (audited["distill.method"], audited["distill.tau"], audited["distill.alpha"]) == ("dafl", "1.0", "1.0")
    assert "defence.name" not in audited
    alone = by_name["seed0/baseline/alone"]
    assert (alone.row, alone.column) == ("student baseline", "alone")
    assert not [s for s in stages if s.column == "alone" and s.kind == "student"]  # `teachers: []`: no rows
    # 100 classes: the authors' CIFAR-100 share, 0.1 (k = 10); --stingy-k overrides it
    assert list(audit.pipeline_tree(plan, *checked[:3], classes=100)["defences"]) == ["reference + Stingy top-10", "reference + noise"]
    named = audit.AuditPlan(str(teacher), str(reference), ATTACK_RECIPE, stingy_k=7, out=tmp_path / "out")
    assert audit.pipeline_tree(named, *checked[:3], classes=100)["defences"]["reference + Stingy top-7"]["set"] == {
        "defence.name": "stingy", "defence.top_k": 7}


def test_margins_and_verdicts_from_hand_computed_results():
    def result(kind: str, row: str, column: str, seed: int, top1: float) -> Result:
        return Result(kind, row, column, seed, (), top1)

    results = [result("baseline", "student baseline", "alone", 0, 90.0), result("baseline", "student baseline", "alone", 1, 92.0),
               result("student", "reference", "KD", 0, 95.0), result("student", "reference", "KD", 1, 97.0),
               result("student", "under audit", "KD", 0, 80.0), result("student", "under audit", "KD", 1, 84.0),
               result("student", "reference", "DAFL", 0, 60.0), result("student", "under audit", "DAFL", 0, 89.5),
               result("student", "reference", "Skeptical", 0, 93.0), result("student", "under audit", "Skeptical", 0, 94.5)]
    kd, dafl, skeptical = audit.protections(results, ["KD", "DAFL", "Skeptical"])
    assert kd.bar == 96.0 and kd.margin("under audit") == 14.0  # max(96, 91) - 82
    assert dafl.bar == 91.0 and dafl.margin("under audit") == pytest.approx(1.5)  # the student alone is the bar
    assert skeptical.margin("under audit") == pytest.approx(-1.5)
    assert audit.verdict(kd, 2.0).startswith("protected: the stolen student lands 14.00 points below")
    assert audit.verdict(dafl, 2.0).startswith("weak: only 1.50 points below")
    assert audit.verdict(skeptical, 2.0) == ("not protected: the attack wins by 1.50 points "
                                             "(-1.50 below the reference-taught)")
    assert audit.verdict(dafl, 2.0).endswith("(-29.50 below the reference-taught) (threshold 2)")
    assert audit.verdict(audit.Protection("X", [], {}), 2.0) == "no result yet"


def test_unknown_names_are_one_line():
    with pytest.raises(UserError, match=r"^--defences: unknown defence 'stingyy'; expected: stingy, noise"):
        audit.parse_defences(["stingyy"])
    assert audit.parse_attacks(["all"]) == ("kd", "topk", "skeptical", "dafl", "deepinversion") and audit.parse_defences(["none"]) == ()


# ----------------------------------------------------------------------------- the audit of docs/audit.md, end to end


@pytest.fixture(scope="module")
def quickstart_teachers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs/audit.md's first step: the quickstart's seed-0 teachers."""
    root = tmp_path_factory.mktemp("audit")
    done = cli("quickstart", "--seeds", "0", cwd=root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return root


def test_the_readme_audit_on_digits_has_every_cell(quickstart_teachers: Path, mlflow_store: str):
    root = quickstart_teachers
    command = ["audit", "--teacher", "runs/quickstart/seed0/nasty/cifar-cnn-nasty",
               "--reference", "runs/quickstart/seed0/teacher/cifar-cnn-normal", "--parallel", "2"]
    # 33 ResNet-8 runs: about 5 min on an idle 2-core machine; the limit only catches a hang, under any load
    done = cli(*command, cwd=root, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = root / "runs" / "audit" / "report"
    text = (folder / "audit.md").read_text(encoding="utf-8")
    assert text in done.stdout
    columns = list(audit.attack_columns(audit.AuditPlan("", "", ATTACK_RECIPE)))
    assert len(columns) == 8  # KD at 2 x 2 (τ, α), top-2 KD, Skeptical, DAFL, DeepInversion
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| attack")
            and not line.startswith("| teacher")]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == [
        "reference", "under audit", "reference + Stingy top-2", "reference + noise", *columns]
    assert not any("–" in r.split(" | ", 2)[-1] for r in rows[1:]), text  # every cell has its figure
    # the margins agree with the stage folders' own results
    stages = pipeline.expand(pipeline.load_pipeline(root / "runs" / "audit" / "audit.yaml"))
    top1 = {(s.row, s.column): json.loads((s.output_dir / "metrics.json").read_text())["final"]["test_top1"]
            for s in stages}
    with open(folder / "audit.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    for column in columns:
        bar = max(top1["reference", column], top1["student baseline", "alone"])
        margin = next(float(r["margin"]) for r in table if r["attack"] == column and r["row"] == "under audit")
        assert margin == pytest.approx(bar - top1["under audit", column], abs=1e-3)
    assert (folder / "audit.png").stat().st_size > 10_000
    # the data-free students never read the training split; each run names its attack and defence
    client = MlflowClient(tracking_uri=mlflow_store)
    experiment = client.get_experiment_by_name("audit")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    report_run = next(r for r in runs if r.info.run_name == "audit/report")
    assert report_run.data.tags["mlflow.note.content"] == text
    dafl = next(r for r in runs if r.info.run_name == "audit/seed0/student/dafl/reference-noise")
    assert (dafl.data.tags["attack"], dafl.data.tags["defence"]) == ("dafl", "noise")
    assert dafl.data.params["datafree.latent_dim"] == "100" and dafl.data.params["defence.name"] == "noise"
    assert _contexts(client, dafl.info.run_id) == ["eval"]
    # the same command again trains nothing: the battery is an ordinary pipeline
    again = cli(*command, cwd=root, timeout=600)
    assert again.returncode == 0 and f"{len(stages)} stages: 0 ran, {len(stages)} skipped" in again.stdout


def _contexts(client: MlflowClient, run_id: str) -> list[str]:
    run = client.get_run(run_id)
    return [tag.value for d in run.inputs.dataset_inputs for tag in d.tags if tag.key == "mlflow.data.context"]


def test_the_audit_file_is_readable_yaml_with_absolute_paths(tmp_path: Path):
    teacher, reference = fake_model(tmp_path / "t"), fake_model(tmp_path / "r")
    plan = audit.AuditPlan(str(teacher), str(reference), ATTACK_RECIPE, out=tmp_path / "out")
    checked = audit.check(plan)
    tree = yaml.safe_load(audit.write_pipeline(plan, audit.pipeline_tree(plan, *checked[:3])).read_text())
    assert Path(tree["teachers"]["reference"]["checkpoint"]).is_absolute()
    assert tree["students"]["alone"] == {"recipe": str(ATTACK_RECIPE), "set": {"model.name": "cifar_resnet8"}, "teachers": [],
                                         "baseline": True}


# ----------------------------------------------------------------------------- attacks as runs


@pytest.mark.parametrize("method", ["dafl", "skeptical"])
def test_an_interrupted_attack_resumes_to_the_same_student(method: str, tmp_path: Path, capsys):
    """DAFL's generator, its Adam state and noise stream are checkpointed; the skeptical
    student's auxiliary head too: stopped mid-run and resumed, the exported student is
    bit-identical to one trained straight through, and it is the plain architecture."""
    from safetensors.torch import load_file

    from nt_dist.config import load_recipe
    from nt_dist.train import train

    teacher = fake_model(tmp_path / "teacher")
    common = ["run.epochs=2", "run.progress=false", "data.train_subset=128", "data.batch_size=32",
              "tracking.enabled=false", f"distill.teacher_checkpoint={teacher}", f"distill.method={method}",
              "datafree.batch_size=16", "datafree.steps_per_epoch=4"]

    def run(folder: str, *extra: str) -> None:
        train(load_recipe(ATTACK_RECIPE, [*common, f"run.output_dir={tmp_path / folder}", *extra]))

    run("straight")
    run("resumed", "run.max_steps=5")  # stops in the second epoch, after its checkpoint
    capsys.readouterr()
    run("resumed")
    assert "(epoch 2, step 1 of the epoch, global step 5)" in capsys.readouterr().out  # resumed, not restarted
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert straight.keys() == resumed.keys() == create_model("cifar_resnet8", num_classes=10).state_dict().keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
