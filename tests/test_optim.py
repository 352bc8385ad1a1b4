"""The optimiser pieces of the ImageNet recipes against hand-computed values: learning-rate
schedules stepped per iteration, no weight decay on norms and biases, label smoothing (which CE
gets it), and timm's blurpool / keyword arguments passed through and recorded for frozen use."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest_data import assert_one_line_error
from torch import nn

from nt_dist.checkpoint import export_model, load_frozen_model
from nt_dist.config import OptimConfig
from nt_dist.errors import UserError
from nt_dist.losses import kd_loss, nasty_teacher_loss
from nt_dist.models import build_model
from nt_dist.objectives.teacher import ce_step
from nt_dist.optim import build_optimizer, build_scheduler


def lrs(cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> list[float]:
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, epochs, steps_per_epoch)
    seen = []
    for _ in range(epochs * steps_per_epoch):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_linear_after_warm_up_is_ffcv_imagenets_cyclic_schedule():
    """get_cyclic_lr: np.interp(epoch, [0, peak, epochs], [1e-4·lr, lr, 0]) at fractional epoch
    t / steps_per_epoch. 4 epochs of 3 steps, peak at epoch 2, lr 1.7."""
    got = lrs(OptimConfig(lr=1.7, schedule="linear", warmup_epochs=2, warmup_start_factor=1e-4), 4, 3)
    low = 1.7e-4
    expected = [low + (1.7 - low) * t / 6 for t in range(6)] + [1.7 * (1 - t / 6) for t in range(6)]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert got[6] == pytest.approx(1.7) and got[-1] == pytest.approx(1.7 / 6)


def test_step_multiplies_by_gamma_every_step_epochs_after_the_warm_up():
    # 1 epoch of warm-up (2 steps) from 0.1 x lr, then x0.1 at epochs 2 and 4 of 6 (2 steps an epoch)
    got = lrs(OptimConfig(lr=1.0, schedule="step", step_epochs=2, gamma=0.1, warmup_epochs=1,
                          warmup_start_factor=0.1), 6, 2)
    assert got == pytest.approx([0.1, 0.55, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01])


def test_cosine_reaches_zero_at_the_last_step():
    got = lrs(OptimConfig(lr=2.0, schedule="cosine"), 2, 4)
    assert got == pytest.approx([1.0 * (1 + math.cos(math.pi * t / 8)) for t in range(8)])


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.01, wd_skip_norm_bias=True))
    groups = {group["weight_decay"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    assert groups == {0.0: {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[3].bias)},
                      0.01: {id(model[0].weight), id(model[3].weight)}}
    plain = build_optimizer(model, OptimConfig(weight_decay=0.01))
    assert [g["weight_decay"] for g in plain.param_groups] == [0.01]


def test_a_vits_position_embedding_and_class_token_get_no_decay():
    model = build_model("vit_tiny_patch16_224", 3, timm_kwargs={"img_size": 32, "depth": 1})
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.05, wd_skip_norm_bias=True))
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay
    assert id(model.patch_embed.proj.weight) not in no_decay


LOGITS = torch.tensor([[2.0, 0.0, 0.0]])
LABELS = torch.tensor([0])
# ε = 0.1, K = 3: the target is (1 − ε + ε/K, ε/K, ε/K); log p = (2, 0, 0) − log(e² + 2)
_LOG_Z = math.log(math.exp(2) + 2)
SMOOTHED_CE = -(0.9 + 0.1 / 3) * (2 - _LOG_Z) - 2 * (0.1 / 3) * (0 - _LOG_Z)


def test_label_smoothing_smooths_the_ce_against_the_labels():
    out = ce_step(lambda x: x, LOGITS, LABELS, label_smoothing=0.1)
    assert out["ce"].item() == pytest.approx(SMOOTHED_CE, rel=1e-6)
    assert ce_step(lambda x: x, LOGITS, LABELS)["ce"].item() == pytest.approx(_LOG_Z - 2, rel=1e-6)


def test_label_smoothing_leaves_the_kl_terms_alone():
    other = torch.tensor([[0.0, 1.0, 0.0]])
    for loss, weight_name in ((nasty_teacher_loss, "omega"), (kd_loss, "alpha")):
        weight = 0.5
        plain, parts = loss(LOGITS, other, LABELS, weight, 4.0, return_parts=True)
        smoothed, smoothed_parts = loss(LOGITS, other, LABELS, weight, 4.0, return_parts=True, label_smoothing=0.1)
        assert smoothed_parts["kl"] == parts["kl"], weight_name
        assert smoothed_parts["ce"].item() == pytest.approx(SMOOTHED_CE, rel=1e-6)
        ce_weight = 1.0 if loss is nasty_teacher_loss else 1.0 - weight
        assert (smoothed - plain).item() == pytest.approx(ce_weight * (SMOOTHED_CE - (_LOG_Z - 2)), rel=1e-5)
    assert F.cross_entropy(LOGITS, LABELS, label_smoothing=0.1).item() == pytest.approx(SMOOTHED_CE, rel=1e-6)


def test_blurpool_and_timm_kwargs_reach_timm():
    from timm.layers import BlurPool2d, DropPath

    model = build_model("resnet18", 10, blurpool=True, timm_kwargs={"drop_path_rate": 0.1})
    assert any(isinstance(m, BlurPool2d) for m in model.modules())
    assert any(isinstance(m, DropPath) for m in model.modules())
    assert not any(isinstance(m, BlurPool2d) for m in build_model("resnet18", 10).modules())


def test_a_model_that_refuses_an_option_is_one_line():
    with pytest.raises(UserError) as error:
        build_model("cifar_cnn", 10, "r.yaml: model.name", blurpool=True)
    assert_one_line_error(error.value, "r.yaml: model.blurpool: 'cifar_cnn' does not take aa_layer")


def test_a_frozen_network_is_rebuilt_with_the_options_it_was_trained_with(tmp_path: Path):
    torch.manual_seed(0)
    trained = build_model("resnet18", 4, blurpool=True).eval()
    export_model(trained.state_dict(), tmp_path / "model.safetensors",
                 {"architecture": "resnet18", "num_classes": 4, "model_options": '{"blurpool": true}'})
    frozen, _ = load_frozen_model("", str(tmp_path), 4, "nasty.adversary_checkpoint", build_model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(frozen(x), trained(x))
    # the same weights in a network without blurpool load (same shapes) but compute something else
    plain = build_model("resnet18", 4).eval()
    plain.load_state_dict(trained.state_dict())
    assert not torch.allclose(plain(x), trained(x))
