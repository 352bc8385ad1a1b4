"""The paper's recipes, pipelines and figures: recipes/paper/ and nt_dist/paper_tables.yaml.

Fast and CPU-only: nothing is trained. The numbers below are written out by hand from
../shared/PAPER.md (Ma et al., ICLR 2021, and the authors' VITA-Group/Nasty-Teacher configs), so
a changed number in a recipe or in the tables file fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from nt_dist.config import Recipe, load_recipe, recipe_from_dict, recipe_to_dict
from nt_dist.models import list_models

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "recipes" / "paper"
TABLES_FILE = REPO / "nt_dist" / "paper_tables.yaml"

# ---------------------------------------------------------------------------------------------
# Base recipes: the paper's settings, by hand
# ---------------------------------------------------------------------------------------------

SGD_160 = {"optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
           "data.batch_size": 128, "run.epochs": 160, "optim.schedule": "multistep",
           "optim.milestones": (80, 120), "optim.gamma": 0.1}
SGD_200 = {**SGD_160, "run.epochs": 200, "optim.milestones": (60, 120, 160), "optim.gamma": 0.2}
# the CNN: Adam 1e-3, 100 epochs, never decayed, no weight decay (the authors' train_kd.py)
ADAM_100 = {"optim.name": "adam", "optim.lr": 1e-3, "optim.weight_decay": 0.0, "data.batch_size": 128,
            "run.epochs": 100, "optim.schedule": "constant", "optim.milestones": ()}
CIFAR10 = {"data.name": "cifar10", "data.image_size": 32, "data.augment": "pad_crop_flip"}
CIFAR100 = {"data.name": "cifar100", "data.image_size": 32, "data.augment": "pad_crop_flip"}
TINY = {"data.name": "tinyimagenet", "data.image_size": 64, "data.augment": "rotate_flip"}


def _kd(tau: float) -> dict[str, Any]:
    return {"distill.tau": tau, "distill.alpha": 0.9}


# DAFL's released CIFAR commands (Table 6): --n_epochs 2000 --batch_size 1024 --lr_G 0.02 --lr_S 0.1
# --latent_dim 1000; 120 steps an epoch, lr_S x0.1 at 800 and 1600; KL at T = 1; the generator's
# loss weights --oh/--ie/--a: 0.05/5/0.01 (CIFAR-10), 0.5/20/0.1 (CIFAR-100)
DAFL = {"run.role": "student", "model.name": "cifar_resnet18", "distill.method": "dafl", "distill.tau": 1.0,
        "distill.alpha": 1.0, "run.epochs": 2000, "optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9,
        "optim.weight_decay": 5e-4, "optim.schedule": "multistep", "optim.milestones": (800, 1600),
        "optim.gamma": 0.1, "datafree.batch_size": 1024, "datafree.steps_per_epoch": 120,
        "datafree.latent_dim": 1000, "datafree.generator_lr": 0.02}


def _dafl_weights(oh: float, ie: float, a: float) -> dict[str, Any]:
    return {"datafree.onehot_weight": oh, "datafree.entropy_weight": ie, "datafree.activation_weight": a}


EXPECTED: dict[str, dict[str, Any]] = {
    "cifar10/teacher.yaml": {"run.role": "teacher", "model.name": "cifar_resnet18", **SGD_160, **CIFAR10},
    "cifar10/nasty.yaml": {"run.role": "nasty", "model.name": "cifar_resnet18", **SGD_160, **CIFAR10,
                           "nasty.tau": 4.0, "nasty.omega": 0.004},
    "cifar10/nasty_released.yaml": {"run.role": "nasty", "model.name": "cifar_resnet18", **SGD_160, **CIFAR10,
                                    "nasty.tau": 4.0, "nasty.omega": 0.04},
    "cifar10/student.yaml": {"run.role": "student", **SGD_160, **CIFAR10, **_kd(4.0)},
    "cifar10/student_dafl.yaml": {**DAFL, **CIFAR10, **_dafl_weights(0.05, 5.0, 0.01)},
    "cifar10/student_cnn.yaml": {"run.role": "student", "model.name": "cifar_cnn", **ADAM_100, **CIFAR10,
                                 **_kd(4.0)},
    "cifar100/teacher.yaml": {"run.role": "teacher", **SGD_200, **CIFAR100},
    "cifar100/nasty.yaml": {"run.role": "nasty", **SGD_200, **CIFAR100, "nasty.tau": 20.0, "nasty.omega": 0.005},
    "cifar100/student.yaml": {"run.role": "student", **SGD_200, **CIFAR100, **_kd(20.0)},
    "cifar100/student_dafl.yaml": {**DAFL, **CIFAR100, **_dafl_weights(0.5, 20.0, 0.1)},
    "tinyimagenet/teacher.yaml": {"run.role": "teacher", **SGD_200, **TINY},
    "tinyimagenet/nasty.yaml": {"run.role": "nasty", **SGD_200, **TINY, "nasty.tau": 20.0, "nasty.omega": 0.01},
    "tinyimagenet/student.yaml": {"run.role": "student", **SGD_200, **TINY, **_kd(20.0)},
}
DEFAULT_ROOT = {"cifar10": "data", "cifar100": "data", "tinyimagenet": "data/tiny-imagenet-200"}


def _get(recipe: Recipe, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(recipe, section), key)


def test_every_base_recipe_is_in_the_expected_table():
    found = sorted(str(p.relative_to(PAPER)) for p in PAPER.glob("*/*.yaml"))
    assert found == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_base_recipe_loads_with_the_papers_settings(name: str, tmp_path: Path):
    recipe = load_recipe(PAPER / name, [f"data.root={tmp_path}"])
    for dotted, want in EXPECTED[name].items():
        got = _get(recipe, dotted)
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-12, abs=0.0), dotted
        else:
            assert got == want, dotted
    assert recipe.data.root == str(tmp_path)
    # shipped as written: the data set's own folder, bf16 on GPUs, ordinary eval batch
    plain = load_recipe(PAPER / name)
    assert plain.data.root == DEFAULT_ROOT[plain.data.name]
    assert (plain.run.precision, plain.data.eval_batch_size, plain.data.loader) == ("bf16", 256, "auto")
    assert plain.tracking.experiment == f"paper-{plain.data.name}"
    if plain.optim.name == "sgd":
        assert not plain.optim.nesterov and plain.optim.warmup_epochs == 0


def test_cifar10_has_both_omegas_and_nothing_else_differs():
    paper = load_recipe(PAPER / "cifar10" / "nasty.yaml")
    released = load_recipe(PAPER / "cifar10" / "nasty_released.yaml")
    assert (paper.nasty.omega, released.nasty.omega) == (0.004, 0.04)
    a, b = recipe_to_dict(paper), recipe_to_dict(released)
    for tree in (a, b):
        tree["nasty"].pop("omega")
        tree["run"].pop("name")
        tree["run"].pop("output_dir")
        assert "ω" in tree["run"].pop("description")  # each file's header comment says which ω it has
    assert a == b


def test_students_share_their_teachers_data_and_schedule():
    """A student recipe and its teacher's differ only in role, model and the KD section."""
    for folder in ("cifar10", "cifar100", "tinyimagenet"):
        teacher = load_recipe(PAPER / folder / "teacher.yaml")
        for other in ("nasty.yaml", "student.yaml"):
            recipe = load_recipe(PAPER / folder / other)
            assert recipe.data == teacher.data and recipe.optim == teacher.optim, (folder, other)
            assert recipe.run.epochs == teacher.run.epochs


