"""The Skeptical Student (``distill.method: skeptical``; Kundu et al., "Analyzing the Confidentiality of
Undistillable Teachers in Knowledge Distillation", NeurIPS 2021), as its authors' code trains it.

Follows ``train_kd_to_SD.py`` (``loss_fn_kd``) and ``resnet_self.py`` of ksouvik52/Skeptical2021
at commit ba91f0768bb5814de2cb0e99a8a36f82e15d6c51, the code released with the paper (its
``resnet_self.py`` is the ResNet of "Be Your Own Teacher" (BYOT, Zhang et al., ICCV 2019)).

The student carries an auxiliary classifier on each of its stages but the last; with its own
final classifier they are the authors' ``outputs = [4/4, 3/4, 2/4, 1/4]`` (index 0 the final head,
1 the deepest auxiliary head, ...). From epoch ``distill.kd_delay`` on::

    L = α·τ²·KL(σ_τ(f_T(x)) ‖ σ_τ(out[loc])) + (1 − α)·CE(out[loc], y)      teacher -> head loc
      + w·KL(σ_τ(out[0]) ‖ σ_τ(out[1])) + (1 − w)·CE(out[1], y)              final head -> deepest head
      + CE(out[0], y)

and before it ``L = CE(out[0], y)``. ``loc`` is ``distill.kd_head``, w is ``distill.self_weight``
(their 0.3 and 0.7), α and τ are ``distill.alpha`` and ``distill.tau``. The self-distillation
term has no τ² and nothing in it is detached (gradients reach the final head too), as theirs.

Each auxiliary head is BYOT's: ``attention(x) ⊙ x`` with ``attention = SepConv(c, c) → BN →
ReLU → Upsample(×2, bilinear) → Sigmoid``, then one ``SepConv`` per later stage (to that stage's
channels, stride 2 where the stage halves the size) down to the last stage's width, a global
average pool and a linear classifier. ``SepConv`` is theirs: depthwise 3×3 (stride) → 1×1 → BN →
ReLU → depthwise 3×3 → 1×1 → BN → ReLU. The heads exist only while training: in eval mode the
model is the plain student, and the exported model is the plain student's weights.

Choices where their repository leaves a value unset (it releases the ``params.json`` of its
baseline and nasty teachers only, not of the skeptical students):

- ``loc`` (``distill.kd_head``) defaults to 2, the head at half depth on a four-stage ResNet
  (2/4): the teacher's soft labels enter two stages below the final classifier, the paper's idea
  of keeping the misleading dark knowledge away from it. With three stages, 2 is the 1/3 head.
- ``kd_delay`` defaults to 0: KD from the first epoch, so the audit's Skeptical column trains as
  many KD epochs as its KD columns. Their test is ``epoch > kd_delay`` on 0-based epochs, so their
  ``kd_delay`` is ours − 1 (ours counts the CE-only epochs).

Deviations:

1. The heads are built on any student whose stages are named (``distill.student_stages``;
   default: its top-level ``layer1``, ``layer2``, ... as our and timm's ResNets have), not only on
   their ResNet-18/50 and MobileNetV2; a stage's channels and the strides between stages are read
   from a dry forward pass.
2. Only the heads the loss reads are built (the deepest and ``loc``); theirs builds all three, and
   the others get no gradient from this loss, so training is the same.
3. The heads' pool is adaptive (``AdaptiveAvgPool2d(1)``) where theirs is ``AvgPool2d(4, 4)`` ("(8, 8)
   for tiny_imagenet" in their comment): the same on 32 px inputs (a 4×4 last stage), defined at
   every other size. The attention's upsampling targets the feature's own size, which is ×2
   whenever that size is even. The final head is the student's own classifier, as their ``fc4``.
4. The model kept is the last epoch's (theirs saves the student of best *test* accuracy), and the
   optimiser and schedule are the recipe's (theirs: SGD 0.9 / 5e-4, ×γ at ``schedule``).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nt_dist.errors import UserError
from nt_dist.frozen_network import as_frozen_network
from nt_dist.losses import soft_kl
from nt_dist.objectives.kd import Attack
from nt_dist.objectives.registry import StepFn, register

HEADS_PREFIX = "heads."
BACKBONE_PREFIX = "backbone."


def skeptical_loss(outputs: list[Tensor], teacher_logits: Tensor, labels: Tensor, *, loc: int, alpha: float,
                   tau: float, self_weight: float, distilling: bool, return_parts: bool = False,
                   label_smoothing: float = 0.0) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """The authors' ``loss_fn_kd`` (module docstring) on ``outputs = [final, deepest head, ...]``;
    ``distilling`` is their ``epoch > kd_delay``. Parts (each without its weight): ``ce`` (final
    head), ``kl`` and ``aux_ce`` (teacher -> head ``loc``), ``self_kl`` and ``self_ce`` (final
    head -> deepest head); computed in every epoch, summed into the loss only while distilling.
    ``label_smoothing`` (``optim.label_smoothing``; not in the authors' code) smooths the labels of
    the three CE terms."""
    final, deepest, kd_head = outputs[0], outputs[1], outputs[loc]
    ce = F.cross_entropy(final.float(), labels, label_smoothing=label_smoothing)
    kl = soft_kl(teacher_logits.detach(), kd_head, tau)
    aux_ce = F.cross_entropy(kd_head.float(), labels, label_smoothing=label_smoothing)
    self_kl = soft_kl(final, deepest, tau)
    self_ce = F.cross_entropy(deepest.float(), labels, label_smoothing=label_smoothing)
    distilled = alpha * tau * tau * kl + (1.0 - alpha) * aux_ce + self_weight * self_kl + (1.0 - self_weight) * self_ce
    # before kd_delay the heads still join the graph with weight 0: DDP expects every parameter to get a gradient
    loss = ce + distilled if distilling else ce + 0.0 * distilled
    parts = {"ce": ce, "kl": kl, "aux_ce": aux_ce, "self_kl": self_kl, "self_ce": self_ce}
    return (loss, {k: v.detach() for k, v in parts.items()}) if return_parts else loss


class SepConv(nn.Sequential):
    """BYOT's separable convolution: depthwise 3×3 (``stride``) → 1×1 → BN → ReLU → depthwise 3×3 →
    1×1 to ``c_out`` → BN → ReLU, no biases."""

    def __init__(self, c_in: int, c_out: int, stride: int = 2) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class AuxiliaryHead(nn.Module):
    """BYOT's auxiliary classifier on a stage of ``channels[0]`` channels: attention ⊙ features,
    one :class:`SepConv` per later stage (``channels[i] -> channels[i + 1]`` at ``strides[i]``),
    global average pool, linear."""

    def __init__(self, channels: list[int], strides: list[int], num_classes: int) -> None:
        super().__init__()
        c = channels[0]
        self.attention = nn.Sequential(SepConv(c, c), nn.BatchNorm2d(c), nn.ReLU())
        self.scala = nn.Sequential(*(SepConv(a, b, s) for a, b, s in zip(channels[:-1], channels[1:], strides, strict=True)))
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        attention = torch.sigmoid(F.interpolate(self.attention(x), size=x.shape[-2:], mode="bilinear",
                                                align_corners=False))
        return self.fc(F.adaptive_avg_pool2d(self.scala(attention * x), 1).flatten(1))


def default_stages(backbone: nn.Module) -> list[str]:
    """The top-level ``layer1``, ``layer2``, ... of a ResNet, in order."""
    names = [n for n, _ in backbone.named_children() if re.fullmatch(r"layer\d+", n)]
    return sorted(names, key=lambda n: int(n[5:]))


def _stride(size: int, next_size: int, key: str, name: str) -> int:
    if size == next_size:
        return 1
    if size == 2 * next_size or size == 2 * next_size - 1:
        return 2
    raise UserError(f"{key}: the stage after {name!r} changes the size {size} -> {next_size}; "
                    "the auxiliary heads follow stages that keep or halve it")


class SkepticalStudent(nn.Module):
    """The student with BYOT auxiliary heads on its stages (the deepest and head ``loc``). In
    training mode ``forward`` returns the authors' ``outputs`` list (``[final, deepest head, ...]``,
    ``None`` for a head the loss does not read); in eval mode the main logits alone."""

    def __init__(self, backbone: nn.Module, num_classes: int, image_size: int, stages: list[str] | tuple[str, ...] = (),
                 loc: int = 2, key: str = "distill") -> None:
        super().__init__()
        self.backbone = backbone
        names = list(stages) or default_stages(backbone)
        modules = dict(backbone.named_modules())
        children = ", ".join(n for n, _ in backbone.named_children())
        if len(names) < 2:
            raise UserError(f"{key}.student_stages: the Skeptical Student needs at least two stages of feature maps; "
                            f"this student has no layer1, layer2, ... (top-level modules: {children}); name its stages")
        for name in names:
            if not name or name not in modules:
                raise UserError(f"{key}.student_stages: {name!r} is not a module of the student; "
                                f"top-level modules: {children}")
        self.stages = names
        self.loc = min(loc, len(names) - 1)  # the authors' index into [final, deepest, ..., shallowest]
        shapes = self._dry_shapes(image_size)
        for name in names:
            if len(shapes[name]) != 4:
                raise UserError(f"{key}.student_stages: {name!r} gives {tuple(shapes[name])}; the Skeptical Student's "
                                "heads take (batch, channels, height, width) feature maps")
        channels = [shapes[n][1] for n in names]
        sizes = [shapes[n][2] for n in names]
        strides = [_stride(a, b, f"{key}.student_stages", n) for a, b, n in zip(sizes, sizes[1:], names, strict=False)]
        self.heads = nn.ModuleDict()
        for index in sorted({1, self.loc}):
            stage = len(names) - 1 - index  # index 1 -> the stage before the last
            self.heads[str(index)] = AuxiliaryHead(channels[stage:], strides[stage:], num_classes)
        self._features: dict[str, Tensor] = {}
        self._hooks: list[Any] = []  # a list: not submodules
        self._hooked: list[nn.Module] = []

    def _head_stage(self, index: int) -> str:
        return self.stages[len(self.stages) - 1 - index]

    def _dry_shapes(self, image_size: int) -> dict[str, torch.Size]:
        shapes: dict[str, torch.Size] = {}
        handles = [self.backbone.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: shapes.__setitem__(n, o.shape if isinstance(o, Tensor) else torch.Size()))
            for n in self.stages]
        was_training = self.backbone.training
        try:
            self.backbone.eval()
            with torch.no_grad():
                self.backbone(torch.zeros(2, 3, image_size, image_size))
        finally:
            self.backbone.train(was_training)
            for handle in handles:
                handle.remove()
        return shapes

    def _hook(self) -> None:
        """Hooks on the stages feeding a head (again if a module was replaced since, e.g. by the
        SyncBatchNorm conversion)."""
        wanted = [self.backbone.get_submodule(self._head_stage(int(i))) for i in self.heads]
        if wanted == self._hooked:
            return
        for handle in self._hooks:
            handle.remove()
        self._hooked = wanted
        self._hooks = [module.register_forward_hook(lambda m, i, o, i_=i: self._features.__setitem__(i_, o))
                       for i, module in zip(self.heads, wanted, strict=True)]

    def forward(self, images: Tensor) -> Tensor | list[Tensor | None]:
        self._hook()
        self._features = {}
        main = self.backbone(images)
        features, self._features = self._features, {}
        if not self.training:
            return main
        outputs: list[Tensor | None] = [main] + [None] * (len(self.stages) - 1)
        for index, head in self.heads.items():
            outputs[int(index)] = head(features[index])
        return outputs


def plain_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A skeptical student's state dict as the plain student's: the auxiliary heads dropped."""
    return {k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items() if not k.startswith(HEADS_PREFIX)}


