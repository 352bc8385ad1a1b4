"""The Skeptical Student against hand-computed values of its authors' ``loss_fn_kd``
(``train_kd_to_SD.py``), and its BYOT auxiliary heads (``resnet_self.py``)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nt_dist.errors import UserError
from nt_dist.models import create_model
from nt_dist.objectives.skeptical import (
    AuxiliaryHead,
    SepConv,
    SkepticalStudent,
    plain_state,
    skeptical_loss,
    skeptical_step,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def t(*row):
    return torch.tensor([row], dtype=torch.float32)


# Hand-built head outputs, two classes, label 1, τ = 2 (so σ_τ(0, 2 ln 3) = (1/4, 3/4)):
#   out[0] (final)   (0, 2 ln 3): σ_τ = (1/4, 3/4); σ_1 = (1/10, 9/10), CE = ln(10/9)
#   out[1] (deepest) (0, 0):      σ_τ = (1/2, 1/2); CE = ln 2
#   out[2] (loc)     (2 ln 3, 0): σ_τ = (3/4, 1/4); σ_1 = (9/10, 1/10), CE = ln 10
#   teacher          (0, 2 ln 3): σ_τ = (1/4, 3/4)
FINAL, DEEPEST, LOC2, TEACHER = t(0.0, 2 * LN3), t(0.0, 0.0), t(2 * LN3, 0.0), t(0.0, 2 * LN3)
Y = torch.tensor([1])
CE_FINAL, CE_DEEPEST, CE_LOC2 = math.log(10 / 9), LN2, math.log(10)
KL_TEACHER_LOC2 = 0.25 * math.log(0.25 / 0.75) + 0.75 * math.log(0.75 / 0.25)  # = ½ ln 3
KL_FINAL_DEEPEST = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # = ¾ ln 3 − ln 2


def authors_expected(alpha: float, tau: float, w: float = 0.3) -> float:
    """``loss_fn_kd`` for epoch > kd_delay, written out: α·τ²·KL(t ‖ out[loc]) + (1 − α)·CE(out[loc])
    + (0.3·KL(out[0] ‖ out[1]) + 0.7·CE(out[1])) + CE(out[0])."""
    return (alpha * tau * tau * KL_TEACHER_LOC2 + (1 - alpha) * CE_LOC2
            + (w * KL_FINAL_DEEPEST + (1 - w) * CE_DEEPEST) + CE_FINAL)


@pytest.mark.parametrize(("alpha", "w"), [(0.9, 0.3), (0.5, 0.3), (0.9, 0.6)])
def test_the_loss_after_kd_delay_is_the_authors(alpha: float, w: float):
    assert KL_TEACHER_LOC2 == pytest.approx(LN3 / 2) and KL_FINAL_DEEPEST == pytest.approx(0.75 * LN3 - LN2)
    loss, parts = skeptical_loss([FINAL, DEEPEST, LOC2], TEACHER, Y, loc=2, alpha=alpha, tau=2.0,
                                 self_weight=w, distilling=True, return_parts=True)
    assert loss.item() == pytest.approx(authors_expected(alpha, 2.0, w), abs=1e-5)
    assert {k: round(v.item(), 5) for k, v in parts.items()} == {
        "ce": round(CE_FINAL, 5), "kl": round(KL_TEACHER_LOC2, 5), "aux_ce": round(CE_LOC2, 5),
        "self_kl": round(KL_FINAL_DEEPEST, 5), "self_ce": round(CE_DEEPEST, 5)}


def test_before_kd_delay_only_the_final_heads_ce():
    loss = skeptical_loss([FINAL, DEEPEST, LOC2], TEACHER, Y, loc=2, alpha=0.9, tau=2.0, self_weight=0.3,
                          distilling=False)
    assert loss.item() == pytest.approx(CE_FINAL, abs=1e-6)


def test_loc_1_sends_the_teacher_into_the_deepest_head():
    # KL(teacher ‖ out[1]) = KL((1/4, 3/4) ‖ (1/2, 1/2)) = ¾ ln 3 − ln 2, CE(out[1]) = ln 2
    loss = skeptical_loss([FINAL, DEEPEST], TEACHER, Y, loc=1, alpha=0.9, tau=2.0, self_weight=0.3, distilling=True)
    expected = 0.9 * 4 * KL_FINAL_DEEPEST + 0.1 * CE_DEEPEST + 0.3 * KL_FINAL_DEEPEST + 0.7 * CE_DEEPEST + CE_FINAL
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_self_distillation_runs_from_the_final_head_into_the_deepest_nothing_detached():
    final, deepest, loc2 = (x.clone().requires_grad_() for x in (FINAL, DEEPEST, LOC2))
    teacher = TEACHER.clone().requires_grad_()
    # w = 1: the deepest head's only term is KL(σ_τ(final) ‖ σ_τ(deepest)), d/d deepest = (q − p)/τ
    skeptical_loss([final, deepest, loc2], teacher, Y, loc=2, alpha=0.9, tau=2.0, self_weight=1.0,
                   distilling=True).backward()
    assert deepest.grad[0].tolist() == pytest.approx([(0.5 - 0.25) / 2, (0.5 - 0.75) / 2], abs=1e-6)
    # the final head gets CE's gradient plus the KL's (not detached, as the authors' KLDivLoss target)
    ce_only = FINAL.clone().requires_grad_()
    F.cross_entropy(ce_only, Y).backward()
    assert not torch.allclose(final.grad, ce_only.grad, atol=1e-4)
    assert teacher.grad is None  # the teacher is detached


class FakeTeacher:
    def __init__(self, logits):
        self.logits = logits

    def __call__(self, images, index, epoch):
        return self.logits


@pytest.mark.parametrize(("epoch", "distilling"), [(0, False), (1, False), (2, True), (5, True)])
def test_the_step_waits_kd_delay_epochs(epoch: int, distilling: bool):
    out = skeptical_step(lambda images: [FINAL, DEEPEST, LOC2], torch.zeros(1, 3, 4, 4), Y, None, epoch,
                         teacher=FakeTeacher(TEACHER), tau=2.0, alpha=0.9, self_weight=0.3, loc=2, kd_delay=2)
    assert out["loss"].item() == pytest.approx(authors_expected(0.9, 2.0) if distilling else CE_FINAL, abs=1e-5)
    assert out["logits"] is FINAL
    assert set(out) == {"loss", "logits", "ce", "kl", "aux_ce", "self_kl", "self_ce"}


# ----------------------------------------------------------------------------- the heads


def test_sepconv_and_head_are_byot_shaped():
    sep = SepConv(8, 16)
    kinds = [type(m).__name__ for m in sep]
    assert kinds == ["Conv2d", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "Conv2d", "BatchNorm2d", "ReLU"]
    assert sep[0].groups == 8 and sep[0].stride == (2, 2) and sep[4].groups == 8 and sep[4].stride == (1, 1)
    assert all(m.bias is None for m in sep if isinstance(m, nn.Conv2d))
    # parameters: dw 8·9 + pw 8·8 + BN 2·8 + dw 8·9 + pw 8·16 + BN 2·16
    assert sum(p.numel() for p in sep.parameters()) == 72 + 64 + 16 + 72 + 128 + 32
    head = AuxiliaryHead([8, 16, 32], [2, 2], num_classes=5)
    assert head(torch.randn(2, 8, 8, 8)).shape == (2, 5)
    assert [type(m).__name__ for m in head.attention] == ["SepConv", "BatchNorm2d", "ReLU"]
    assert len(head.scala) == 2 and head.fc.in_features == 32


def test_resnet18_heads_match_byot_parameter_counts():
    model = SkepticalStudent(create_model("cifar_resnet18", 10), 10, image_size=32)
    assert model.stages == ["layer1", "layer2", "layer3", "layer4"] and model.loc == 2
    count = {k: sum(p.numel() for p in h.parameters()) for k, h in model.heads.items()}
    sep = lambda a, b: a * 9 + a * a + 2 * a + a * 9 + a * b + 2 * b  # noqa: E731  (BYOT's SepConv)
    # resnet_self.py: attention3 = SepConv(256, 256) + BN(256); scala3 = SepConv(256, 512); fc3 = 512 -> 10
    assert count["1"] == sep(256, 256) + 512 + sep(256, 512) + 512 * 10 + 10
    # attention2 = SepConv(128, 128) + BN(128); scala2 = SepConv(128, 256), SepConv(256, 512); fc2
    assert count["2"] == sep(128, 128) + 256 + sep(128, 256) + sep(256, 512) + 512 * 10 + 10


@pytest.mark.parametrize(("name", "size", "stages"), [("cifar_resnet8", 16, 3), ("cifar_resnet18", 32, 4)])
def test_the_student_trains_its_heads_and_exports_the_plain_network(name: str, size: int, stages: int):
    torch.manual_seed(0)
    backbone = create_model(name, 10)
    before = copy.deepcopy(backbone.state_dict())
    model = SkepticalStudent(backbone, 10, image_size=size)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # the dry run changes nothing
    x = torch.randn(4, 3, size, size)
    model.train()
    outputs = model(x)
    assert len(outputs) == stages and outputs[3:] == [None] * (stages - 3)
    assert all(o.shape == (4, 10) for o in outputs[:3])
    skeptical_loss(outputs, torch.randn(4, 10), torch.tensor([0, 1, 2, 3]), loc=2, alpha=0.9, tau=4.0,
                   self_weight=0.3, distilling=True).backward()
    assert all(p.grad is not None for p in model.heads.parameters())
    state = plain_state(model.state_dict())
    plain = create_model(name, 10)
    plain.load_state_dict(state, strict=True)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_named_stages_and_their_errors_are_one_line():
    model = SkepticalStudent(create_model("cifar_resnet18", 10), 10, 32, stages=["layer2", "layer3", "layer4"],
                             loc=5)
    assert model.loc == 2 and set(model.heads) == {"1", "2"}
    with pytest.raises(UserError, match=r"^r\.yaml: distill\.student_stages: the Skeptical Student needs at least "
                                        r"two stages .* \(top-level modules: 0, 1, 2, 3, 4\); name its stages$"):
        SkepticalStudent(create_model("mlp", 10), 10, 16, key="r.yaml: distill")
    with pytest.raises(UserError, match=r"^r\.yaml: distill\.student_stages: 'nope' is not a module"):
        SkepticalStudent(create_model("cifar_resnet18", 10), 10, 32, stages=["layer1", "nope"], key="r.yaml: distill")
    with pytest.raises(UserError, match=r"'fc1' gives \(2, 128\); the Skeptical Student's heads take"):
        SkepticalStudent(create_model("cifar_cnn", 10), 10, 16, stages=["bn2", "fc1"], key="r.yaml: distill")


def test_survives_sync_batchnorm_conversion():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(SkepticalStudent(create_model("cifar_resnet8", 10), 10, 16))
    model.train()
    outputs = model(torch.randn(4, 3, 16, 16))  # without a process group SyncBatchNorm is plain BN
    assert [o.shape for o in outputs] == [(4, 10)] * 3


def test_a_recipe_whose_student_has_no_stages_fails_when_loaded():
    from pathlib import Path

    from nt_dist.config import load_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "digits_attack.yaml"
    assert load_recipe(recipe, ["distill.method=skeptical"]).model.name == "cifar_resnet8"
    with pytest.raises(UserError, match=r"digits_attack\.yaml: distill\.student_stages: the Skeptical Student needs "
                                        r"at least two stages"):
        load_recipe(recipe, ["distill.method=skeptical", "model.name=mlp"])


def test_before_kd_delay_every_head_still_gets_a_gradient_of_zero():
    """DDP (what accelerate launch wraps the student in) fails on parameters left out of the graph."""
    model = SkepticalStudent(create_model("cifar_resnet8", 10), 10, 16).train()
    skeptical_loss(model(torch.randn(4, 3, 16, 16)), torch.randn(4, 10), torch.tensor([0, 1, 2, 3]), loc=2,
                   alpha=0.9, tau=4.0, self_weight=0.3, distilling=False).backward()
    grads = [p.grad for p in model.heads.parameters()]
    assert all(g is not None and not g.any() for g in grads)