# ---------------------------------------------------------------------------------------------
# nt_dist/paper_tables.yaml
# ---------------------------------------------------------------------------------------------

TABLE_KEYS = ["table1", "table2", "table3", "table4", "table5_cifar10", "table5_cifar100",
              "table6_cifar10", "table6_cifar100"]
DATASETS = {"table1": "cifar10", "table2": "cifar100", "table3": "tinyimagenet", "table4": "cifar10",
            "table5_cifar10": "cifar10", "table5_cifar100": "cifar100", "table6_cifar10": "cifar10",
            "table6_cifar100": "cifar100"}
COLUMNS = {
    "table1": ["CNN", "ResNetC-20", "ResNetC-32", "ResNet-18"],
    "table2": ["ShuffleNetV2", "MobileNetV2", "ResNet-18", "self"],
    "table3": ["ShuffleNetV2", "MobileNetV2", "ResNet-18", "self"],
    "table4": ["CNN", "ResNetC-20", "ResNetC-32", "ResNet-18"],
    "table5_cifar10": ["ResNet-50", "ResNeXt-29"],
    "table5_cifar100": ["ResNet-50", "ResNeXt-29"],
    "table6_cifar10": ["DAFL student"],
    "table6_cifar100": ["DAFL student"],
}
ROWS = {
    "table1": ["student baseline", "ResNet-18 normal", "ResNet-18 nasty"],
    "table2": ["student baseline", "ResNet-18 normal", "ResNet-18 nasty", "ResNet-50 normal", "ResNet-50 nasty",
               "ResNeXt-29 normal", "ResNeXt-29 nasty"],
    "table4": ["student baseline", "ResNet-18 normal", "ResNet-18 (ResNet-18)", "ResNet-18 (CNN)",
               "ResNet-18 (ResNeXt-29)"],
    "table5_cifar10": ["student baseline", "ResNet-18 normal", "ResNet-18 nasty"],
    "table6_cifar10": ["ResNet-34 normal", "ResNet-34 nasty"],
}
ROWS["table3"] = ROWS["table2"]
ROWS["table5_cifar100"] = ROWS["table5_cifar10"]
ROWS["table6_cifar100"] = ROWS["table6_cifar10"]