def skeptical_step(model: nn.Module, images: Tensor, labels: Tensor, index: Tensor | None = None, epoch: int = 0,
                   *, teacher: Any, tau: float, alpha: float, self_weight: float, loc: int,
                   kd_delay: int, label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """The skeptical student's step (``epoch`` 0-based: KD from epoch ``kd_delay`` on)."""
    teacher_logits = as_frozen_network(teacher)(images, index, epoch)
    outputs = model(images)
    loc = min(loc, len(outputs) - 1)
    loss, parts = skeptical_loss(outputs, teacher_logits, labels, loc=loc, alpha=alpha, tau=tau,
                                 self_weight=self_weight, distilling=epoch >= kd_delay, return_parts=True,
                                 label_smoothing=label_smoothing)
    return {"loss": loss, "logits": outputs[0], **parts}


@register
class Skeptical(Attack):
    name = "skeptical"
    summary = ("KD into an auxiliary head at half depth; the final head self-distils into the deepest head "
               "(Kundu et al. 2021, as their code)")

    def step(self, recipe: Any, frozen: Any, source: Any = None) -> StepFn:
        d = recipe.distill
        return partial(skeptical_step, teacher=frozen, tau=d.tau, alpha=d.alpha, self_weight=d.self_weight,
                       loc=d.kd_head, kd_delay=d.kd_delay, label_smoothing=recipe.optim.label_smoothing)

    def check(self, recipe: Any, source: str) -> None:
        """The student must have the stages the heads sit on (built once on the CPU, no data read)."""
        super().check(recipe, source)
        from nt_dist.models import build_recipe_model

        student = build_recipe_model(recipe.model, recipe.model.num_classes or 10, source)
        self.wrap_model(student, recipe, recipe.model.num_classes or 10, source)

    def wrap_model(self, model: nn.Module, recipe: Any, num_classes: int, source: str) -> nn.Module:
        return SkepticalStudent(model, num_classes, recipe.data.image_size, recipe.distill.student_stages,
                                recipe.distill.kd_head, key=f"{source}: distill")

    def export_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return plain_state(state)
