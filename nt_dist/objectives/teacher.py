"""Normal training: a normal teacher (``run.role: teacher``) or a student trained alone
(``run.role: baseline``), both with cross-entropy ``CE(f(x), y)``."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from nt_dist.objectives.registry import Objective, StepFn, register


def ce_step(model: nn.Module, images: Tensor, labels: Tensor, index: Tensor | None = None,
            epoch: int = 0, *, label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """Normal training (teacher, baseline student): ``CE(f(x), y)``, labels smoothed by
    ``label_smoothing`` (``optim.label_smoothing``)."""
    logits = model(images)
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    return {"loss": ce, "logits": logits, "ce": ce.detach()}


@register
class Teacher(Objective):
    name = role = "teacher"
    summary = "a normal teacher: CE(f(x), y)"

    def step(self, recipe: Any, frozen: Any, source: Any = None) -> StepFn:
        return partial(ce_step, label_smoothing=recipe.optim.label_smoothing)


@register
class Baseline(Teacher):
    name = role = "baseline"
    summary = "a student trained alone (no teacher): CE(f(x), y)"