# Cells checked one by one against ../shared/PAPER.md.
SPOT = {
    ("table1", "student baseline", "CNN"): [86.64, None],
    ("table1", "ResNet-18 nasty", "teacher"): [94.56, -0.57],
    ("table1", "ResNet-18 nasty", "ResNet-18"): [93.41, -1.72],
    ("table1", "ResNet-18 normal", "ResNetC-32"): [93.31, 0.27],
    ("table2", "ResNeXt-29 nasty", "MobileNetV2"): [1.55, -67.57],
    ("table2", "ResNet-50 nasty", "self"): [75.03, -3.09],
    ("table2", "ResNeXt-29 normal", "teacher"): [81.85, None],
    ("table2", "student baseline", "ResNet-18"): [77.44, None],
    ("table3", "ResNet-18 nasty", "ShuffleNetV2"): [23.16, -32.58],
    ("table3", "ResNet-50 nasty", "self"): [51.27, -10.74],
    ("table3", "ResNeXt-29 nasty", "teacher"): [60.21, -2.60],
    ("table3", "student baseline", "MobileNetV2"): [51.72, None],
    ("table4", "ResNet-18 (CNN)", "CNN"): [77.12, -9.52],
    ("table4", "ResNet-18 (CNN)", "teacher"): [93.82, -1.31],
    ("table4", "ResNet-18 (ResNeXt-29)", "ResNet-18"): [93.75, -1.38],
    ("table5_cifar10", "ResNet-18 normal", "ResNet-50"): [94.45, -0.53],
    ("table5_cifar10", "student baseline", "ResNeXt-29"): [95.60, None],
    ("table5_cifar100", "ResNet-18 nasty", "ResNeXt-29"): [78.88, -2.97],
    ("table6_cifar10", "ResNet-34 nasty", "DAFL student"): [86.15, -6.34],
    ("table6_cifar100", "ResNet-34 normal", "teacher"): [76.97, None],
    ("table6_cifar100", "ResNet-34 nasty", "teacher"): [76.12, -0.79],
}
# Deltas printed in the paper that are not the difference of the printed values (kept as printed).
MISPRINTS = {
    ("table2", "ResNet-50 normal", "self"),        # 80.02 - 78.12 = 1.90, printed (+1.96)
    ("table6_cifar100", "ResNet-34 nasty", "teacher"),  # 76.12 - 76.97 = -0.85, printed (-0.79)
}


