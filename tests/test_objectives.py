"""The objective registry: adding an attack is one new class in one file (here, this test file),
and everything that names attacks finds it: the recipe check, training, the audit's list."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch.nn.functional as F
from conftest import REPO, tiny_overrides
from torch import Tensor, nn

from nt_dist import audit, cli, objectives
from nt_dist.config import load_recipe
from nt_dist.errors import UserError
from nt_dist.frozen_network import as_frozen_network
from nt_dist.objectives.kd import Attack
from nt_dist.train import train


def argmax_step(model: nn.Module, images: Tensor, labels: Tensor, index: Tensor | None = None, epoch: int = 0, *,
                teacher: Any) -> dict[str, Tensor]:
    """CE against the teacher's hard labels (a thief who keeps only the top-1 answer)."""
    hard = as_frozen_network(teacher)(images, index, epoch).argmax(dim=1)
    logits = model(images)
    loss = F.cross_entropy(logits.float(), hard)
    return {"loss": loss, "logits": logits, "agree": (hard == labels).float().mean()}


class ArgmaxThief(Attack):
    name = "argmax_thief"
    summary = "CE on the teacher's argmax"
    audit_label = "argmax thief"

    def step(self, recipe: Any, frozen: Any, source: Any = None) -> Any:
        return partial(argmax_step, teacher=frozen)


@pytest.fixture
def thief():
    objectives.register(ArgmaxThief)
    yield ArgmaxThief
    objectives.unregister(ArgmaxThief)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("objectives") / "teacher"
    train(load_recipe(REPO / "recipes" / "digits_teacher.yaml", tiny_overrides(out, "teacher", **{"run.epochs": "1"})))
    return out


def student_overrides(out: Path, teacher: Path) -> list[str]:
    return tiny_overrides(out, "student", **{"run.epochs": "1", "distill.method": "argmax_thief",
                                             "distill.teacher_checkpoint": str(teacher)})


def test_an_unregistered_attack_is_one_line_listing_the_registered_ones(tmp_path: Path, teacher: Path):
    with pytest.raises(UserError) as caught:
        load_recipe(REPO / "recipes" / "digits_student.yaml", student_overrides(tmp_path, teacher))
    assert str(caught.value).endswith("digits_student.yaml: distill.method: got 'argmax_thief'; expected one of: "
                                      "kd, topk, skeptical, dafl, deepinversion")


def test_a_new_attack_file_is_checked_trained_and_audited(thief, tmp_path: Path, teacher: Path, capsys):
    # nt-dist check: the recipe validates and prints its method
    args = ["check", str(REPO / "recipes" / "digits_student.yaml")]
    for item in student_overrides(tmp_path / "student", teacher):
        args += ["--set", item]
    assert cli.main(args) == 0
    assert "method: argmax_thief" in capsys.readouterr().out
    # the CLI's help lists it
    with pytest.raises(SystemExit):
        cli.main(["check", "--help"])
    help_text = capsys.readouterr().out
    assert "distill.method: argmax_thief" in help_text and "CE on the teacher's argmax" in help_text

    # one epoch of training, with the step's own part logged
    recipe = load_recipe(REPO / "recipes" / "digits_student.yaml", student_overrides(tmp_path / "student", teacher))
    final = train(recipe)
    assert 0.0 <= final["test_top1"] <= 100.0
    log = (tmp_path / "student" / "metrics.jsonl").read_text()
    assert '"train_agree"' in log and (tmp_path / "student" / "model.safetensors").is_file()

    # the audit: --attacks all includes it, and it has its own column
    assert audit.parse_attacks(["all"])[-1] == "argmax_thief"
    plan = audit.AuditPlan(teacher=str(teacher), reference=str(teacher), recipe=REPO / "recipes" / "digits_attack.yaml")
    columns = audit.attack_columns(plan)
    assert columns["argmax thief"] == {"distill.method": "argmax_thief"}
    tree = audit.pipeline_tree(plan, teacher / "model.safetensors", teacher / "model.safetensors", "mlp")
    assert tree["students"]["argmax thief"]["set"]["distill.method"] == "argmax_thief"


def test_unregistering_removes_it_everywhere(thief):
    assert "argmax_thief" in objectives.attack_names()
    objectives.unregister(thief)
    assert "argmax_thief" not in objectives.attack_names()
    assert audit.parse_attacks(["all"]) == ("kd", "topk", "skeptical", "dafl", "deepinversion")
    with pytest.raises(UserError, match=r"^--attacks: unknown attack 'argmax_thief'"):
        audit.parse_attacks(["argmax_thief"])


def test_registration_refuses_a_second_class_under_a_taken_name():
    class Impostor(Attack):
        name = "kd"

    with pytest.raises(TypeError, match="attack kd is already registered by nt_dist.objectives.kd.KD"):
        objectives.register(Impostor)


@pytest.mark.parametrize(("method", "extra", "line"), [
    ("dafl", {"distill.cache_logits": "true", "data.augment": "none"},
     "distill.cache_logits: a data-free student (dafl) never sees an image twice"),
    ("deepinversion", {"defence.name": "round"},
     "defence.name: round has no gradient, and deepinversion backpropagates through the teacher; use stingy or noise"),
])
def test_data_free_attacks_bring_their_own_rules(tmp_path: Path, method: str, extra: dict[str, str], line: str):
    overrides = tiny_overrides(tmp_path, "student", **{"distill.method": method,
                                                      "distill.teacher_checkpoint": str(tmp_path), **extra})
    with pytest.raises(UserError) as caught:
        load_recipe(REPO / "recipes" / "digits_student.yaml", overrides)
    assert str(caught.value).endswith(line)


def test_every_role_and_attack_is_described_once():
    text = objectives.describe()
    for name in objectives.role_names():
        assert (f"run.role: {name} " in text) == (name != "student")
    for name in objectives.attack_names():
        assert text.count(f"distill.method: {name} ") == 1


def test_a_nasty_teacher_needs_its_adversary(tmp_path: Path):
    with pytest.raises(UserError) as caught:
        load_recipe(REPO / "recipes" / "digits_nasty.yaml", tiny_overrides(tmp_path, "nasty",
                                                                         **{"nasty.adversary_checkpoint": ""}))
    assert str(caught.value).endswith("nasty.adversary_checkpoint: required when run.role is nasty")
