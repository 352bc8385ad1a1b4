"""The frozen network's logit cache: same logits, fewer forwards, same training result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides
from safetensors.torch import load_file

from nt_dist.config import load_recipe
from nt_dist.errors import UserError
from nt_dist.frozen import FrozenNetwork, LogitCache
from nt_dist.models import create_model
from nt_dist.train import train


class Counting(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.images = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.inner(x)


def test_cache_serves_repeated_views_without_a_forward():
    torch.manual_seed(0)
    net = Counting(create_model("cifar_cnn", 10).eval())
    cached = FrozenNetwork(net, LogitCache(samples=8, views=2, classes=10, device=torch.device("cpu")))
    images = torch.randn(8, 3, 16, 16)
    index = torch.tensor([3, 1, 7, 0])
    first = cached(images[index], index, epoch=0)  # view 0: computed
    assert net.images == 4
    again = cached(images[index], index, epoch=2)  # epoch 2 -> view 0 again: served
    assert net.images == 4 and torch.equal(first, again)
    other = cached(images[index], index, epoch=1)  # view 1: computed
    assert net.images == 8
    mixed = torch.tensor([3, 5])  # one known, one new sample
    cached(images[mixed], mixed, epoch=0)
    assert net.images == 9 and (cached.hits, cached.misses) == (5, 9)
    with torch.inference_mode():
        reference = net.inner(images[index])
    torch.testing.assert_close(first, reference)
    torch.testing.assert_close(other, reference)  # same images here, so the same logits


def test_complete_cache_stops_filling():
    cache = LogitCache(samples=2, views=1, classes=3, device=torch.device("cpu"))
    cache.store(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.ones(2, 3))
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
    with pytest.raises(UserError, match="data.augment_views: needs data.loader: torch"):
        load_recipe(REPO / "recipes" / "digits_nasty.yaml", ["data.augment_views=4", "data.loader=ffcv"])
    assert load_recipe(REPO / "recipes" / "digits_nasty.yaml", ["nasty.cache_logits=true", "data.augment=none"])
