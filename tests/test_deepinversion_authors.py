"""DeepInversion against its authors' code (NVlabs/DeepInversion: ``cifar10/deepinversion_cifar10.py``
at abafd38e, ``deepinversion.py`` at 1585b0ed): the competition term, the l2 prior and the
jitter, each against values worked out here from the authors' formulas, and the priors taken on
the jittered images inside :func:`invert_batch`."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import nt_dist.objectives.deepinversion as deepinversion
from nt_dist.config import DataFreeConfig
from nt_dist.objectives.deepinversion import (
    BatchNormProbe,
    DeepInversion,
    competition_loss,
    invert_batch,
    jitter_images,
    jitter_shift,
    l2_prior,
)

T = 3.0  # the authors' temperature


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits_of(*probabilities: float) -> list[float]:
    """Logits whose softmax at T = 3 is ``probabilities``: T·ln p."""
    return [T * math.log(p) for p in probabilities]


def kl(m: list[float], x: list[float]) -> float:
    """KLDivLoss(input=log x, target=m) for one row: Σ m·(ln m − ln x)."""
    return sum(mi * (math.log(mi) - math.log(xi)) for mi, xi in zip(m, x, strict=True))


def clamp(values: list[float]) -> list[float]:
    return [min(max(v, 0.01), 0.99) for v in values]


def authors_row(p: list[float], q: list[float]) -> float:
    """One row's ½·KL(M'‖P') + ½·KL(M'‖Q'), the primes clamped to [0.01, 0.99], no renormalising."""
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    return 0.5 * kl(clamp(m), clamp(p)) + 0.5 * kl(clamp(m), clamp(q))


def competition(student: list[list[float]], teacher: list[list[float]]) -> float:
    return competition_loss(torch.tensor(student), torch.tensor(teacher)).item()


# ------------------------------------------------------------------------------------------
# the competition term
# ------------------------------------------------------------------------------------------
def test_competition_agreeing_distributions_give_one():
    assert competition([[0.0, 0.0]], [[0.0, 0.0]]) == pytest.approx(1.0, abs=1e-7)
    assert competition([[1.0, -2.0, 0.5]], [[1.0, -2.0, 0.5]]) == pytest.approx(1.0, abs=1e-6)


def test_competition_no_clamp_binds_hand_value_at_t3():
    # P = (1/4, 3/4), Q = (3/4, 1/4), M = (1/2, 1/2): both KLs are ½ln(0.5/0.25) + ½ln(0.5/0.75)
    value = competition([logits_of(0.25, 0.75)], [logits_of(0.75, 0.25)])
    js = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    assert js == pytest.approx(0.5 * math.log(4.0 / 3.0))
    assert value == pytest.approx(1.0 - js, abs=1e-6)
    # the same logits read at T = 1 would give another value: the temperature is 3
    assert competition_loss(torch.tensor([logits_of(0.25, 0.75)]), torch.tensor([logits_of(0.75, 0.25)]),
                            T=1.0).item() != pytest.approx(value, abs=1e-3)


def test_competition_inner_clamp_binds_hand_value():
    # P = (0.001, 0.999) clamps to (0.01, 0.99); Q = (0.5, 0.5); M = (0.2505, 0.7495) stays
    value = competition([logits_of(0.001, 0.999)], [[0.0, 0.0]])
    m = [0.2505, 0.7495]
    js = 0.5 * (m[0] * math.log(m[0] / 0.01) + m[1] * math.log(m[1] / 0.99)) \
        + 0.5 * (m[0] * math.log(m[0] / 0.5) + m[1] * math.log(m[1] / 0.5))
    assert value == pytest.approx(1.0 - js, abs=1e-5)
    assert value == pytest.approx(0.63569, abs=1e-4)
    # without the clamp on P, KL(M‖P) has ln(0.2505/0.001): the term would be 0.351
    unclamped = 0.5 * (m[0] * math.log(m[0] / 0.001) + m[1] * math.log(m[1] / 0.999)) \
        + 0.5 * (m[0] * math.log(m[0] / 0.5) + m[1] * math.log(m[1] / 0.5))
    assert abs((1.0 - unclamped) - value) > 0.2


def test_competition_clamped_m_is_not_renormalised():
    # P = (0.004, 0.496, 0.5), Q = (0.006, 0.694, 0.3): M = (0.005, 0.595, 0.4) -> M' = (0.01, 0.595, 0.4),
    # which sums to 1.005 and is used as it is
    value = competition([logits_of(0.004, 0.496, 0.5)], [logits_of(0.006, 0.694, 0.3)])
    kl_p = 0.01 * math.log(0.01 / 0.01) + 0.595 * math.log(0.595 / 0.496) + 0.4 * math.log(0.4 / 0.5)
    kl_q = 0.01 * math.log(0.01 / 0.01) + 0.595 * math.log(0.595 / 0.694) + 0.4 * math.log(0.4 / 0.3)
    assert value == pytest.approx(1.0 - (0.5 * kl_p + 0.5 * kl_q), abs=1e-5)
    assert value == pytest.approx(1.0 - authors_row([0.004, 0.496, 0.5], [0.006, 0.694, 0.3]), abs=1e-5)