@pytest.fixture(scope="module")
def tables() -> dict[str, Any]:
    return yaml.safe_load(TABLES_FILE.read_text(encoding="utf-8"))


def _cells(tables: dict[str, Any]):
    for key, table in tables.items():
        for row, cells in table["rows"].items():
            for column, cell in cells.items():
                yield key, row, column, cell


def test_tables_have_every_key_title_and_shape(tables):
    assert list(tables) == TABLE_KEYS
    for key, table in tables.items():
        assert set(table) == {"title", "dataset", "epoch", "columns", "rows"}, key
        assert table["title"].startswith("Table "), key
        assert table["dataset"] == DATASETS[key]
        assert table["epoch"] == "best"  # the authors report the best-test-epoch checkpoint
        assert table["columns"] == COLUMNS[key]
        assert list(table["rows"]) == ROWS[key]
    for key, row, column, cell in _cells(tables):
        assert column in ["teacher", *tables[key]["columns"]], (key, row, column)
        assert isinstance(cell, list) and len(cell) == 2, (key, row, column)
        value, delta = cell
        assert isinstance(value, float) and 0 < value < 100, (key, row, column)
        assert delta is None or isinstance(delta, float), (key, row, column)


def _expected_columns(key: str, row: str, columns: list[str]) -> list[str]:
    """The cells the paper prints in a row: no teacher for baselines or in Table 5; no "self"
    baseline in Tables 2 and 3."""
    wanted = list(columns)
    if row == "student baseline":
        return [c for c in wanted if c != "self"]
    return wanted if key.startswith("table5") else ["teacher", *wanted]


def test_every_row_has_every_printed_cell(tables):
    for key, table in tables.items():
        for row, cells in table["rows"].items():
            assert sorted(cells) == sorted(_expected_columns(key, row, table["columns"])), (key, row)


@pytest.mark.parametrize("where", sorted(SPOT))
def test_spot_cells_match_the_paper(tables, where):
    key, row, column = where
    assert tables[key]["rows"][row][column] == SPOT[where]


def _reference(key: str, rows: dict[str, Any], row: str, column: str) -> float:
    """The figure a printed delta is taken against."""
    if key == "table4":
        normal = "ResNet-18 normal"
    else:
        normal = row.rsplit(" ", 1)[0] + " normal"
    if column == "teacher":
        return rows[normal]["teacher"][0]  # nasty teacher vs normal teacher of its architecture
    if column == "self":
        return rows[normal]["teacher"][0]  # the student of the teacher's own architecture vs that teacher
    if column == "DAFL student":
        return rows[normal][column][0]  # Table 6: nasty teacher's DAFL student vs the normal one's
    return rows["student baseline"][column][0]


def test_every_delta_is_the_difference_of_printed_values(tables):
    checked = 0
    for key, row, column, (value, delta) in _cells(tables):
        rows = tables[key]["rows"]
        baseline_like = row == "student baseline" or (row.endswith("normal") and column == "teacher")
        if key.startswith("table6") and row.endswith("normal"):
            baseline_like = True  # the reference row: no deltas printed
        if baseline_like:
            assert delta is None, (key, row, column)
            continue
        assert delta is not None, (key, row, column)
        difference = round(value - _reference(key, rows, row, column), 2)
        if (key, row, column) in MISPRINTS:
            assert difference != delta, f"{key} {row} {column} is consistent now: drop it from MISPRINTS"
        else:
            assert difference == pytest.approx(delta, abs=1e-9), (key, row, column, difference)
        checked += 1
    assert checked == 94  # 9 + 27 + 27 + 19 + 2 x 4 + 2 x 2


