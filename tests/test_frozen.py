"""The frozen network's logit cache: same logits, fewer forwards, same training result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DEVICES, REPO, TRAIN_DEVICE, tiny_overrides
from safetensors.torch import load_file, save_file

from nt_dist.config import load_recipe, replace
from nt_dist.errors import UserError
from nt_dist.frozen_network import FrozenNetwork, LogitCache, cache_key, frozen_logits, native_bf16
from nt_dist.models import create_model
from nt_dist.objectives import ADVERSARY
from nt_dist.objectives.nasty import nasty_step
from nt_dist.train import train


class Counting(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.images = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.inner(x)


@pytest.mark.parametrize("device", DEVICES)
def test_cache_serves_repeated_views_without_a_forward(device: torch.device):
    torch.manual_seed(0)
    net = Counting(create_model("cifar_cnn", 10).eval().to(device))
    cached = FrozenNetwork(net, LogitCache(samples=8, views=2, classes=10, device=device))
    images = torch.randn(8, 3, 16, 16, device=device)
    index = torch.tensor([3, 1, 7, 0], device=device)
    first = cached(images[index], index, epoch=0)  # view 0: computed
    assert net.images == 4
    again = cached(images[index], index, epoch=2)  # epoch 2 -> view 0 again: served
    assert net.images == 4 and torch.equal(first, again)
    other = cached(images[index], index, epoch=1)  # view 1: computed
    assert net.images == 8
    mixed = torch.tensor([3, 5], device=device)  # one known, one new sample
    cached(images[mixed], mixed, epoch=0)
    assert net.images == 9 and (cached.hits, cached.misses) == (5, 9)
    with torch.inference_mode():
        reference = net.inner(images[index])
    torch.testing.assert_close(first, reference)
    torch.testing.assert_close(other, reference)  # same images here, so the same logits


@pytest.mark.parametrize("device", DEVICES)
def test_complete_cache_stops_filling(device: torch.device):
    cache = LogitCache(samples=2, views=1, classes=3, device=device)
    cache.store(torch.tensor([0, 1], device=device), torch.tensor([0, 0], device=device), torch.ones(2, 3, device=device))
    assert cache.complete and cache.count == 2


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("role,section,recipe", [("nasty", "nasty", "digits_nasty.yaml"),
                                                 ("student", "distill", "digits_student.yaml")])
def test_training_with_the_cache_equals_training_without(tmp_path: Path, role: str, section: str, recipe: str):
    teacher = tmp_path / "teacher"
    train(load_recipe(REPO / "recipes" / "digits_teacher.yaml", tiny_overrides(teacher, "teacher")))
    key = "nasty.adversary_checkpoint" if role == "nasty" else "distill.teacher_checkpoint"
    common = {key: str(teacher), "data.augment_views": "1", "run.epochs": "3", "tracking.enabled": "false"}
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    train(load_recipe(REPO / "recipes" / recipe, tiny_overrides(plain, role, **common)))
    train(load_recipe(REPO / "recipes" / recipe, tiny_overrides(cached, role, **common, **{f"{section}.cache_logits": "true"})))
    a, b = weights(plain), weights(cached)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_cache_needs_repeating_views(tmp_path: Path):
    with pytest.raises(UserError, match="nasty.cache_logits: needs data.augment_views"):
        load_recipe(REPO / "recipes" / "digits_nasty.yaml", ["nasty.cache_logits=true"])
    with pytest.raises(UserError, match="data.augment_views: needs data.loader: auto, device or torch"):
        load_recipe(REPO / "recipes" / "digits_nasty.yaml", ["data.augment_views=4", "data.loader=ffcv"])
    assert load_recipe(REPO / "recipes" / "digits_nasty.yaml", ["nasty.cache_logits=true", "data.augment=none"])


# ---------------------------------------------------------------------------- frozen precision


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_precision_bf16_is_bf16_autocast_returned_in_fp32(device: torch.device):
    torch.manual_seed(0)
    net = create_model("cifar_cnn", 10).eval().to(device)
    images = torch.randn(16, 3, 16, 16, device=device)
    exact = frozen_logits(net, images, "fp32")
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        reference = net(images).float()  # what bf16 autocast gives for the whole forward
    rounded = frozen_logits(net, images, "bf16")
    assert rounded.dtype == torch.float32 and not rounded.is_inference()
    assert torch.equal(rounded, reference)
    assert not torch.equal(rounded, exact)  # bf16 did run ...
    torch.testing.assert_close(rounded, exact, rtol=0.05, atol=0.05)  # ... and stays close


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_precision_fp32_and_run_under_a_bf16_training_step(device: torch.device):
    torch.manual_seed(0)
    net = create_model("cifar_cnn", 10).eval().to(device)
    images = torch.randn(4, 3, 16, 16, device=device)
    with torch.inference_mode():
        exact = net(images)
    with torch.autocast(device.type, dtype=torch.bfloat16):  # run.precision: bf16
        full = frozen_logits(net, images, "fp32")
        inherited = frozen_logits(net, images, "run")
    assert full.dtype == torch.float32 and torch.equal(full, exact)
    assert inherited.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_cached_logits_use_the_frozen_precision(device: torch.device):
    torch.manual_seed(0)
    net = create_model("cifar_cnn", 10).eval().to(device)
    images = torch.randn(4, 3, 16, 16, device=device)
    cached = FrozenNetwork(net, LogitCache(samples=4, views=1, classes=10, device=device), precision="bf16")
    torch.testing.assert_close(cached(images, torch.arange(4, device=device), 0), frozen_logits(net, images, "bf16"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_a_bf16_adversary_moves_the_nasty_gradient_by_rounding_only(device: torch.device):
    """One nasty step (ω = 0.08, τ = 4) with the adversary's forward in bf16:
    the teacher's parameter gradients stay within 1 % of the fp32 ones."""
    torch.manual_seed(0)
    adversary = create_model("cifar_cnn", 10).eval().to(device)
    teacher = create_model("cifar_cnn", 10).to(device)
    images, labels = torch.randn(32, 3, 16, 16).to(device), torch.randint(0, 10, (32,)).to(device)
    grads = {}
    for precision in ("fp32", "bf16"):
        teacher.zero_grad()
        out = nasty_step(teacher, images, labels, adversary=FrozenNetwork(adversary, precision=precision),
                         tau=4.0, omega=0.08)
        out["loss"].backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in teacher.parameters()])
    error = (grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm()
    assert 0 < error < 1e-2


def test_nasty_training_with_a_bf16_adversary(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The recipe key reaches the adversary's forward (the weights move, unlike with "run",
    which is fp32 here); on a CPU without native bf16 the run says so in one line."""
    teacher = tmp_path / "teacher"
    train(load_recipe(REPO / "recipes" / "digits_teacher.yaml", tiny_overrides(teacher, "teacher")))
    common = {"nasty.adversary_checkpoint": str(teacher), "tracking.enabled": "false", "run.epochs": "1"}
    runs = {}
    for precision in ("run", "fp32", "bf16"):
        out = tmp_path / precision
        capsys.readouterr()
        train(load_recipe(REPO / "recipes" / "digits_nasty.yaml",
                          tiny_overrides(out, "nasty", **common, **{"nasty.adversary_precision": precision})))
        runs[precision] = weights(out)
        warned = "nasty.adversary_precision: bf16 has no hardware support" in capsys.readouterr().err
        assert warned == (precision == "bf16" and not native_bf16(TRAIN_DEVICE))
    assert all(torch.equal(runs["run"][name], value) for name, value in runs["fp32"].items())
    assert not all(torch.equal(runs["bf16"][name], value) for name, value in runs["fp32"].items())


def test_frozen_precision_is_a_checked_recipe_key():
    with pytest.raises(UserError, match="nasty.adversary_precision"):
        load_recipe(REPO / "recipes" / "digits_nasty.yaml", ["nasty.adversary_precision=fp16"])
    recipe = load_recipe(REPO / "recipes" / "digits_student.yaml", ["distill.teacher_precision=bf16"])
    assert recipe.distill.teacher_precision == "bf16"


# ---------------------------------------------------------------------------- cache on disk


def hit_rates(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["epoch"]: m["cache_hit_rate"] for m in lines if "cache_hit_rate" in m}


@pytest.fixture(scope="module")
def cached_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An adversary and an uninterrupted 3-epoch nasty run with 2 cached views per sample."""
    root = tmp_path_factory.mktemp("cache_on_disk")
    teacher = root / "teacher"
    train(load_recipe(REPO / "recipes" / "digits_teacher.yaml", tiny_overrides(teacher, "teacher")))
    full = root / "full"
    train(load_recipe(REPO / "recipes" / "digits_nasty.yaml", nasty_cached(full, teacher)))
    return {"teacher": teacher, "full": full}


def nasty_cached(out: Path, teacher: Path, **extra: str) -> list[str]:
    return tiny_overrides(out, "nasty", **{"nasty.adversary_checkpoint": str(teacher), "data.augment_views": "2",
                                           "nasty.cache_logits": "true", "run.epochs": "3",
                                           "tracking.enabled": "false", **extra})


def interrupted_after_epoch_1(out: Path, teacher: Path) -> None:
    """Train epoch 1 of 3 and stop, leaving its checkpoint and cache as a preemption would."""
    train(load_recipe(REPO / "recipes" / "digits_nasty.yaml", nasty_cached(out, teacher, **{"run.max_steps": "8"})))
    (out / "metrics.json").unlink()
    (out / "model.safetensors").unlink()


def test_a_resumed_run_serves_the_views_computed_before_it_stopped(tmp_path: Path, cached_runs: dict[str, Path],
                                                                    capsys: pytest.CaptureFixture[str]):
    full, teacher = cached_runs["full"], cached_runs["teacher"]
    assert hit_rates(full) == {1: 0.0, 2: 0.0, 3: 1.0}  # views 0 and 1 computed once each
    out = tmp_path / "resumed"
    interrupted_after_epoch_1(out, teacher)
    capsys.readouterr()
    train(load_recipe(REPO / "recipes" / "digits_nasty.yaml", nasty_cached(out, teacher)))
    assert f"loaded 256 of 512 cached frozen logits from {out / 'logit_cache.safetensors'}" in capsys.readouterr().out
    assert hit_rates(out) == {1: 0.0, 2: 0.0, 3: 1.0}  # epoch 3 (view 0) came from the file
    a, b = weights(full), weights(out)
    assert all(torch.equal(a[name], b[name]) for name in a)  # the same logits, bit for bit


def test_a_stale_or_missing_cache_file_is_recomputed(tmp_path: Path, cached_runs: dict[str, Path],
                                                     capsys: pytest.CaptureFixture[str]):
    teacher = cached_runs["teacher"]
    stale, missing = tmp_path / "stale", tmp_path / "missing"
    for out in (stale, missing):
        interrupted_after_epoch_1(out, teacher)
    path = stale / "logit_cache.safetensors"
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"key": "made by another adversary"})
    (missing / "logit_cache.safetensors").unlink()
    for out in (stale, missing):
        capsys.readouterr()
        train(load_recipe(REPO / "recipes" / "digits_nasty.yaml", nasty_cached(out, teacher)))
        err = capsys.readouterr().err
        assert (f"{out / 'logit_cache.safetensors'}: not used, made for other frozen weights" in err) == (out == stale)
        assert hit_rates(out) == {1: 0.0, 2: 0.0, 3: 0.0}  # view 0 computed again