def test_competition_outer_clamp_binds_term_zero_and_no_gradient():
    # P = (0.02, 0.98), Q = (0.98, 0.02), no inner clamp binds, M = (½, ½):
    # each KL = ½ln(0.5/0.02) + ½ln(0.5/0.98) = 1.273 > 1 -> clamp 1 -> term 0
    row = 0.5 * math.log(0.5 / 0.02) + 0.5 * math.log(0.5 / 0.98)
    assert row > 1.0 and authors_row([0.02, 0.98], [0.98, 0.02]) == pytest.approx(row)
    student = torch.tensor([logits_of(0.02, 0.98)], requires_grad=True)
    teacher = torch.tensor([logits_of(0.98, 0.02)], requires_grad=True)
    value = competition_loss(student, teacher)
    assert value.item() == 0.0
    value.backward()
    assert torch.count_nonzero(student.grad) == 0 and torch.count_nonzero(teacher.grad) == 0
    # far apart: the inner clamps bind too, KL = ½ln(0.5/0.99) + ½ln(0.5/0.01) = 1.61 -> term 0
    assert competition([[60.0, 0.0]], [[0.0, 60.0]]) == 0.0


def test_competition_batch_mean_is_taken_before_the_outer_clamp():
    # rows: the far pair (1.273) and an agreeing pair (0): batch mean 0.637 < 1, so the term is
    # 1 − 0.637 and the gradient flows (a per-row clamp would give 1 − (1 + 0)/2)
    far = 0.5 * math.log(0.5 / 0.02) + 0.5 * math.log(0.5 / 0.98)
    student = torch.tensor([logits_of(0.02, 0.98), [0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([logits_of(0.98, 0.02), [0.0, 0.0]])
    value = competition_loss(student, teacher)
    assert value.item() == pytest.approx(1.0 - (far + 0.0) / 2, abs=1e-5)
    value.backward()
    assert torch.count_nonzero(student.grad[0]) == 2
    # two unclamped rows: the batch mean of the rows' values
    rows = [authors_row([0.25, 0.75], [0.75, 0.25]), authors_row([0.001, 0.999], [0.5, 0.5])]
    value = competition([logits_of(0.25, 0.75), logits_of(0.001, 0.999)], [logits_of(0.75, 0.25), [0.0, 0.0]])
    assert value == pytest.approx(1.0 - sum(rows) / 2, abs=1e-5)


# ------------------------------------------------------------------------------------------
# the l2 prior
# ------------------------------------------------------------------------------------------
def test_l2_prior_cifar_norm_of_batch_imagenet_mean_of_image_norms():
    images = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 12.0]]]])  # two 1x1x2 images, norms 5 and 12
    assert l2_prior(images, "cifar").item() == pytest.approx(math.sqrt(9 + 16 + 144))  # 13, not 169
    assert l2_prior(images, "imagenet").item() == pytest.approx((5.0 + 12.0) / 2)


# ------------------------------------------------------------------------------------------
# the jitter
# ------------------------------------------------------------------------------------------
def test_jitter_shift_scales_thirty_pixels_at_224():
    assert [jitter_shift(n, "imagenet") for n in (224, 64, 32, 16, 4, 1)] == [30, 9, 4, 2, 1, 1]
    assert jitter_shift(224, "cifar") == jitter_shift(16, "cifar") == 2


def decode(out: torch.Tensor, size: int) -> tuple[int, int, bool]:
    """(dy, dx, flipped) of a jittered ``arange`` image, checked by rebuilding it."""
    plane = out[0, 0]
    r0, c0 = (int(i) for i in (plane == 0).nonzero()[0])
    flipped = int(plane[r0, (c0 - 1) % size]) == 1
    dy = r0 if r0 <= size // 2 else r0 - size
    col = size - 1 - c0 if flipped else c0
    dx = col if col <= size // 2 else col - size
    return dy, dx, flipped


def arange_image(size: int) -> torch.Tensor:
    return torch.arange(3 * size * size, dtype=torch.float32).reshape(1, 3, size, size) % (size * size)


