"""Hinton KD (``distill.method: kd``; Hinton et al., "Distilling the Knowledge in a Neural
Network", 2015), and what every attack shares (:class:`Attack`)::

    L = α·τ²·KL(σ_τ(f_T(x)) ‖ σ_τ(f_S(x))) + (1 − α)·CE(f_S(x), y)

with α = ``distill.alpha``, τ = ``distill.tau`` (:func:`nt_dist.losses.kd_loss`). The teacher
f_T is frozen and reached through what it releases (``defence``, :mod:`nt_dist.defences`).

Follows ``loss_fn_kd`` of ``train_kd.py`` in VITA-Group/Nasty-Teacher at commit
2f9c444c2246a15f1b276ed5cc0ab1d631a270b5 (``KLDivLoss(batchmean)(log σ_τ(f_S), σ_τ(f_T))·α·τ² +
CE·(1 − α)``). Deviations: (1) the KL is computed in fp32 even under autocast; (2) a teacher
logit of −inf (a Stingy release) contributes 0, as in ``KLDivLoss``, with no NaN in the gradient.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor, nn

from nt_dist.errors import UserError
from nt_dist.frozen_network import step_against
from nt_dist.losses import kd_loss
from nt_dist.objectives.registry import TEACHER, Objective, StepFn, register


def student_step(model: nn.Module, images: Tensor, labels: Tensor, index: Tensor | None = None, epoch: int = 0, *,
                 teacher: Any, tau: float, alpha: float, label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """Hinton KD from the frozen teacher (Hinton et al., 2015)."""
    return step_against(model, images, labels, index, epoch, frozen=teacher, loss=kd_loss, alpha=alpha, tau=tau,
                        label_smoothing=label_smoothing)


class Attack(Objective):
    """A student's way of stealing from a frozen teacher (``run.role: student``)."""

    role = "student"
    sections = ("distill",)
    frozen = TEACHER
    audit_label = ""  # its one column in nt-dist audit; "": the class name

    def param_sections(self, recipe: Any) -> tuple[str, ...]:
        # a defence adds the settings it used
        return super().param_sections(recipe) + ("defence",) * (recipe.defence.name != "none")

    def tags(self, recipe: Any) -> dict[str, str]:
        return {"attack": recipe.distill.method, "defence": recipe.defence.name}

    def step(self, recipe: Any, frozen: Any, source: Any = None) -> StepFn:
        """Hinton KD; attacks that differ only in their data or their network keep it."""
        return partial(student_step, teacher=frozen, tau=recipe.distill.tau, alpha=recipe.distill.alpha,
                       label_smoothing=recipe.optim.label_smoothing)

    def audit_columns(self, plan: Any) -> dict[str, dict[str, Any]]:
        return {self.audit_label or type(self).__name__: {"distill.method": self.name}}


@register
class KD(Attack):
    name = "kd"
    summary = "Hinton KD: α·τ²·KL(σ_τ(f_T) ‖ σ_τ(f_S)) + (1−α)·CE(f_S, y)"

    def audit_columns(self, plan: Any) -> dict[str, dict[str, Any]]:
        """One column per (τ_s, α) of the audit's grid."""
        return {f"KD τ={tau:g} α={alpha:g}": {"distill.method": "kd", "distill.tau": tau, "distill.alpha": alpha}
                for tau in plan.kd_taus for alpha in plan.kd_alphas}


class DataFreeAttack(Attack):
    """An attack that never reads the training split: it trains on images it synthesises from
    the teacher (``datafree.*``); the data set's evaluation split still scores it."""

    sections = ("distill", "datafree")
    data_free = True

    def check(self, recipe: Any, source: str) -> None:
        super().check(recipe, source)
        if recipe.distill.cache_logits:
            raise UserError(f"{source}: distill.cache_logits: a data-free student ({self.name}) never sees an image "
                            "twice")
        if recipe.defence.name == "round":
            raise UserError(f"{source}: defence.name: round has no gradient, and {self.name} backpropagates through "
                            "the teacher; use stingy or noise")
