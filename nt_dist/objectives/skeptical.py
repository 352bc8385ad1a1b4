"""The Skeptical Student (``distill.method: skeptical``; Kundu et al., "Analyzing the Confidentiality of Undistillable Teachers
in Knowledge Distillation", NeurIPS 2021).

A nasty teacher's misleading dark knowledge does most harm where it shapes the student's final
classifier. The skeptical student therefore takes the teacher's soft labels into an *auxiliary
head* on an intermediate part of its own network (a pooled linear classifier on the output of
``distill.aux_layer``; by default the middle one of its top-level modules: ``layer2`` of the
CIFAR ResNets, ``bn3`` of cifar_cnn, the hidden layer of the MLP), and trains its main head on the labels plus a self-distillation from that
auxiliary head, never from the teacher directly::

    L_aux  = α·τ²·KL(σ_τ(f_T(x)) ‖ σ_τ(h_aux(x))) + (1 − α)·CE(h_aux(x), y)
    L_main = CE(f_S(x), y) + β·τ²·KL(σ_τ(h_aux(x)) ‖ σ_τ(f_S(x)))     (h_aux detached here)
    L      = L_main + L_aux

β is ``distill.self_weight``. This is the paper's central mechanism (teacher knowledge through a
shallow auxiliary branch, self-distillation to the final head); its further refinements (the
auxiliary branch's exact design per network, its schedule of temperatures) are not reproduced.
The auxiliary head exists only while training: the exported model is the plain student.
"""

from __future__ import annotations

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

AUX_PREFIX = "aux_head."
BACKBONE_PREFIX = "backbone."


def skeptical_loss(main_logits: Tensor, aux_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                   alpha: float, tau: float, beta: float,
                   return_parts: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """``L_main + L_aux`` (module docstring); parts ``ce`` (main head), ``kl`` (teacher → aux,
    without α·τ²), ``aux_ce`` and ``self_kl`` (aux → main, without β·τ²)."""
    aux_ce = F.cross_entropy(aux_logits.float(), labels)
    kl = soft_kl(teacher_logits.detach(), aux_logits, tau)
    ce = F.cross_entropy(main_logits.float(), labels)
    self_kl = soft_kl(aux_logits.detach(), main_logits, tau)
    loss = ce + beta * tau * tau * self_kl + alpha * tau * tau * kl + (1.0 - alpha) * aux_ce
    parts = {"ce": ce.detach(), "kl": kl.detach(), "aux_ce": aux_ce.detach(), "self_kl": self_kl.detach()}
    return (loss, parts) if return_parts else loss


def _layer(backbone: nn.Module, name: str, key: str) -> tuple[str, nn.Module]:
    children = [n for n, _ in backbone.named_children()]
    if not name:  # the middle of the top-level modules (the classifier is the last one)
        if len(children) < 2:
            raise UserError(f"{key}: the student has fewer than two top-level modules; name one with {key}")
        name = children[(len(children) - 1) // 2]
    modules = dict(backbone.named_modules())
    if name not in modules or not name:
        raise UserError(f"{key}: {name!r} is not a module of the student; top-level modules: {', '.join(children)}")
    return name, modules[name]


class SkepticalStudent(nn.Module):
    """The student with an auxiliary classifier on the output of its module ``layer``. In
    training mode ``forward`` returns ``(main logits, auxiliary logits)``; in eval mode the
    main logits alone, as the plain student would."""

    def __init__(self, backbone: nn.Module, num_classes: int, image_size: int, layer: str = "",
                 key: str = "distill.aux_layer") -> None:
        super().__init__()
        self.backbone = backbone
        self.layer, module = _layer(backbone, layer, key)
        self._features: Tensor | None = None
        self._hooked: list[Any] = [module, module.register_forward_hook(self._keep)]  # a list: not a submodule
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            backbone(torch.zeros(2, 3, image_size, image_size))
        backbone.train(was_training)
        shape = self._features.shape if self._features is not None else None
        self._features = None
        if shape is None or len(shape) not in (2, 4):
            raise UserError(f"{key}: {self.layer!r} gives {tuple(shape) if shape else 'no tensor'}; the auxiliary "
                            "head takes a (batch, features) or (batch, channels, height, width) output")
        pool: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if len(shape) == 4 else []
        self.aux_head = nn.Sequential(nn.ReLU(), *pool, nn.Linear(shape[1], num_classes))

    def _keep(self, module: nn.Module, inputs: object, output: Tensor) -> None:
        self._features = output

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        module = self.backbone.get_submodule(self.layer)
        if module is not self._hooked[0]:  # replaced since (SyncBatchNorm conversion): hook its successor
            self._hooked[1].remove()
            self._hooked[:] = [module, module.register_forward_hook(self._keep)]
        main = self.backbone(images)
        features, self._features = self._features, None
        if not self.training:
            return main
        assert features is not None
        return main, self.aux_head(features)


def plain_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A skeptical student's state dict as the plain student's: the auxiliary head dropped."""
    return {k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items() if not k.startswith(AUX_PREFIX)}


def skeptical_step(model: nn.Module, images: Tensor, labels: Tensor, index: Tensor | None = None, epoch: int = 0,
                   *, teacher: Any, tau: float, alpha: float, beta: float) -> dict[str, Tensor]:
    """The skeptical student's step: the model returns (main, auxiliary) logits."""
    teacher_logits = as_frozen_network(teacher)(images, index, epoch)
    logits, aux = model(images)
    loss, parts = skeptical_loss(logits, aux, teacher_logits, labels, alpha, tau, beta, return_parts=True)
    return {"loss": loss, "logits": logits, **parts}


@register
class Skeptical(Attack):
    name = "skeptical"
    summary = "KD into an auxiliary head on a shallow layer; the main head self-distils (Kundu et al. 2021)"

    def step(self, recipe: Any, frozen: Any, source: Any = None) -> StepFn:
        d = recipe.distill
        return partial(skeptical_step, teacher=frozen, tau=d.tau, alpha=d.alpha, beta=d.self_weight)

    def wrap_model(self, model: nn.Module, recipe: Any, num_classes: int, source: str) -> nn.Module:
        return SkepticalStudent(model, num_classes, recipe.data.image_size, recipe.distill.aux_layer,
                                key=f"{source}: distill.aux_layer")

    def export_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return plain_state(state)
