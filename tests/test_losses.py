"""Losses against values computed by hand, the direction of every KL, and where gradients go."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES

from nt_dist.losses import kd_loss, nasty_teacher_loss, soft_kl

LN3 = math.log(3.0)
# P = softmax([0, ln 3]) = (1/4, 3/4);  Q = softmax([0, 0]) = (1/2, 1/2)
KL_P_Q = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.130812...
KL_Q_P = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.143841...


def t(*rows, device: torch.device | str = "cpu"):
    return torch.tensor(rows, dtype=torch.float32, device=device)


def test_soft_kl_matches_hand_value_and_direction():
    p, q = t([0.0, LN3]), t([0.0, 0.0])
    assert soft_kl(p, q, tau=1.0).item() == pytest.approx(KL_P_Q, abs=1e-6)
    assert soft_kl(q, p, tau=1.0).item() == pytest.approx(KL_Q_P, abs=1e-6)
    assert KL_P_Q != pytest.approx(KL_Q_P, abs=1e-3)  # the two directions are distinguishable


def test_soft_kl_temperature_divides_logits_and_batch_is_averaged():
    # logits (0, 2 ln 3) at τ=2 soften to (0, ln 3) -> P again; a second, identical row keeps the mean.
    p = t([0.0, 2 * LN3], [0.0, 2 * LN3])
    q = t([0.0, 0.0], [0.0, 0.0])
    assert soft_kl(p, q, tau=2.0).item() == pytest.approx(KL_P_Q, abs=1e-6)
    # a row with identical distributions contributes 0: mean of (KL, 0)
    p2, q2 = t([0.0, LN3], [1.0, 1.0]), t([0.0, 0.0], [1.0, 1.0])
    assert soft_kl(p2, q2, tau=1.0).item() == pytest.approx(KL_P_Q / 2, abs=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_kd_loss_hand_value(device: torch.device):
    student, teacher, y = t([0.0, 0.0], device=device), t([0.0, LN3], device=device), torch.tensor([1], device=device)
    alpha, tau = 0.9, 1.0
    expected = alpha * tau**2 * KL_P_Q + (1 - alpha) * math.log(2.0)  # CE([0,0], 1) = ln 2
    loss, parts = kd_loss(student, teacher, y, alpha=alpha, tau=tau, return_parts=True)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert parts["kl"].item() == pytest.approx(KL_P_Q, abs=1e-6)  # KL(teacher ‖ student)


def test_kd_loss_tau_squared_scaling():
    student, teacher, y = t([0.0, 0.0]), t([0.0, 2 * LN3]), torch.tensor([0])
    loss = kd_loss(student, teacher, y, alpha=1.0, tau=2.0)
    assert loss.item() == pytest.approx(4.0 * KL_P_Q, abs=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_nasty_loss_hand_value(device: torch.device):
    teacher, adversary, y = t([0.0, LN3], device=device), t([0.0, 0.0], device=device), torch.tensor([1], device=device)
    omega, tau = 0.5, 1.0
    ce = -math.log(0.75)  # CE([0, ln 3], 1)
    loss, parts = nasty_teacher_loss(teacher, adversary, y, omega=omega, tau=tau, return_parts=True)
    assert loss.item() == pytest.approx(ce - omega * KL_P_Q, abs=1e-6)
    assert parts["kl"].item() == pytest.approx(KL_P_Q, abs=1e-6)  # KL(teacher ‖ adversary), not reverse
    loss_t2 = nasty_teacher_loss(t([0.0, 2 * LN3], device=device), adversary, y, omega=omega, tau=2.0)
    assert loss_t2.item() == pytest.approx(-math.log(0.9) - omega * 4.0 * KL_P_Q, abs=1e-6)


def test_nasty_loss_gradient_never_reaches_adversary_and_pushes_teacher_away():
    teacher = t([0.2, 0.1, -0.3]).requires_grad_()
    adversary = t([0.2, 0.1, -0.3]).requires_grad_()  # identical: KL = 0, d(-KL) = 0 at this point
    near = (teacher.detach() + t([0.5, -0.2, 0.0])).requires_grad_()
    loss = nasty_teacher_loss(near, adversary, torch.tensor([0]), omega=1.0, tau=4.0)
    loss.backward()
    assert adversary.grad is None
    assert near.grad is not None and torch.isfinite(near.grad).all()
    # a gradient step on the teacher increases its divergence from the adversary (CE off: omega only)
    x = near.detach().clone().requires_grad_()
    kl_before = soft_kl(x, adversary.detach(), 4.0)
    only_kl = -1.0 * 16.0 * soft_kl(x, adversary, 4.0)
    only_kl.backward()
    stepped = x.detach() - 0.5 * x.grad
    assert soft_kl(stepped, adversary.detach(), 4.0) > kl_before


def test_kd_loss_gradient_never_reaches_teacher():
    student = t([0.1, 0.4]).requires_grad_()
    teacher = t([1.0, -1.0]).requires_grad_()
    kd_loss(student, teacher, torch.tensor([1]), alpha=0.5, tau=3.0).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_kl_is_float32_under_bf16_autocast(device: torch.device):
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 200).to(device)
    x = torch.randn(4, 8).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = layer(x)
        adversary = layer(x + 0.01)
        assert logits.dtype == torch.bfloat16
        loss, parts = nasty_teacher_loss(logits, adversary, torch.tensor([0, 1, 2, 3], device=device),
                                         omega=0.01, tau=20.0, return_parts=True)
    assert loss.dtype == torch.float32 and parts["kl"].dtype == torch.float32
    # equal to the fp32 computation on the same (bf16-rounded) logits
    ref = soft_kl(logits.float(), adversary.float(), 20.0)
    assert parts["kl"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_soft_kl_equals_torch_kl_div_batchmean():
    torch.manual_seed(1)
    p, q = torch.randn(6, 10), torch.randn(6, 10)
    tau = 3.0
    ref = F.kl_div(F.log_softmax(q / tau, 1), F.log_softmax(p / tau, 1), reduction="batchmean", log_target=True)
    assert soft_kl(p, q, tau).item() == pytest.approx(ref.item(), rel=1e-5)