def test_the_cache_key_follows_what_the_logits_depend_on(tmp_path: Path, cached_runs: dict[str, Path]):
    model_file = cached_runs["teacher"] / "model.safetensors"
    recipe = load_recipe(REPO / "recipes" / "digits_nasty.yaml", nasty_cached(tmp_path, cached_runs["teacher"]))
    base = cache_key(recipe, ADVERSARY, "run", None)
    assert cache_key(recipe, ADVERSARY, "run", None) == base
    changed = [cache_key(replace(recipe, run={"seed": 1}), ADVERSARY, "run", None),
               cache_key(replace(recipe, data={"augment": "none"}), ADVERSARY, "run", None),
               cache_key(replace(recipe, data={"augment_views": 3}), ADVERSARY, "run", None),
               cache_key(recipe, ADVERSARY, "bf16", None),
               cache_key(recipe, ADVERSARY, "run", torch.bfloat16)]
    other = tmp_path / "other.safetensors"
    tensors = load_file(str(model_file))
    tensors["fc2.bias"] = tensors["fc2.bias"] + 1
    save_file(tensors, str(other))
    changed.append(cache_key(replace(recipe, nasty={"adversary_checkpoint": str(other)}), ADVERSARY, "run", None))
    assert base not in changed and len(set(changed)) == len(changed)
