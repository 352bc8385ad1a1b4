"""`nt-dist audit`: the attack battery against a teacher and a reference, and its protection report."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from nt_dist import audit, audit_render, pipeline
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


def result(kind: str, row: str, column: str, seed: int, top1: float) -> Result:
    return Result(kind, row, column, seed, (), top1)


NOISE = "reference + noise"
HAND_RESULTS = [
    result("baseline", "student baseline", "alone", 0, 90.0), result("baseline", "student baseline", "alone", 1, 92.0),
    result("student", "reference", "KD", 0, 95.0), result("student", "reference", "KD", 1, 97.0),
    result("student", "under audit", "KD", 0, 80.0), result("student", "under audit", "KD", 1, 84.0),
    result("student", NOISE, "KD", 0, 95.5),
    result("student", "reference", "top-2 KD", 0, 90.0), result("student", "under audit", "top-2 KD", 0, 89.0),
    result("student", "reference", "Skeptical", 0, 93.0), result("student", "under audit", "Skeptical", 0, 94.5),
    # data-free: both far below the student alone (91); what the teacher withholds is 40 - 15, not 91 - 15
    result("student", "reference", "DAFL", 0, 40.0), result("student", "under audit", "DAFL", 0, 15.0),
    # the nasty teacher helps this attack: 60 from the reference, 89.5 from it (below the student alone)
    result("student", "reference", "DeepInversion", 0, 60.0), result("student", "under audit", "DeepInversion", 0, 89.5),
]
HAND_COLUMNS = ["KD", "top-2 KD", "Skeptical", "DAFL", "DeepInversion", "X"]  # X: no result yet


def test_margins_are_against_the_same_attack_on_the_reference():
    kd, topk, skeptical, dafl, deepinversion, missing = audit.protections(HAND_RESULTS, HAND_COLUMNS)
    assert kd.alone_mean == 91.0 and kd.mean("reference") == 96.0
    assert kd.margin("under audit") == 14.0  # 96 - 82
    assert kd.margin(NOISE) == 0.5  # 96 - 95.5: a defence row, against the same reference
    assert kd.margin("reference") is None and missing.margin("under audit") is None
    assert topk.margin("under audit") == 1.0
    assert skeptical.margin("under audit") == pytest.approx(-1.5)
    assert dafl.margin("under audit") == 25.0  # 40 - 15; the student alone (91) is not the bar
    assert deepinversion.margin("under audit") == pytest.approx(-29.5)  # 60 - 89.5, though 1.5 below alone
    assert topk.margin(NOISE) is None  # no student stolen through the noise for this attack


def test_verdicts_read_the_margin_against_the_threshold():
    kd, topk, skeptical, dafl, deepinversion, missing = audit.protections(HAND_RESULTS, HAND_COLUMNS)
    assert audit.verdict(kd, 2.0) == ("protected: 14.00 points below the same attack on the reference "
                                      "(82.00 vs 96.00; the student alone: 91.00)")
    assert audit.verdict(topk, 2.0) == ("weak: only 1.00 points below the same attack on the reference "
                                        "(89.00 vs 90.00; the student alone: 91.00; threshold 2)")
    assert audit.verdict(topk, 0.5).startswith("protected: 1.00 points below")
    assert audit.verdict(skeptical, 2.0) == ("not protected: 1.50 points above the same attack on the reference "
                                             "(94.50 vs 93.00; the student alone: 91.00)")
    assert audit.verdict(dafl, 2.0).startswith("protected: 25.00 points below the same attack on the reference")
    assert audit.verdict(deepinversion, 2.0).startswith("not protected: 29.50 points above")
    assert audit.verdict(kd, 2.0, row=NOISE).startswith("weak: only 0.50 points below")
    assert audit.verdict(missing, 2.0) == "no result yet"
    level = audit.Protection("Y", [], {"reference": [50.0], "under audit": [50.0]})
    assert audit.verdict(level, 2.0) == "not protected: level with the same attack on the reference (50.00 vs 50.00)"


def test_the_bottom_line_counts_the_verdicts():
    table = audit.protections(HAND_RESULTS, HAND_COLUMNS)
    assert audit.bottom_line(table, 2.0) == ("protected against 2 of 6 attacks; weak against top-2 KD, Skeptical, "
                                             "DeepInversion; no result yet: X")
    assert audit.bottom_line(table[:2], 0.5) == "protected against 2 of 2 attacks; weak against none"
    assert audit.bottom_line(table[:1], 20.0) == "protected against 0 of 1 attack; weak against KD"
    assert audit.bottom_line(table[:1], 2.0, row=NOISE) == "protected against 0 of 1 attack; weak against KD"
    assert audit.bottom_line([], 2.0) == "protected against 0 of 0 attacks; weak against none"


def test_the_report_starts_with_the_bottom_line_and_its_csv_holds_the_margins():
    table = audit.protections(HAND_RESULTS, HAND_COLUMNS)
    plan = audit.AuditPlan("runs/nasty", "runs/normal", ATTACK_RECIPE)
    rows = ["reference", "under audit", NOISE]
    text = audit.markdown(plan, "cifar_resnet8", "digits", {"reference": 99.0, "under audit": 98.5}, rows, table, 2)
    lines = text.splitlines()
    assert lines[0] == audit.bottom_line(table, 2.0) and lines[1] == ""
    assert lines[2] == "### Protection audit: runs/nasty (under audit) vs runs/normal (reference)"
    kd = next(line for line in lines if line.startswith("| KD |"))
    assert kd.split(" | ")[1:7] == ["91.00 ± 1.41", "96.00 ± 1.41", "82.00 ± 2.83", "+14.00", "95.50", "+0.50"]
    assert "- **DAFL**: protected: 25.00 points below the same attack on the reference" in text
    with io.StringIO(audit.csv_text({"reference": 99.0}, rows, table)) as handle:
        margins = {(r["attack"], r["row"]): r["margin"] for r in csv.DictReader(handle)}
    assert margins["KD", "under audit"] == "14.0000" and margins["KD", NOISE] == "0.5000"
    assert margins["DAFL", "under audit"] == "25.0000" and margins["DAFL", "reference"] == ""
    assert margins["KD", "alone"] == "" and margins["(teacher)", "reference"] == ""


def test_the_bar_chart_starts_at_zero_with_its_legend_outside_the_axes(tmp_path: Path):
    table = audit.protections(HAND_RESULTS, HAND_COLUMNS)
    rows = ["reference", "under audit", NOISE]
    summary = audit.bottom_line(table, 2.0)
    path = audit.bar_chart(table, rows, tmp_path / "report" / "audit.png", "audit: nasty vs normal", summary)
    with Image.open(path) as image:
        recorded = dict(image.text)
        width, height = image.size
    assert recorded["Title"] == "audit: nasty vs normal" and recorded["Description"] == summary
    assert recorded["YAxisBottom"] == "0" and recorded["Legend"] == "outside, right"
    assert [p.name for p in path.parent.iterdir()] == ["audit.png"]  # no temporary left
    # the same figure, measured: the axes start at 0, the legend's box lies right of the axes' box,
    # and the tight crop kept it (the PNG is wider than the figure's own width up to the axes' right edge)
    figure = audit_render.bar_figure(table, rows, "t", summary)
    figure.canvas.draw()
    axes = figure.axes[0]
    assert axes.get_ylim()[0] == 0
    legend, frame = axes.get_legend().get_window_extent(), axes.get_window_extent()
    assert legend.x0 >= frame.x1 and not legend.overlaps(frame)
    assert width > height > 200
    assert [t.get_text() for t in axes.get_legend().get_texts()] == [
        "student alone", "from reference", "from under audit", f"from {NOISE}"]


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
    bottom = text.splitlines()[0]  # the bottom line first
    assert bottom.startswith("protected against ") and " of 8 attacks; weak against " in bottom, text
    assert any(line.startswith(f"nt-dist audit: {bottom}; report in ") for line in done.stderr.splitlines())
    with Image.open(folder / "audit.png") as image:
        assert image.text["Description"] == bottom and image.text["YAxisBottom"] == "0"
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
    for column in columns:  # against the same attack on the reference
        margin = next(float(r["margin"]) for r in table if r["attack"] == column and r["row"] == "under audit")
        assert margin == pytest.approx(top1["reference", column] - top1["under audit", column], abs=1e-3)
    assert (folder / "audit.png").stat().st_size > 10_000
    # the data-free students never read the training split; each run names its attack and defence
    client = MlflowClient(tracking_uri=mlflow_store)
    experiment = client.get_experiment_by_name("audit")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    report_run = next(r for r in runs if r.info.run_name == "audit/report")
    assert report_run.data.tags["mlflow.note.content"] == text
    # found by its tags, whatever the UI names it (one seed: one DAFL student through the noise)
    dafl = next(r for r in runs if (r.data.tags.get("attack"), r.data.tags.get("defence")) == ("dafl", "noise"))
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
