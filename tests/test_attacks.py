"""Attacks against values computed by hand, where gradients go, and the data-free sources' state."""

import copy
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import nt_dist.objectives.deepinversion as deepinversion
from nt_dist.defences import stingy
from nt_dist.errors import UserError
from nt_dist.losses import kd_loss
from nt_dist.models import create_model
from nt_dist.objectives.dafl import Generator, GeneratorSource, dafl_generator_loss, with_source_parts
from nt_dist.objectives.deepinversion import (
    BatchNormProbe,
    InversionSource,
    bn_statistics_loss,
    eval_logits,
    invert_batch,
    total_variation,
)
from nt_dist.objectives.skeptical import SkepticalStudent
from nt_dist.objectives.topk import topk_kd_loss, topk_soft_targets, topk_step

LN2, LN3 = math.log(2.0), math.log(3.0)
E = math.e


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one intra-op thread is as fast, and far steadier on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def frozen(net: nn.Module) -> nn.Module:
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------
# sparse_kd: top-k soft targets
# ------------------------------------------------------------------------------------------
# teacher logits (2, 0, 4, -2) at τ = 2 soften to (1, 0, 2, -1); the top 2 are classes 2 and 0,
# with probabilities ∝ (e^1, e^2): renormalised p0 = e/(e + e²) = 1/(1 + e), p2 = e/(1 + e).
TEACHER = t([2.0, 0.0, 4.0, -2.0])
P0, P2 = 1.0 / (1.0 + E), E / (1.0 + E)


def test_topk_soft_targets_hand_value():
    targets = topk_soft_targets(TEACHER, k=2, tau=2.0)
    assert targets.dtype == torch.float32
    assert targets[0].tolist() == pytest.approx([P0, 0.0, P2, 0.0], abs=1e-6)
    assert targets[0, 1].item() == 0.0 and targets[0, 3].item() == 0.0  # exactly zero, not tiny
    assert targets.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_topk_soft_targets_k_at_least_classes_is_softmax():
    z = [math.exp(v) for v in (1.0, 0.0, 2.0, -1.0)]
    softmax = [v / sum(z) for v in z]
    for k in (4, 5, 100):
        assert topk_soft_targets(TEACHER, k=k, tau=2.0)[0].tolist() == pytest.approx(softmax, abs=1e-6)


def test_topk_kd_loss_with_all_classes_is_kd_loss():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7) * 3
    labels = torch.tensor([0, 3, 6, 2, 1])
    for alpha, tau in ((0.9, 4.0), (0.3, 1.0)):
        loss, parts = topk_kd_loss(student, teacher, labels, alpha, tau, k=7, return_parts=True)
        ref, ref_parts = kd_loss(student, teacher, labels, alpha, tau, return_parts=True)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        assert parts["kl"].item() == pytest.approx(ref_parts["kl"].item(), rel=1e-5)
        assert parts["ce"].item() == pytest.approx(ref_parts["ce"].item(), rel=1e-6)


