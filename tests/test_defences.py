"""Teacher-side defences against values computed by hand, and their seeded noise."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nt_dist.config import DefenceConfig
from nt_dist.defences import Released, noisy, release, rounded, stingy, stingy_k
from nt_dist.losses import kd_loss

LN3 = math.log(3.0)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


INF = float("-inf")


def test_stingy_keeps_top_k_and_sets_the_rest_to_minus_inf():
    logits = t([-1.0, 3.0, -5.0, 2.0], [0.5, -0.25, 4.0, -3.0])
    assert stingy(logits, 2).tolist() == [[INF, 3.0, INF, 2.0], [0.5, INF, 4.0, INF]]
    assert stingy(logits, 1).tolist() == [[INF, 3.0, INF, INF], [INF, INF, 4.0, INF]]
    # k covering every class (or more) releases the logits unchanged
    assert torch.equal(stingy(logits, 4), logits) and torch.equal(stingy(logits, 10), logits)


def test_stingy_keeps_top1_even_when_every_logit_is_negative():
    logits = t([-1.0, -2.0, -3.0])
    assert stingy(logits, 1).tolist() == [[-1.0, INF, INF]]
    assert stingy(logits, 2).argmax().item() == logits.argmax().item() == 0


@pytest.mark.parametrize(("classes", "k"), [(10, 2), (100, 10), (200, 20), (1000, 100), (4, 1)])
def test_stingy_k_is_the_authors_ratio_of_the_classes(classes: int, k: int):
    # train_kd_stingy.py: num_keep = int(sparse_ratio * classes), sparse_ratio 0.2 (CIFAR-10), 0.1 (CIFAR-100, Tiny)
    assert stingy_k(DefenceConfig(name="stingy"), classes) == k
    assert stingy_k(DefenceConfig(name="stingy", top_k_ratio=0.5), classes) == max(1, classes // 2)
    assert stingy_k(DefenceConfig(name="stingy", top_k=3), classes) == min(3, classes)


@pytest.mark.parametrize(("classes", "k", "tau"), [(10, 2, 20.0), (100, 10, 20.0), (10, 2, 4.0), (200, 20, 4.0)])
def test_the_released_distribution_has_exactly_k_nonzero_probabilities(classes: int, k: int, tau: float):
    logits = torch.randn(64, classes, generator=torch.Generator().manual_seed(classes)) * 5
    released = stingy(logits, stingy_k(DefenceConfig(name="stingy"), classes))
    soft = torch.softmax(released / tau, dim=1)
    assert ((soft > 0).sum(dim=1) == k).all()
    assert torch.equal(released.argmax(dim=1), logits.argmax(dim=1))  # top-1 kept by construction
    assert soft.sum(dim=1).tolist() == pytest.approx([1.0] * 64, abs=1e-5)


@pytest.mark.parametrize(("tau", "alpha"), [(4.0, 0.9), (20.0, 0.9), (20.0, 0.5), (1.0, 0.3)])
def test_kd_from_a_stingy_release_is_the_authors_loss(tau: float, alpha: float):
    # teacher (τ ln 3, 0, −7, −9), k = 2: released (τ ln 3, 0, −inf, −inf) -> σ_τ = (3/4, 1/4, 0, 0);
    # student zeros -> σ_τ = 1/4 each; KL = ¾ ln(¾ / ¼) + ¼ ln(¼ / ¼) = ¾ ln 3; CE(zeros, y) = ln 4
    teacher = t([tau * LN3, 0.0, -7.0, -9.0])
    student = torch.zeros(1, 4, requires_grad=True)
    expected = alpha * tau * tau * 0.75 * LN3 + (1 - alpha) * math.log(4.0)
    loss = kd_loss(student, stingy(teacher, 2), torch.tensor([2]), alpha, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    # d/dz_S of α·τ²·KL(p ‖ σ_τ(z_S)) = α·τ·(q − p); of (1 − α)·CE = (1 − α)·(σ(z_S) − onehot(2))
    q, p = torch.full((4,), 0.25), torch.tensor([0.75, 0.25, 0.0, 0.0])
    grad = alpha * tau * (q - p) + (1 - alpha) * (torch.full((4,), 0.25) - torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert student.grad[0].tolist() == pytest.approx(grad.tolist(), abs=1e-5)


def test_kd_from_a_stingy_release_agrees_with_the_authors_code_on_random_tensors():
    # loss_fn_kd_stingy of train_kd_stingy.py, as written there (KLDivLoss on the −inf-filled logits)
    generator = torch.Generator().manual_seed(0)
    for classes, ratio, tau, alpha in ((10, 0.2, 20.0, 0.9), (100, 0.1, 20.0, 0.9), (10, 0.2, 4.0, 0.9)):
        teacher = torch.randn(32, classes, generator=generator) * 3
        student = torch.randn(32, classes, generator=generator)
        labels = torch.randint(0, classes, (32,), generator=generator)
        num_keep = int(ratio * classes)
        value, index = torch.topk(teacher, k=num_keep, dim=1)
        sparse = torch.full(teacher.shape, float("-inf"))
        row = torch.tensor([[i] * num_keep for i in range(index.shape[0])])
        sparse[row, index] = value
        theirs = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student / tau, dim=1),
                                                      F.softmax(sparse / tau, dim=1)) * (alpha * tau * tau) + \
            nn.CrossEntropyLoss()(student, labels) * (1.0 - alpha)
        ours = kd_loss(student, stingy(teacher, stingy_k(DefenceConfig(name="stingy"), classes)), labels, alpha, tau)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_noisy_is_reproducible_with_a_seeded_generator():
    logits = t([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    a = noisy(logits, 0.5, torch.Generator().manual_seed(7))
    b = noisy(logits, 0.5, torch.Generator().manual_seed(7))
    c = noisy(logits, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, logits)
    assert torch.equal(noisy(logits, 0.0, torch.Generator().manual_seed(7)), logits)  # std 0: no change


def test_noisy_has_the_requested_std():
    logits = torch.full((100_000,), 3.0)
    noise = noisy(logits, 0.5, torch.Generator().manual_seed(0)) - logits
    assert noise.std().item() == pytest.approx(0.5, rel=0.1)
    assert abs(noise.mean().item()) < 0.05  # zero-mean: the logits are not shifted


def test_rounded_hand_values_and_floor():
    # softmax(ln 0.04, ln 0.26, ln 0.70) = (0.04, 0.26, 0.70); to 1 decimal: (0.0, 0.3, 0.7),
    # and 0.0 is floored at 0.5·10^-1 = 0.05
    logits = torch.log(t([0.04, 0.26, 0.70]))
    assert rounded(logits, 1)[0].tolist() == pytest.approx([math.log(0.05), math.log(0.3), math.log(0.7)], abs=1e-5)
    # softmax(0, ln 3) = (1/4, 3/4): exact at 2 decimals, (1.0 -> 1, 0.0 -> floor 0.5) at 0 decimals
    assert rounded(t([0.0, LN3]), 2)[0].tolist() == pytest.approx([math.log(0.25), math.log(0.75)], abs=1e-5)
    assert rounded(t([0.0, 20.0]), 0)[0].tolist() == pytest.approx([math.log(0.5), 0.0], abs=1e-6)
    # softmax(0, ln 4) = (0.2, 0.8) at 3 decimals; shifting every logit changes nothing
    assert rounded(t([5.0, 5.0 + math.log(4.0)]), 3)[0].tolist() == pytest.approx(
        [math.log(0.2), math.log(0.8)], abs=1e-5)


def test_rounded_is_finite_and_float32_for_saturated_logits():
    out = rounded(t([100.0, -100.0, 0.0]).to(torch.bfloat16), 2)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out[0].tolist() == pytest.approx([0.0, math.log(0.005), math.log(0.005)], abs=1e-5)


LOGITS = t([-1.0, 3.0, -5.0, 2.0], [0.5, -0.25, 4.0, -3.0])


def test_released_applies_each_defence():
    net = nn.Identity()  # the "network" returns its input: the logits themselves
    stingy_net = Released(net, DefenceConfig(name="stingy", top_k=2))
    assert stingy_net(LOGITS).tolist() == [[INF, 3.0, INF, 2.0], [0.5, INF, 4.0, INF]]
    # without top_k: the authors' ratio, int(0.2 × 4 classes) = 0 -> at least 1
    assert Released(net, DefenceConfig(name="stingy"))(LOGITS).tolist() == [[INF, 3.0, INF, INF], [INF, INF, 4.0, INF]]
    round_net = Released(net, DefenceConfig(name="round", decimals=3))
    assert torch.equal(round_net(LOGITS), rounded(LOGITS, 3))
    noise_net = Released(net, DefenceConfig(name="noise", noise_std=0.3), seed=5)
    assert torch.equal(noise_net(LOGITS), noisy(LOGITS, 0.3, torch.Generator().manual_seed(5)))
    assert torch.equal(Released(net, DefenceConfig(name="none"))(LOGITS), LOGITS)


def test_release_without_defence_is_the_network_itself():
    net = nn.Linear(3, 2)
    assert release(net, DefenceConfig()) is net
    wrapped = release(net, DefenceConfig(name="stingy", top_k=1), seed=3)
    assert isinstance(wrapped, Released) and wrapped.network is net and wrapped.seed == 3
    assert list(wrapped.parameters()) == list(net.parameters())  # no parameters of its own


def test_released_noise_is_seeded_per_instance_and_advances():
    cfg = DefenceConfig(name="noise", noise_std=1.0)
    a, b, c = Released(nn.Identity(), cfg, seed=1), Released(nn.Identity(), cfg, seed=1), Released(
        nn.Identity(), cfg, seed=2)
    first_a, second_a = a(LOGITS), a(LOGITS)
    first_b, second_b = b(LOGITS), b(LOGITS)
    assert torch.equal(first_a, first_b) and torch.equal(second_a, second_b)
    assert not torch.equal(first_a, second_a)  # each query draws fresh noise
    assert not torch.equal(c(LOGITS), first_a)


def test_released_noise_does_not_move_global_rng():
    released = Released(nn.Identity(), DefenceConfig(name="noise", noise_std=1.0), seed=0)
    torch.manual_seed(123)
    released(LOGITS)
    drawn = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(drawn, torch.rand(4))
