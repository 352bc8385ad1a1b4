"""Teacher-side defences against values computed by hand, and their seeded noise."""

import math

import pytest
import torch
from torch import nn

from nt_dist.config import DefenceConfig
from nt_dist.defences import Released, noisy, release, rounded, stingy

LN3 = math.log(3.0)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_stingy_keeps_top_k_zeros_rest():
    logits = t([-1.0, 3.0, -5.0, 2.0], [0.5, -0.25, 4.0, -3.0])
    assert stingy(logits, 2).tolist() == [[0.0, 3.0, 0.0, 2.0], [0.5, 0.0, 4.0, 0.0]]
    assert stingy(logits, 1).tolist() == [[0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0]]
    # k covering every class (or more) releases the logits unchanged
    assert torch.equal(stingy(logits, 4), logits) and torch.equal(stingy(logits, 10), logits)


def test_stingy_with_all_negative_logits_keeps_the_largest_and_zeros_beat_them():
    logits = t([-1.0, -2.0, -3.0])
    released = stingy(logits, 1)
    assert released.tolist() == [[-1.0, 0.0, 0.0]]
    # as documented: with a negative top logit the released argmax is no longer the true one
    assert released.argmax().item() != logits.argmax().item()


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
    assert stingy_net(LOGITS).tolist() == [[0.0, 3.0, 0.0, 2.0], [0.5, 0.0, 4.0, 0.0]]
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