def test_nasty_teacher_deltas_tables_1_to_3(tables):
    """Named separately: each nasty teacher's delta is its accuracy minus its normal teacher's."""
    for key in ("table1", "table2", "table3"):
        rows = tables[key]["rows"]
        for row in rows:
            if row.endswith(" nasty"):
                normal = rows[row.replace(" nasty", " normal")]["teacher"][0]
                value, delta = rows[row]["teacher"]
                assert round(value - normal, 2) == pytest.approx(delta, abs=1e-9), (key, row)


def test_table4_repeats_table1(tables):
    t1, t4 = tables["table1"]["rows"], tables["table4"]["rows"]
    assert t4["student baseline"] == t1["student baseline"]
    assert t4["ResNet-18 normal"] == t1["ResNet-18 normal"]
    assert t4["ResNet-18 (ResNet-18)"] == t1["ResNet-18 nasty"]


# ---------------------------------------------------------------------------------------------
# Pipeline files: recipes/paper/*.yaml
# ---------------------------------------------------------------------------------------------

PIPELINES = ["table1", "table1_released", "table2", "table3", "table4", "table5_cifar10", "table5_cifar100",
             "table6_cifar10", "table6_cifar100", "ablation_omega", "ablation_tau_a", "ablation_tau_s_cifar10",
             "ablation_tau_s_cifar100", "ablation_alpha", "ablation_share"]
TOP_KEYS = {"pipeline", "paper", "experiment", "output_dir", "launcher", "seeds", "set", "teachers", "nasty",
            "students", "sweep"}
STAGE_KEYS = {"teachers": {"recipe", "set", "distill"}, "nasty": {"recipe", "adversary", "set"},
              "students": {"recipe", "set", "self", "baseline", "teachers"}}
STAGES = {"teacher", "nasty", "student", "baseline"}
# network of each label of the paper's tables
ARCH = {"CNN": "cifar_cnn", "ResNetC-20": "cifar_resnet20", "ResNetC-32": "cifar_resnet32",
        "ResNet-18": "cifar_resnet18", "ResNet-50": "cifar_resnet50", "ResNeXt-29": "cifar_resnext29",
        "ShuffleNetV2": "cifar_shufflenetv2", "MobileNetV2": "cifar_mobilenetv2", "ResNet-34": "cifar_resnet34",
        "DAFL student": "cifar_resnet18"}  # Table 6: DAFL's ResNet-18 student
ROW_LABEL = re.compile(r"(?P<arch>\S+) (?:(?P<kind>normal|nasty)|\((?P<adversary>\S+)\))")


def _load_pipeline(name: str) -> dict[str, Any]:
    tree = yaml.safe_load((PAPER / f"{name}.yaml").read_text(encoding="utf-8"))
    assert isinstance(tree, dict)
    return tree


def _stage_recipe(name: str, pipe: dict[str, Any], stage: dict[str, Any], role: str, root: Path,
                  extra: dict[str, Any] | None = None) -> Recipe:
    """The stage's recipe with the pipeline's and the stage's overrides, as the pipeline runs it."""
    tree = yaml.safe_load((PAPER / stage["recipe"]).read_text(encoding="utf-8"))
    overrides = {**(pipe.get("set") or {}), **(stage.get("set") or {}), **(extra or {})}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        tree.setdefault(section, {})[key] = value
    if role in ("student", "baseline"):
        tree["run"]["role"] = role  # the pipeline sets these; a teacher's role is its recipe's (and set's)
    tree["data"]["root"] = str(root)
    recipe = recipe_from_dict(tree, source=f"{name}: {stage['recipe']}")
    assert recipe.run.role == role, (name, stage["recipe"])
    return recipe


def test_every_pipeline_file_is_listed():
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted(PIPELINES)


