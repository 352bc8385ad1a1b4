"""Top-k (sparse-logit) KD (``distill.method: topk``): the student distils only the teacher's k most probable classes.

A stealer that distrusts the long tail of a nasty teacher's output (where the self-undermining
term hides its misleading mass) keeps only the k largest softened probabilities, renormalised
to sum to 1, and distils those (used as an attack on nasty teachers in the follow-up literature,
e.g. the sparse-target baselines of Ma et al. 2022, "Stingy Teacher")::

    p^k = top_k(σ_τ(f_T(x))) / Σ top_k(σ_τ(f_T(x)))          (0 outside the top k)
    L   = α·τ²·KL(p^k ‖ σ_τ(f_S(x))) + (1 − α)·CE(f_S(x), y)

Classes outside the top k contribute nothing to the KL (0·log 0 = 0). k = number of classes is
Hinton KD exactly; k = 1 is CE against the teacher's argmax (scaled by α·τ²).

A **variant**: no stealer's code defines it. The renormalised top-k of σ_τ is the softmax of the
top-k logits at τ, so this is the student applying to itself the sparsification the Stingy
Teacher applies to its release (``train_kd_stingy.py`` of HowieMa/stingy-teacher at commit
b6206bf47c5b372c538c0ae655a50e8ee557db67, there with k = int(sparse_ratio × classes)); the audit
runs it at ``--top-k`` (default 2).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nt_dist.frozen_network import step_against
from nt_dist.objectives.kd import Attack
from nt_dist.objectives.registry import StepFn, register


def topk_soft_targets(teacher_logits: Tensor, k: int, tau: float) -> Tensor:
    """``σ_τ(teacher_logits)`` with all but the k largest entries of each row zeroed, renormalised (fp32)."""
    probabilities = torch.softmax(teacher_logits.detach().float() / tau, dim=-1)
    top = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
    kept = torch.zeros_like(probabilities).scatter_(-1, top.indices, top.values)
    return kept / kept.sum(dim=-1, keepdim=True)


def topk_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float, tau: float,
                 k: int, return_parts: bool = False,
                 label_smoothing: float = 0.0) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """``α·τ²·KL(p^k ‖ σ_τ(f_S)) + (1 − α)·CE(f_S, y)``, batch mean; parts ``ce``, ``kl`` (without α·τ²)."""
    targets = topk_soft_targets(teacher_logits, k, tau)
    log_q = F.log_softmax(student_logits.float() / tau, dim=-1)
    kl = (torch.xlogy(targets, targets) - targets * log_q).sum(dim=-1).mean()
    ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    loss = alpha * tau * tau * kl + (1.0 - alpha) * ce
    return (loss, {"ce": ce.detach(), "kl": kl.detach()}) if return_parts else loss


def topk_step(model: nn.Module, images: Tensor, labels: Tensor, index: Tensor | None = None, epoch: int = 0, *,
              teacher: Any, tau: float, alpha: float, k: int, label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """KD on the teacher's top-k softened classes."""
    return step_against(model, images, labels, index, epoch, frozen=teacher, loss=topk_kd_loss, alpha=alpha,
                        tau=tau, k=k, label_smoothing=label_smoothing)


@register
class TopK(Attack):
    name = "topk"
    summary = "KD on the teacher's top-k softened classes, renormalised (distill.top_k)"

    def step(self, recipe: Any, frozen: Any, source: Any = None) -> StepFn:
        d = recipe.distill
        return partial(topk_step, teacher=frozen, tau=d.tau, alpha=d.alpha, k=d.top_k,
                       label_smoothing=recipe.optim.label_smoothing)

    def audit_columns(self, plan: Any) -> dict[str, dict[str, Any]]:
        return {f"top-{plan.top_k} KD": {"distill.method": "topk", "distill.top_k": plan.top_k}}