def test_topk_kd_loss_k2_hand_value_and_zeroed_classes_contribute_nothing():
    # student logits 2·ln(1, 2, 3, 4) at τ = 2 soften to q = (1, 2, 3, 4)/10; at τ = 1 they give
    # softmax ∝ (1, 4, 9, 16), so CE for label 3 is −ln(16/30).
    student = (2.0 * torch.log(t([1.0, 2.0, 3.0, 4.0]))).requires_grad_()
    teacher = TEACHER.clone().requires_grad_()
    alpha, tau = 0.7, 2.0
    kl = P0 * math.log(P0 / 0.1) + P2 * math.log(P2 / 0.3)  # classes 1 and 3: 0·log 0 = 0
    ce = -math.log(16.0 / 30.0)
    loss, parts = topk_kd_loss(student, teacher, torch.tensor([3]), alpha, tau, k=2, return_parts=True)
    assert parts["kl"].item() == pytest.approx(kl, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(ce, abs=1e-6)
    assert loss.item() == pytest.approx(alpha * tau * tau * kl + (1 - alpha) * ce, abs=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert teacher.grad is None  # the teacher never gets a gradient


def test_topk_kd_loss_gradient_never_reaches_teacher_through_a_network():
    torch.manual_seed(1)
    teacher_net, student_net = nn.Linear(4, 6), nn.Linear(4, 6)
    x = torch.randn(3, 4)
    topk_kd_loss(student_net(x), teacher_net(x), torch.tensor([0, 1, 2]), 0.9, 4.0, k=3).backward()
    assert all(p.grad is None for p in teacher_net.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student_net.parameters())


# ------------------------------------------------------------------------------------------
# the training-loop pieces of nt_dist.objectives
# ------------------------------------------------------------------------------------------
class FakeTeacher:
    """The frozen teacher's call signature ``(images, index, epoch)``; logits fixed per call."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits, self.calls = logits, []

    def __call__(self, images, index, epoch):
        self.calls.append((images.shape, index, epoch))
        return self.logits


def test_topk_step_is_topk_kd_loss_of_model_and_teacher():
    torch.manual_seed(0)
    model, x, y = nn.Linear(4, 4), torch.randn(1, 4), torch.tensor([3])
    teacher = FakeTeacher(TEACHER)
    out = topk_step(model, x, y, None, 2, teacher=teacher, tau=2.0, alpha=0.7, k=2)
    assert teacher.calls == [((1, 4), None, 2)]
    assert set(out) == {"loss", "logits", "ce", "kl"}
    ref = topk_kd_loss(model(x), TEACHER, y, 0.7, 2.0, 2)
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.equal(out["logits"], model(x))


def test_with_source_parts_adds_the_generator_losses():
    class Source:
        last = {"oh": torch.tensor(1.0), "ie": torch.tensor(-2.0)}

    step = with_source_parts(lambda *a, **k: {"loss": torch.tensor(3.0)}, Source())
    assert {k: v.item() for k, v in step().items()} == {"loss": 3.0, "generator_oh": 1.0, "generator_ie": -2.0}
    plain = with_source_parts(lambda *a, **k: {"loss": torch.tensor(3.0)}, object())  # no ``last``: unchanged
    assert set(plain()) == {"loss"}


def test_eval_logits_main_head_in_eval_mode_gradient_to_images_only():
    torch.manual_seed(0)
    student = SkepticalStudent(create_model("cifar_resnet8", 10), 10, 16).train()
    images = torch.randn(3, 3, 16, 16, requires_grad=True)
    logits = eval_logits(student, images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 10)
    assert student.training and all(p.requires_grad for p in student.parameters())
    logits.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.parameters())
    with torch.no_grad():
        assert torch.allclose(logits, student.eval()(images), atol=1e-6)


def test_eval_logits_keeps_frozen_parameters_frozen():
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Linear(4, 3))
    student[1].requires_grad_(False)
    eval_logits(student, torch.randn(2, 3, 2, 2))
    assert [p.requires_grad for p in student.parameters()] == [False, False, True, True]


# ------------------------------------------------------------------------------------------
# DAFL
# ------------------------------------------------------------------------------------------
def test_dafl_generator_loss_hand_values():
    # row 1 (0, ln 3, 0) -> (1/5, 3/5, 1/5), argmax 1; row 2 (ln 2, 0, 0) -> (1/2, 1/4, 1/4), argmax 0
    logits = t([0.0, LN3, 0.0], [LN2, 0.0, 0.0])
    features = t([1.0, -2.0], [0.5, -0.5])
    oh = (-math.log(0.6) - math.log(0.5)) / 2
    act = -(1.0 + 2.0 + 0.5 + 0.5) / 4
    mean_p = (0.35, 0.425, 0.225)
    ie = sum(p * math.log10(p) for p in mean_p)
    loss, parts = dafl_generator_loss(logits, features, 0.05, 0.01, 5.0)
    assert parts["oh"].item() == pytest.approx(oh, abs=1e-6)
    assert parts["act"].item() == pytest.approx(act, abs=1e-6)
    assert parts["ie"].item() == pytest.approx(ie, abs=1e-6)
    assert loss.item() == pytest.approx(0.05 * oh + 0.01 * act + 5.0 * ie, abs=1e-6)


def test_dafl_against_a_stingy_release_has_finite_gradients():
    # Stingy k = 1 over 3 classes: row 1 keeps class 1, row 2 class 0; class 2 has p̄ = 0 and adds 0
    logits = t([0.0, LN3, 0.0], [LN2, 0.0, 0.0]).requires_grad_()
    released = stingy(logits, 1)
    loss, parts = dafl_generator_loss(released, t([1.0, -2.0], [0.5, -0.5]), 0.05, 0.01, 5.0)
    assert parts["ie"].item() == pytest.approx(2 * 0.5 * math.log10(0.5), abs=1e-6)  # p̄ = (½, ½, 0)
    assert parts["oh"].item() == pytest.approx(0.0, abs=1e-6)  # each row is certain of its one class
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_generator_output_shape():
    torch.manual_seed(0)
    images = Generator(latent_dim=8, image_size=16)(torch.randn(5, 8))
    assert images.shape == (5, 3, 16, 16)


def dafl_source(teacher: nn.Module, seed: int = 0, **extra) -> GeneratorSource:
    kwargs = {"latent_dim": 8, "image_size": 16, "batch_size": 8, "steps_per_epoch": 2, "lr": 0.02,
              "weights": (0.05, 0.01, 5.0), "seed": seed, "device": torch.device("cpu"), **extra}
    return GeneratorSource(teacher, **kwargs)


def test_generator_source_step_trains_generator_only():
    torch.manual_seed(0)
    teacher = frozen(create_model("cifar_cnn", 10))
    teacher_before = copy.deepcopy(teacher.state_dict())
    source = dafl_source(teacher)
    generator_before = copy.deepcopy(source.generator.state_dict())
    images, labels = source.step()
    assert images.shape == (8, 3, 16, 16) and labels.shape == (8,)
    assert not images.requires_grad and images.grad_fn is None
    changed = [k for k, v in source.generator.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, generator_before[k])]
    assert "l1.weight" in changed and "conv2.3.weight" in changed  # first and last layers moved
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    with torch.no_grad():
        assert torch.equal(labels, teacher(images).argmax(dim=1))
    assert set(source.last) == {"oh", "act", "ie"} and all(torch.isfinite(v) for v in source.last.values())
    assert len(list(source.epoch(0, start_step=1))) == 1 and len(list(source.epoch(1))) == 2


def test_generator_source_state_round_trip_reproduces_next_batch():
    torch.manual_seed(0)
    teacher = frozen(create_model("cifar_cnn", 10))
    a, b = dafl_source(teacher, seed=3), dafl_source(teacher, seed=3)
    first_a, _ = a.step()
    first_b, _ = b.step()
    assert torch.equal(first_a, first_b)  # same seed, same generator and noise
    a.step()  # a runs ahead; b takes a's state, as from a checkpoint
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for _ in range(2):
        (ia, la), (ib, lb) = a.step(), b.step()
        assert torch.equal(ia, ib) and torch.equal(la, lb)
    other, _ = dafl_source(teacher, seed=4).step()
    assert not torch.equal(other, first_a)


def test_generator_source_does_not_move_global_rng():
    teacher = frozen(create_model("cifar_cnn", 10))
    torch.manual_seed(11)
    dafl_source(teacher, seed=5)
    drawn = torch.rand(4)
    torch.manual_seed(11)
    assert torch.equal(drawn, torch.rand(4))


def test_generator_source_rejects_bad_image_size_and_teacher_without_linear():
    with pytest.raises(UserError, match="multiple of 4"):
        dafl_source(frozen(create_model("cifar_cnn", 10)), image_size=18)
    no_linear = frozen(nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    with pytest.raises(UserError, match="nn.Linear"):
        dafl_source(no_linear)


# ------------------------------------------------------------------------------------------
# DeepInversion
# ------------------------------------------------------------------------------------------
def test_bn_statistics_loss_zero_when_batch_matches_running_stats():
    # channel 0 holds (1, 3): mean 2, biased var 1; channel 1 holds (−1, −1): mean −1, var 0
    features = torch.tensor([[[[1.0, 3.0]], [[-1.0, -1.0]]]])
    assert features.shape == (1, 2, 1, 2)
    assert bn_statistics_loss(features, t(2.0, -1.0), t(1.0, 0.0)).item() == pytest.approx(0.0, abs=1e-7)
    # running mean (1, 1): ‖(1, −2)‖ = √5; running var (0, 2): ‖(1, −2)‖ = √5
    value = bn_statistics_loss(features, t(1.0, 1.0), t(0.0, 2.0)).item()
    assert value == pytest.approx(2 * math.sqrt(5.0), abs=1e-6)
    # an unbiased variance would give var 2 for channel 0, so this case tells them apart
    assert bn_statistics_loss(features, t(2.0, -1.0), t(2.0, 0.0)).item() == pytest.approx(1.0, abs=1e-6)


def test_total_variation_hand_values():
    assert total_variation(torch.full((2, 3, 4, 4), 0.7)).item() == 0.0
    image = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # horizontal (0−1, 2−4), vertical (0−2, 1−4), diagonals 2−1 and 0−4
    expected = math.sqrt(1 + 4) + math.sqrt(4 + 9) + 1.0 + 4.0
    assert total_variation(image).item() == pytest.approx(expected, abs=1e-6)
    # the competition term and the l2 prior: tests/test_deepinversion_authors.py


def test_batchnorm_probe_needs_batchnorm2d_and_collects_each_layer():
    with pytest.raises(UserError, match="BatchNorm2d"):
        BatchNormProbe(nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.BatchNorm1d(3)))
    with pytest.raises(UserError):
        BatchNormProbe(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)))
    net = frozen(create_model("cifar_cnn", 10))
    probe = BatchNormProbe(net)
    with torch.no_grad():
        net(torch.randn(2, 3, 16, 16))
    assert len(probe.losses) == 3  # bn1..bn3; fcbn1 is BatchNorm1d
    assert probe.take().item() > 0 and probe.losses == []
    probe.remove()
    with torch.no_grad():
        net(torch.randn(2, 3, 16, 16))
    assert probe.losses == []


def calibrated_teacher(num_classes: int = 10) -> nn.Module:
    """cifar_cnn whose BatchNorm running statistics are those of uniform [0, 1) images."""
    torch.manual_seed(0)
    net = create_model("cifar_cnn", num_classes)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one batch sets the statistics exactly
    net.train()
    with torch.no_grad():
        net(torch.rand(32, 3, 16, 16))
    return frozen(net)


def test_invert_batch_lowers_its_loss_and_the_batchnorm_part():
    teacher = calibrated_teacher()
    probe = BatchNormProbe(teacher)
    targets = torch.arange(8) % 10
    images, history = invert_batch(teacher, probe, targets, 16, steps=30, lr=0.05, bn_weight=1.0, tv_weight=0.0,
                                   l2_weight=0.0, generator=torch.Generator().manual_seed(3))
    assert images.shape == (8, 3, 16, 16) and not images.requires_grad
    assert len(history) == 30 and history[-1] < history[0]
    assert probe.losses == []
    noise = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # invert_batch's start
    with torch.no_grad():
        teacher(noise)
        before = probe.take().item()
        teacher(images)
        after = probe.take().item()
    assert after < 0.5 * before
    assert all(p.grad is None for p in teacher.parameters())


SETTINGS = {"steps": 3, "lr": 0.05, "bn_weight": 1.0, "tv_weight": 0.0, "l2_weight": 0.0,
            "competition_weight": 0.0, "jitter": "cifar"}


def inversion_source(teacher: nn.Module, folder, identity: str = "teacher-a", **extra) -> InversionSource:
    kwargs = {"num_classes": 3, "image_size": 16, "batch_size": 4, "batches": 2, "settings": SETTINGS,
              "seed": 0, "rank": 0, "device": torch.device("cpu"), "folder": folder, "identity": identity,
              "announce": lambda text: None, **extra}
    return InversionSource(teacher, **kwargs)


@pytest.fixture
def count_inversions(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return invert_batch(*args, **kwargs)

    monkeypatch.setattr(deepinversion, "invert_batch", counted)
    return calls


def test_inversion_source_saves_pool_and_reloads_only_for_same_identity(tmp_path, count_inversions):
    teacher = calibrated_teacher(3)
    first = inversion_source(teacher, tmp_path)
    first.synthesise(0)
    assert len(count_inversions) == 2  # one per batch
    path = tmp_path / "synthetic_rank0.safetensors"
    assert path.is_file()
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor("images").shape == (2, 4, 3, 16, 16)
        assert handle.metadata()["key"] == first.identity
    second = inversion_source(teacher, tmp_path)
    second.synthesise(0)
    assert len(count_inversions) == 2  # loaded, not synthesised
    assert torch.equal(second.images, first.images) and torch.equal(second.labels, first.labels)
    other = inversion_source(teacher, tmp_path, identity="teacher-b")
    other.synthesise(0)
    assert len(count_inversions) == 4  # another teacher: synthesised again
    changed = inversion_source(teacher, tmp_path, identity="teacher-b", settings={**SETTINGS, "steps": 2})
    changed.synthesise(0)
    assert len(count_inversions) == 6  # other settings: synthesised again
    rejittered = inversion_source(teacher, tmp_path, identity="teacher-b", settings={**SETTINGS, "steps": 2,
                                                                                      "jitter": "imagenet"})
    rejittered.synthesise(0)
    assert len(count_inversions) == 8  # another jitter: synthesised again


def test_inversion_source_epoch_yields_batches_with_cycling_labels(tmp_path):
    teacher = calibrated_teacher(3)
    source = inversion_source(teacher, tmp_path)
    batches = list(source.epoch(0))
    assert len(batches) == 2
    assert source.images is not None and source.labels is not None
    # targets cycle over the 3 classes across the pool: batch 0 (0, 1, 2, 0), batch 1 (1, 2, 0, 1)
    assert source.labels.tolist() == [[0, 1, 2, 0], [1, 2, 0, 1]]
    assert sorted(labels.tolist() for _, labels in batches) == [[0, 1, 2, 0], [1, 2, 0, 1]]
    for images, labels in batches:
        assert images.shape == (4, 3, 16, 16)
        stored = source.images[source.labels.tolist().index(labels.tolist())]
        for i in range(4):  # each image is the stored one, possibly flipped left-right
            assert torch.equal(images[i], stored[i]) or torch.equal(images[i], stored[i].flip(2))
    assert len(list(source.epoch(1, start_step=1))) == 1
    # rank 1 continues the cycle after rank 0's pool (offset batches * batch_size = 8)
    rank1 = inversion_source(teacher, tmp_path, rank=1)
    rank1.synthesise(0)
    assert rank1.labels.tolist() == [[2, 0, 1, 2], [0, 1, 2, 0]]
    assert (tmp_path / "synthetic_rank1.safetensors").is_file()
