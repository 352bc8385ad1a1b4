"""The nasty teacher (``run.role: nasty``; Ma et al., "Undistillable: Making a Nasty Teacher
that Cannot Teach Students", ICLR 2021): self-undermining KD against a frozen adversary f_A::

    L = CE(f_T(x), y) − ω·τ²·KL(σ_τ(f_T(x)) ‖ σ_τ(f_A(x)))

with ω = ``nasty.omega``, τ = ``nasty.tau`` (:func:`nt_dist.losses.nasty_teacher_loss`); only
f_T's weights move.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor, nn

from nt_dist.frozen_network import step_against
from nt_dist.losses import nasty_teacher_loss
from nt_dist.objectives.registry import ADVERSARY, Objective, StepFn, register


def nasty_step(model: nn.Module, images: Tensor, labels: Tensor, index: Tensor | None = None, epoch: int = 0, *,
               adversary: Any, tau: float, omega: float, label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """Self-undermining KD against the frozen adversary (Ma et al., 2021)."""
    return step_against(model, images, labels, index, epoch, frozen=adversary, loss=nasty_teacher_loss,
                        omega=omega, tau=tau, label_smoothing=label_smoothing)


@register
class Nasty(Objective):
    name = role = "nasty"
    summary = "a nasty teacher: CE(f_T, y) − ω·τ²·KL(σ_τ(f_T) ‖ σ_τ(f_A)), f_A frozen"
    sections = ("nasty",)
    frozen = ADVERSARY

    def step(self, recipe: Any, frozen: Any, source: Any = None) -> StepFn:
        return partial(nasty_step, adversary=frozen, tau=recipe.nasty.tau, omega=recipe.nasty.omega,
                       label_smoothing=recipe.optim.label_smoothing)
