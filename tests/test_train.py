"""A few real steps of every role on the embedded digits, through the public train() API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ON_CUDA, REPO, documented_errors, tiny_overrides
from conftest_data import assert_one_line_error
from safetensors import safe_open

from nt_dist.checkpoint import export_model, load_frozen_model
from nt_dist.config import load_recipe
from nt_dist.errors import UserError
from nt_dist.models import create_model
from nt_dist.objectives.kd import student_step
from nt_dist.objectives.nasty import nasty_step
from nt_dist.train import train

RECIPES = REPO / "recipes"


def run(recipe: str, out: Path, role: str, **extra: str) -> dict[str, float]:
    return train(load_recipe(RECIPES / recipe, tiny_overrides(out, role, **extra)), source=recipe)


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """teacher -> nasty (adversary = teacher) -> student (teacher = nasty), plus a baseline."""
    root = tmp_path_factory.mktemp("chain")
    dirs = {name: root / name for name in ("teacher", "nasty", "student", "baseline")}
    run("digits_teacher.yaml", dirs["teacher"], "teacher")
    run("digits_nasty.yaml", dirs["nasty"], "nasty", **{"nasty.adversary_checkpoint": str(dirs["teacher"])})
    run("digits_student.yaml", dirs["student"], "student", **{"distill.teacher_checkpoint": str(dirs["nasty"])})
    run("digits_student.yaml", dirs["baseline"], "baseline")
    return dirs


@pytest.mark.parametrize("role", ["teacher", "nasty", "student", "baseline"])
def test_every_role_leaves_a_complete_run_folder(chain: dict[str, Path], role: str):
    out = chain[role]
    for name in ("model.safetensors", "resolved_recipe.yaml", "metrics.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["global_step"] == 2 * (256 // 32)  # 2 epochs of 8 steps
    assert 0.0 <= summary["final"]["test_top1"] <= 100.0
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["role"] == role and meta["num_classes"] == "10" and meta["dataset"] == "digits"
    assert meta["architecture"] == ("mlp" if role in ("student", "baseline") else "cifar_cnn")
    assert (meta["mlflow_run_name"], meta["mlflow_experiment"]) == (f"test_{role}", "tests")  # lineage by name
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step_000000008", "step_000000016"]  # keep_last = 2


@pytest.mark.parametrize("role,parts", [("teacher", {"ce"}), ("nasty", {"ce", "kl"}),
                                        ("student", {"ce", "kl"}), ("baseline", {"ce"})])
def test_epoch_metrics_carry_loss_parts(chain: dict[str, Path], role: str, parts: set[str]):
    epochs = [e for e in events(chain[role]) if "test_top1" in e]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert {f"train_{p}" for p in parts | {"loss"}} <= set(e)
        assert e["images_per_s"] > 0 and e["epoch_time_s"] > 0
        assert ("peak_memory_mb" in e) == ON_CUDA  # device memory, logged on a GPU only
        assert e.get("peak_memory_mb", 1) > 0
    if role == "nasty":  # loss = ce - omega * tau^2 * kl, with the recipe's omega=0.05, tau=8
        e = epochs[-1]
        assert e["train_loss"] == pytest.approx(e["train_ce"] - 0.05 * 64 * e["train_kl"], rel=1e-4, abs=1e-5)


def test_finished_run_is_not_retrained(chain: dict[str, Path]):
    before = (chain["teacher"] / "model.safetensors").stat().st_mtime_ns
    again = run("digits_teacher.yaml", chain["teacher"], "teacher")
    assert again == json.loads((chain["teacher"] / "metrics.json").read_text())["final"]
    assert (chain["teacher"] / "model.safetensors").stat().st_mtime_ns == before


def test_frozen_adversary_gets_no_gradient_and_no_state_change():
    torch.manual_seed(0)
    model, adversary = create_model("cifar_cnn", 10), create_model("cifar_cnn", 10)
    adversary.eval().requires_grad_(False)
    before = {k: v.clone() for k, v in adversary.state_dict().items()}
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    out = nasty_step(model, images, labels, adversary=adversary, tau=4.0, omega=0.1)
    out["loss"].backward()
    assert all(p.grad is None for p in adversary.parameters())
    assert all(torch.equal(before[k], v) for k, v in adversary.state_dict().items())  # BN stats too
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    out = student_step(model, images, labels, teacher=adversary, tau=4.0, alpha=0.9)
    out["loss"].backward()
    assert all(p.grad is None for p in adversary.parameters())


def test_export_round_trip_gives_identical_outputs(tmp_path: Path):
    torch.manual_seed(0)
    model = create_model("cifar_cnn", 10).eval()
    export_model(model.state_dict(), tmp_path / "model.safetensors", {"architecture": "cifar_cnn", "num_classes": 10})
    loaded, meta = load_frozen_model("", str(tmp_path), 10, "nasty.adversary_checkpoint", create_model)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(model(x), loaded(x)) and meta["architecture"] == "cifar_cnn"
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_wrong_checkpoint_is_one_line_naming_the_key(tmp_path: Path):
    model = create_model("cifar_cnn", 10)
    export_model(model.state_dict(), tmp_path / "model.safetensors", {"architecture": "cifar_cnn", "num_classes": 10})
    key = "distill.teacher_checkpoint"
    cases = [
        (("cifar_resnet20", str(tmp_path), 10), "holds a 'cifar_cnn' but the recipe asks for 'cifar_resnet20'"),
        (("", str(tmp_path), 100), "has 10 classes but the data set has 100"),
        (("", str(tmp_path / "missing"), 10), "not found"),
    ]
    for args, expected in cases:
        with pytest.raises(UserError) as info:
            load_frozen_model(*args, key, create_model)
        assert str(info.value).startswith(key) and expected in str(info.value) and "\n" not in str(info.value)
    # a file without metadata but with the wrong shapes
    export_model(create_model("mlp", 10).state_dict(), tmp_path / "other" / "model.safetensors", {})
    with pytest.raises(UserError, match="does not fit 'cifar_cnn'"):
        load_frozen_model("cifar_cnn", str(tmp_path / "other"), 10, key, create_model)
    # no architecture recorded or named: the hint is the caller's (plot-logits and the audit take no recipe)
    bare = tmp_path / "other" / "model.safetensors"
    with pytest.raises(UserError) as info:
        load_frozen_model("", str(bare), 10, "--teacher", create_model)
    assert str(info.value) == f"--teacher: {bare} records no architecture (nt-dist train's exports do)"
    with pytest.raises(UserError) as info:
        load_frozen_model("", str(bare), 10, key, create_model, hint="; name it in the recipe (distill.teacher)")
    assert str(info.value).endswith("records no architecture (nt-dist train's exports do); name it in the recipe "
                                    "(distill.teacher)")


def test_pickle_that_would_run_code_is_refused(tmp_path: Path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"weight": Evil()}))
    torch.save({"weight": torch.zeros(1), "evil": Evil()}, tmp_path / "evil.pt")
    for target in (path, tmp_path / "evil.pt"):
        with pytest.raises(UserError) as info:
            load_frozen_model("cifar_cnn", str(target), 10, "nasty.adversary_checkpoint", create_model)
        assert "nasty.adversary_checkpoint" in str(info.value)
    assert "refusing to unpickle" in str(info.value)


def test_channels_last_compile_and_bf16_autocast_train_on_cpu(tmp_path: Path):
    """The GPU-oriented switches work on the CPU path too (tiny model: bf16 is slow here)."""
    out = tmp_path / "switches"
    final = run("digits_student.yaml", out, "baseline", **{
        "model.channels_last": "true", "model.compile": "true", "run.precision": "bf16",
        "run.epochs": "1", "tracking.enabled": "false"})
    assert 0 <= final["test_top1"] <= 100
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert all(not k.startswith("_orig_mod") for k in weights)  # the export is the plain module
    assert {v.dtype for v in weights.values()} == {torch.float32}


def test_more_processes_than_gpus_is_one_line(monkeypatch: pytest.MonkeyPatch):
    """The second of two processes on a one-GPU machine would be put on a GPU that does not exist."""
    from nt_dist import engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError) as info:
        engine.check_local_devices("recipe.yaml")
    assert_one_line_error(info.value, "recipe.yaml: 2 processes on this machine but 1 GPU(s) visible",
                          "--num_processes 1", "CUDA_VISIBLE_DEVICES=''")
    shown = documented_errors()["more processes on a machine than it has GPUs (`accelerate launch --num_processes 2` on a one-GPU machine)"]
    assert shown == f"nt-dist: error: {info.value}"  # docs/errors.md shows the real line
    monkeypatch.setenv("LOCAL_RANK", "0")
    engine.check_local_devices("recipe.yaml")  # the first process has its GPU