@pytest.mark.parametrize("kind, size", [("cifar", 8), ("imagenet", 32)])
def test_jitter_rolls_within_range_flips_only_for_imagenet(kind, size):
    image = arange_image(size)
    generator = torch.Generator().manual_seed(0)
    rng_state = torch.random.get_rng_state()
    draws = []
    for _ in range(400):
        out = jitter_images(image, generator, kind)
        dy, dx, flipped = decode(out, size)
        rebuilt = torch.roll(image, shifts=(dy, dx), dims=(2, 3))
        assert torch.equal(out, torch.flip(rebuilt, dims=(3,)) if flipped else rebuilt)
        draws.append((dy, dx, flipped))
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # only the generator is drawn from
    s = 2 if kind == "cifar" else 4  # round(30·32/224) = 4
    assert {(dy, dx) for dy, dx, _ in draws} == {(a, b) for a in range(-s, s + 1) for b in range(-s, s + 1)}
    flips = sum(flipped for _, _, flipped in draws)
    if kind == "cifar":
        assert flips == 0
    else:
        assert 150 <= flips <= 250  # p = ½: 200 ± 5 standard deviations
    again = torch.Generator().manual_seed(0)
    assert torch.equal(jitter_images(image, again, kind), jitter_images(image, torch.Generator().manual_seed(0), kind))


# ------------------------------------------------------------------------------------------
# invert_batch: every prior on the jittered images
# ------------------------------------------------------------------------------------------
def tiny_teacher() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    return net.eval().requires_grad_(False)


def hand_tv(x: torch.Tensor) -> float:
    """The authors' TV: four neighbour differences, ``torch.norm`` of each, summed."""
    diff1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    diff2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    diff3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    diff4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return float(torch.norm(diff1) + torch.norm(diff2) + torch.norm(diff3) + torch.norm(diff4))


def first_loss(monkeypatch, jitter: str, seen: dict, **weights) -> float:
    """invert_batch's loss at its first step, the jitter replaced by a fixed roll (2, 3) that
    records what it gave the networks."""
    def fixed(images, generator, kind):
        assert kind == jitter
        out = torch.roll(images, shifts=(2, 3), dims=(2, 3))
        seen["x"], seen["jit"] = images.detach().clone(), out.detach().clone()
        return out

    monkeypatch.setattr(deepinversion, "jitter_images", fixed)
    teacher = tiny_teacher()
    probe = BatchNormProbe(teacher)
    settings = {"bn_weight": 0.0, "tv_weight": 0.0, "l2_weight": 0.0, **weights}
    try:
        _, history = invert_batch(teacher, probe, torch.tensor([0, 1]), 8, steps=1, lr=1e-3, jitter=jitter,
                                  generator=torch.Generator().manual_seed(5), **settings)
    finally:
        probe.remove()
    return history[0]


@pytest.mark.parametrize("jitter", ["cifar", "imagenet"])
def test_invert_batch_takes_tv_and_l2_on_the_jittered_images(monkeypatch, jitter):
    seen: dict = {}
    ce = first_loss(monkeypatch, jitter, seen)
    with_tv = first_loss(monkeypatch, jitter, seen, tv_weight=1.0)
    x, jit = seen["x"], seen["jit"]
    assert with_tv - ce == pytest.approx(hand_tv(jit), rel=1e-5)
    assert abs(hand_tv(jit) - hand_tv(x)) > 1e-3 * hand_tv(x)  # the roll's seam: the un-jittered TV differs
    with_l2 = first_loss(monkeypatch, jitter, seen, l2_weight=1.0)
    if jitter == "cifar":
        expected = float(torch.norm(jit, 2))  # the authors' torch.norm(inputs_jit, 2), not squared
    else:
        expected = float(torch.norm(jit.view(2, -1), dim=1).mean())
    assert with_l2 - ce == pytest.approx(expected, rel=1e-5)


def test_invert_batch_feeds_the_student_the_jittered_images(monkeypatch):
    seen: dict = {}
    fed = []

    def student(images):
        fed.append(images.detach().clone())
        return torch.zeros(len(images), 3)  # uniform: Q against it decides the term

    def fixed(images, generator, kind):
        out = torch.roll(images, shifts=(1, 1), dims=(2, 3))
        seen["jit"] = out.detach().clone()
        return out

    monkeypatch.setattr(deepinversion, "jitter_images", fixed)
    teacher = tiny_teacher()
    probe = BatchNormProbe(teacher)
    invert_batch(teacher, probe, torch.tensor([0, 1]), 8, steps=1, lr=1e-3, bn_weight=0.0, tv_weight=0.0,
                 l2_weight=0.0, competition_weight=1.0, student=student, generator=torch.Generator().manual_seed(5))
    probe.remove()
    assert len(fed) == 1 and torch.equal(fed[0], seen["jit"])


def test_train_source_passes_the_jitter_into_settings(tmp_path: Path):
    recipe = SimpleNamespace(datafree=DataFreeConfig(jitter="imagenet"), data=SimpleNamespace(image_size=16),
                             run=SimpleNamespace(name="r", seed=0, output_dir=str(tmp_path)))
    source = DeepInversion().train_source(recipe, tiny_teacher(), num_classes=3, device=torch.device("cpu"), rank=0,
                                          identity="t", student=nn.Linear(2, 2), main=False)
    assert source.settings["jitter"] == "imagenet"
    assert '"jitter": "imagenet"' in source.identity