def test_label_networks_exist():
    assert set(ARCH.values()) <= set(list_models())


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_schema_and_references(name: str, tmp_path: Path):
    pipe = _load_pipeline(name)
    assert set(pipe) <= TOP_KEYS and TOP_KEYS - {"sweep"} <= set(pipe), set(pipe) ^ TOP_KEYS
    assert pipe["pipeline"] == name
    assert pipe["output_dir"] == f"runs/paper/{name}"
    assert pipe["experiment"] == "paper-" + name.replace("_", "-")
    assert pipe["launcher"] == "local" or (REPO / pipe["launcher"]).is_file()
    assert pipe["seeds"] and all(isinstance(s, int) and s >= 0 for s in pipe["seeds"])
    assert isinstance(pipe["set"], dict)
    for group, allowed in STAGE_KEYS.items():
        assert pipe[group], (name, group)
        for label, stage in pipe[group].items():
            assert set(stage) <= allowed, (name, label, set(stage) - allowed)
            assert (PAPER / stage["recipe"]).is_file(), (name, label, stage["recipe"])

    # rows: normal teachers (unless distill: false) and nasty teachers; adversaries are teachers
    teachers, nasty, students = pipe["teachers"], pipe["nasty"], pipe["students"]
    for label, stage in nasty.items():
        assert stage["adversary"] in teachers, (name, label)
    rows = [label for label, stage in teachers.items() if stage.get("distill", True)] + list(nasty)
    for label, stage in students.items():
        for row in stage.get("teachers") or []:
            assert row in rows, (name, label, row)

    # every stage validates as the pipeline runs it; its network is the one its label names
    root = tmp_path / "data"
    datasets, models = set(), {}
    for label, stage in teachers.items():
        recipe = _stage_recipe(name, pipe, stage, "teacher", root)
        match = ROW_LABEL.fullmatch(label)
        assert match and match["kind"] == "normal", label
        assert recipe.model.name == ARCH[match["arch"]], (name, label)
        datasets.add(recipe.data.name)
        models[label] = recipe.model.name
    for label, stage in nasty.items():
        recipe = _stage_recipe(name, pipe, stage, "nasty", root)
        match = ROW_LABEL.fullmatch(label)
        assert match and match["kind"] in (None, "nasty"), label
        assert recipe.model.name == ARCH[match["arch"]], (name, label)
        adversary_arch = match["adversary"] or match["arch"]  # "X nasty": against the normal X
        assert models[stage["adversary"]] == ARCH[adversary_arch], (name, label)
        datasets.add(recipe.data.name)
        models[label] = recipe.model.name
    for label, stage in students.items():
        if stage.get("self"):
            assert "model.name" not in (stage.get("set") or {}), (name, label)
            for row in rows:
                extra = {"model.name": models[row]}
                for role in ("student", "baseline"):
                    datasets.add(_stage_recipe(name, pipe, stage, role, root, extra).data.name)
            continue
        for role in ("student", "baseline"):
            recipe = _stage_recipe(name, pipe, stage, role, root)
            assert recipe.model.name == ARCH[label], (name, label)
            datasets.add(recipe.data.name)
    assert len(datasets) == 1, (name, datasets)

    # the sweep: known keys, known stages, every value valid in every stage it reaches
    for dotted, spec in (pipe.get("sweep") or {}).items():
        section, _, key = dotted.partition(".")
        if isinstance(spec, dict):
            assert set(spec) == {"values", "stages"}, (name, dotted)
            values, stages = spec["values"], spec["stages"]
            assert set(stages) <= STAGES, (name, dotted)
        else:
            values = spec
            stages = {"nasty": ["nasty"], "distill": ["student"]}.get(section, sorted(STAGES))
        assert isinstance(values, list) and len(values) >= 2, (name, dotted)
        for value in values:
            for group, role in (("teachers", "teacher"), ("nasty", "nasty"), ("students", "student"),
                                ("students", "baseline")):
                if role not in stages:
                    continue
                for stage in pipe[group].values():
                    extra = {dotted: value}
                    if stage.get("self"):
                        extra["model.name"] = "cifar_resnet18"
                    _stage_recipe(name, pipe, stage, role, root, extra)


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_labels_are_the_papers(name: str, tables):
    pipe = _load_pipeline(name)
    paper = pipe["paper"]
    if name.startswith("ablation"):
        assert paper == "" and pipe["sweep"], name
        return
    assert paper in tables and not pipe.get("sweep"), name
    table = tables[paper]
    rows = [label for label, stage in pipe["teachers"].items() if stage.get("distill", True)] + list(pipe["nasty"])
    # the pipeline reproduces the whole table: every row and column, and nothing else
    assert sorted(rows) == sorted(r for r in table["rows"] if r != "student baseline"), name
    assert list(pipe["students"]) == table["columns"], name
    assert pipe["seeds"] == [0, 1, 2]
    # the students trained alone are the table's baseline row, and "self" is measured against its teacher
    baselines = [label for label, stage in pipe["students"].items()
                 if stage.get("baseline", True) and not stage.get("self")]
    assert sorted(baselines) == sorted(table["rows"].get("student baseline", {})), name  # Table 6 has none
    # every recipe of the pipeline reads the table's data set
    for group in ("teachers", "nasty", "students"):
        for stage in pipe[group].values():
            recipe = load_recipe(PAPER / stage["recipe"])
            assert recipe.data.name == table["dataset"], (name, stage["recipe"])


