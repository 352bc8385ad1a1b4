"""Recipes: YAML -> frozen dataclasses; every mistake is one line naming file and key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from nt_dist.config import Recipe, load_recipe, recipe_from_dict, recipe_to_dict
from nt_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides or [])
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_validates(name: str):
    path = REPO / "recipes" / name
    if "pipeline" in yaml.safe_load(path.read_text()):  # a pipeline file: its stages' recipes validate
        from nt_dist.pipeline import expand, load_pipeline

        stages = expand(load_pipeline(path))
        assert all(isinstance(load_recipe(s.recipe, list(s.overrides)), Recipe) for s in stages)
        assert error_of(path) == (f"{path}: a pipeline file, not a recipe: run it with nt-dist pipeline {path}")
        return
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)


def test_tinyimagenet_recipe_has_the_papers_settings():
    r = load_recipe(REPO / "recipes" / "tinyimagenet_nasty.yaml")
    assert (r.run.role, r.nasty.tau, r.nasty.omega) == ("nasty", 20.0, 0.01)
    assert (r.optim.name, r.optim.lr, r.optim.momentum, r.optim.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert (r.data.batch_size, r.run.epochs, r.optim.milestones, r.optim.gamma) == (128, 200, (60, 120, 160), 0.2)
    assert r.model.name == "cifar_resnet18" and r.data.image_size == 64


def test_recipe_is_frozen_and_typed(tmp_path: Path):
    r = load_recipe(write(tmp_path, "optim: {lr: '0.2'}\nrun: {epochs: 3}\n"))
    assert r.optim.lr == 0.2 and isinstance(r.optim.lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.optim.lr = 1.0  # type: ignore[misc]


def test_overrides_are_cast_to_the_field_type(tmp_path: Path):
    path = write(tmp_path, "run: {epochs: 10}\n")
    r = load_recipe(path, ["optim.lr=0.1", "run.epochs=12", "model.channels_last=true",
                           "optim.schedule=multistep", "optim.milestones=[3, 6]"])
    assert (r.optim.lr, r.run.epochs, r.model.channels_last, r.optim.milestones) == (0.1, 12, True, (3, 6))


def test_unknown_key_names_file_key_and_choices(tmp_path: Path):
    path = write(tmp_path, "nasty: {omgea: 0.1}\n")
    message = error_of(path)
    assert message.startswith(f"{path}: nasty.omgea: unknown key")
    assert "omega" in message


def test_unknown_section(tmp_path: Path):
    assert "nastyy: unknown key; expected a section" in error_of(write(tmp_path, "nastyy: {}\n"))


def test_mistyped_value(tmp_path: Path):
    message = error_of(write(tmp_path, "optim: {lr: fast}\n"))
    assert "optim.lr" in message and "'fast'" in message


def test_bad_choice(tmp_path: Path):
    assert "run.precision: got 'fp8'" in error_of(write(tmp_path, "run: {precision: fp8}\n"))


def test_out_of_range(tmp_path: Path):
    assert "distill.alpha" in error_of(write(tmp_path, "distill: {alpha: 1.5}\n"))


def test_unreadable_yaml_names_line(tmp_path: Path):
    message = error_of(write(tmp_path, "run:\n  epochs: [1, 2\n"))
    assert str(tmp_path / "recipe.yaml") in message and "line" in message


def test_missing_file(tmp_path: Path):
    assert "recipe file not found" in error_of(tmp_path / "nope.yaml")


def test_bad_override_syntax_and_unknown_override_key(tmp_path: Path):
    path = write(tmp_path, "")
    assert "expected section.key=value" in error_of(path, ["optim.lr"])
    assert "optim.learning_rate: unknown key" in error_of(path, ["optim.learning_rate=0.1"])


def test_cross_section_rules(tmp_path: Path):
    assert "nasty.adversary_checkpoint: required" in error_of(write(tmp_path, "run: {role: nasty}\n"))
    assert "distill.teacher_checkpoint: required" in error_of(write(tmp_path, "run: {role: student}\n"))
    assert "optim.milestones" in error_of(write(tmp_path, "run: {epochs: 5}\noptim: {schedule: multistep, milestones: [9]}\n"))


def test_round_trip_through_dict():
    r = recipe_from_dict({"optim": {"milestones": [2, 4]}, "run": {"epochs": 5}})
    assert recipe_from_dict(recipe_to_dict(r)) == r


def test_the_recipe_reference_lists_every_recipe_key():
    """The docs' recipe reference is generated from these classes (docs/hooks/recipe_reference.py):
    a row per key, with a Literal's values. tests/test_docs.py checks the page of the built site."""
    import importlib.util
    import typing

    spec = importlib.util.spec_from_file_location("recipe_reference", REPO / "docs" / "hooks" / "recipe_reference.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    rows = {line.split(" | ", 1)[0].strip("| `"): line for line in hook.render().splitlines() if line.startswith("| `")}
    for name, cls in typing.get_type_hints(Recipe).items():
        missing = [f.name for f in dataclasses.fields(cls) if f"{name}.{f.name}" not in rows]
        assert not missing, f"recipe reference, section {name}: {missing}"
        for key, kind in typing.get_type_hints(cls).items():
            if typing.get_origin(kind) is typing.Literal:
                absent = [v for v in typing.get_args(kind) if f"`{v}`" not in rows[f"{name}.{key}"]]
                assert not absent, f"recipe reference, {name}.{key}: allowed values {absent} not listed"


def test_a_recipe_file_names_its_experiment_and_describes_its_run(tmp_path: Path):
    from nt_dist.config import header_comment
    from nt_dist.tracking import experiment_of

    teacher = load_recipe(REPO / "recipes" / "digits_teacher.yaml")
    assert teacher.tracking.experiment == "digits_teacher"
    assert teacher.run.description.startswith("Normal teacher on the embedded digits (scikit-learn's 1,797")
    told = load_recipe(REPO / "recipes" / "digits_teacher.yaml",
                       ["tracking.experiment=mine", "run.description=what this run tests"])
    assert (told.tracking.experiment, told.run.description) == ("mine", "what this run tests")
    assert header_comment("\n# one\n#   two\n#\n# three\nrun: {}\n# not this\n") == "one   two\n\nthree"
    assert header_comment("run: {}\n") == ""
    path = tmp_path / "bare.yaml"
    path.write_text("run: {epochs: 2}\n")
    assert (load_recipe(path).tracking.experiment, load_recipe(path).run.description) == ("bare", "")
    assert experiment_of(recipe_from_dict({}).tracking) == "nt_dist"  # built in code: no file to name it after
