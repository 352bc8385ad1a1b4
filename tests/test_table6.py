"""Table 6 of Ma et al., ICLR 2021: data-free KD (DAFL) from ResNet-34 teachers, as the pipelines
recipes/paper/table6_cifar10.yaml and table6_cifar100.yaml describe it.

Nothing is trained: the graph, every stage's resolved recipe, and the report of fake results
with the paper's figures beside them (nt_dist/paper_tables.yaml).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nt_dist import report
from nt_dist.config import load_recipe
from nt_dist.pipeline import BASELINE_ROW, TEACHER_COLUMN, expand, load_pipeline
from nt_dist.rundir import RESULTS_FILE

PAPER = Path(__file__).resolve().parents[1] / "recipes" / "paper"
NORMAL, NASTY, DAFL = "ResNet-34 normal", "ResNet-34 nasty", "DAFL student"
# the paper's τ_A and ω for each data set, as the Table 1 / Table 2 nasty recipes hold them
NASTY_KD = {"cifar10": (4.0, 0.004), "cifar100": (20.0, 0.005)}
# DAFL's released CIFAR commands (huawei-noah/Efficient-Computing, Data-Efficient-Model-Compression/
# DAFL/README.md): --n_epochs 2000 --batch_size 1024 --lr_G 0.02 --lr_S 0.1 --latent_dim 1000, and
# --oh 0.05 --ie 5 --a 0.01 (CIFAR-10) or --oh 0.5 --ie 20 --a 0.1 (CIFAR-100); DAFL-train.py runs
# 120 steps per epoch and multiplies lr_S by 0.1 at epochs 800 and 1600
DATAFREE = {"batch_size": 1024, "steps_per_epoch": 120, "latent_dim": 1000, "generator_lr": 0.02}
GENERATOR_LOSS = {"cifar10": {"onehot_weight": 0.05, "entropy_weight": 5.0, "activation_weight": 0.01},
                  "cifar100": {"onehot_weight": 0.5, "entropy_weight": 20.0, "activation_weight": 0.1}}
DATASETS = ["cifar10", "cifar100"]


def _stages(dataset: str, output_dir: Path | None = None, seeds=(0, 1, 2)):
    spec = load_pipeline(PAPER / f"table6_{dataset}.yaml")
    return spec, expand(spec, seeds=list(seeds), output_dir=None if output_dir is None else str(output_dir))


def _recipe(stage):
    return load_recipe(stage.recipe, list(stage.overrides) + ["data.root=/tmp/x"])


@pytest.mark.parametrize("dataset", DATASETS)
def test_the_pipeline_is_the_papers_table(dataset: str):
    spec, stages = _stages(dataset)
    assert (spec.name, spec.spec.paper, spec.experiment) == (f"table6_{dataset}", f"table6_{dataset}",
                                                             f"paper-table6-{dataset}")
    assert spec.spec.seeds == [0, 1, 2] and not spec.spec.sweep
    assert list(spec.spec.students) == report.paper_tables()[f"table6_{dataset}"]["columns"]
    header = (PAPER / f"table6_{dataset}.yaml").read_text(encoding="utf-8")
    assert re.search(r"\b4 runs per seed, 12 for seeds 0 1 2", header)
    assert f"nt-dist pipeline recipes/paper/table6_{dataset}.yaml" in header
    for seed in (0, 1, 2):
        mine = [s for s in stages if s.seed == seed]
        assert [s.kind for s in mine] == ["teacher", "nasty", "student", "student"]  # no baseline
        assert [(s.row, s.column) for s in mine] == [(NORMAL, TEACHER_COLUMN), (NASTY, TEACHER_COLUMN),
                                                     (NORMAL, DAFL), (NASTY, DAFL)]
        assert all(s.row != BASELINE_ROW for s in mine)
    assert len(stages) == 12


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_stage_resolves_to_the_papers_and_dafls_settings(dataset: str):
    _, stages = _stages(dataset, seeds=[1])
    teacher, nasty, *students = stages
    tau_a, omega = NASTY_KD[dataset]

    recipe = _recipe(teacher)
    assert (recipe.run.role, recipe.model.name, recipe.data.name) == ("teacher", "cifar_resnet34", dataset)
    assert recipe.distill.method == "kd" and recipe.run.seed == 1

    recipe = _recipe(nasty)
    assert (recipe.run.role, recipe.model.name, recipe.data.name) == ("nasty", "cifar_resnet34", dataset)
    assert (recipe.nasty.tau, recipe.nasty.omega) == (tau_a, omega)
    assert nasty.needs == (teacher.name,)
    assert recipe.nasty.adversary_checkpoint == str(teacher.output_dir)

    for student, source in zip(students, (teacher, nasty), strict=True):
        assert student.needs == (source.name,)
        assert f"distill.teacher_checkpoint={source.output_dir}" in student.overrides
        recipe = _recipe(student)
        assert (recipe.run.role, recipe.model.name, recipe.data.name) == ("student", "cifar_resnet18", dataset)
        assert recipe.distill.method == "dafl"
        assert recipe.distill.teacher_checkpoint == str(source.output_dir)
        assert recipe.distill.teacher == ""  # ResNet-34: read from the teacher's checkpoint
        assert (recipe.distill.tau, recipe.distill.alpha) == (1.0, 1.0)  # DAFL's kdloss: KL at T = 1, no labels
        for key, want in {**DATAFREE, **GENERATOR_LOSS[dataset]}.items():
            assert getattr(recipe.datafree, key) == want, key
        assert recipe.run.epochs == 2000
        assert (recipe.optim.name, recipe.optim.lr, recipe.optim.momentum, recipe.optim.weight_decay) == \
            ("sgd", 0.1, 0.9, 5e-4)
        assert (recipe.optim.schedule, recipe.optim.milestones, recipe.optim.gamma) == ("multistep", (800, 1600), 0.1)
        assert recipe.tracking.experiment == f"paper-table6-{dataset}"
        assert recipe.tracking.tags["paper"] == f"table6_{dataset}" and recipe.tracking.tags["column"] == DAFL
        assert "training split is never read" in " ".join(recipe.run.description.split())


def _fake_results(stages, figures: dict[tuple[str, str], tuple[float, ...]]) -> None:
    for stage in stages:
        stage.output_dir.mkdir(parents=True, exist_ok=True)
        top1 = figures[stage.row, stage.column][stage.seed]
        (stage.output_dir / RESULTS_FILE).write_text(json.dumps({"final": {"test_top1": top1}}), encoding="utf-8")


@pytest.mark.parametrize(("dataset", "paper_normal", "paper_nasty"), [
    ("cifar10", ("95.42", "92.49"), ("94.54 (−0.88)", "86.15 (−6.34)")),
    ("cifar100", ("76.97", "71.06"), ("76.12 (−0.79)", "65.67 (−5.39)")),
])
def test_the_report_places_the_papers_figures(dataset: str, paper_normal, paper_nasty, tmp_path: Path):
    _, stages = _stages(dataset, tmp_path, seeds=[0, 1])
    _fake_results(stages, {(NORMAL, TEACHER_COLUMN): (95.0, 96.0), (NASTY, TEACHER_COLUMN): (94.0, 94.0),
                           (NORMAL, DAFL): (92.0, 93.0), (NASTY, DAFL): (85.0, 86.0)})
    results, missing = report.from_stages(stages)
    assert missing == [] and len(results) == 8
    key = f"table6_{dataset}"
    title = report.paper_tables()[key]["title"]
    table = report.build_table(results, title, row_order=report.paper_tables()[key]["rows"])
    assert table.columns == [TEACHER_COLUMN, DAFL] and table.rows[1:] == [NORMAL, NASTY]
    lines = report.markdown(table, paper=key).splitlines()
    assert lines[0] == f"### {title}"
    assert lines[2] == "| Teacher | Teacher top-1 | Student DAFL student |"
    cells = {}  # row label -> its cells ("| row | teacher | DAFL student |")
    for line in lines[4:]:
        if line.startswith("| "):
            label, *rest = line.removeprefix("| ").removesuffix(" |").split(" | ")
            cells[label] = rest
    assert BASELINE_ROW not in cells  # no student trained alone here, and the paper prints none
    assert cells[NORMAL] == [f"95.50 ± 0.71 · paper {paper_normal[0]}", f"92.50 ± 0.71 · paper {paper_normal[1]}"]
    teacher, student = cells[NASTY]
    assert teacher == f"94.00 ± 0.00 (−1.50) · paper {paper_nasty[0]}"  # the nasty teacher against its adversary
    # without a baseline, the nasty row's student is compared with the normal row's (as the paper does)
    assert student == f"85.50 ± 0.71 (−7.00) · paper {paper_nasty[1]}"