def test_table1_variants_differ_only_in_omega():
    paper, released = _load_pipeline("table1"), _load_pipeline("table1_released")
    assert paper["nasty"]["ResNet-18 nasty"]["recipe"] == "cifar10/nasty.yaml"
    assert released["nasty"]["ResNet-18 nasty"]["recipe"] == "cifar10/nasty_released.yaml"
    for tree in (paper, released):
        for key in ("pipeline", "experiment", "output_dir"):
            tree.pop(key)
        tree["nasty"]["ResNet-18 nasty"].pop("recipe")
    assert paper == released


def test_ablation_share_counts_cifar10_samples():
    sweep = _load_pipeline("ablation_share")["sweep"]["data.train_subset"]
    assert sweep["stages"] == ["student", "baseline"]
    assert all(0 < n <= 50_000 for n in sweep["values"]) and max(sweep["values"]) == 50_000


def test_ablation_omega_spans_zero_to_well_above_the_papers():
    values = _load_pipeline("ablation_omega")["sweep"]["nasty.omega"]
    assert min(values) == 0 and 0.004 in values and 0.04 in values and max(values) >= 10 * 0.004


# the run counts the pipelines' header comments state, per seed
RUNS_PER_SEED = {"table1": 14, "table1_released": 14, "table2": 33, "table3": 33, "table4": 26,
                 "table5_cifar10": 8, "table5_cifar100": 8, "table6_cifar10": 4, "table6_cifar100": 4,
                 "ablation_omega": 29, "ablation_tau_a": 20,
                 "ablation_tau_s_cifar10": 28, "ablation_tau_s_cifar100": 28, "ablation_alpha": 28,
                 "ablation_share": 38}


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_expands_into_valid_stages(name: str, tmp_path: Path):
    """Through nt_dist.pipeline itself: every stage's recipe, with every override the pipeline
    adds, validates and trains the role of its stage."""
    pipeline = pytest.importorskip("nt_dist.pipeline")
    spec = pipeline.load_pipeline(PAPER / f"{name}.yaml")
    stages = pipeline.expand(spec, seeds=[0])
    assert len(stages) == RUNS_PER_SEED[name]
    header = (PAPER / f"{name}.yaml").read_text(encoding="utf-8")
    assert re.search(rf"\b{RUNS_PER_SEED[name]} runs per seed|= {RUNS_PER_SEED[name]}\.", header), name
    for stage in stages:
        recipe = load_recipe(stage.recipe, [*stage.overrides, f"data.root={tmp_path}"])
        assert recipe.run.role == stage.kind, stage.name
