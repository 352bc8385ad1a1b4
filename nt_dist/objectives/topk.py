"""Top-k (sparse-logit) KD: the student distils only the teacher's k most probable classes.

A stealer that distrusts the long tail of a nasty teacher's output (where the self-undermining
term hides its misleading mass) keeps only the k largest softened probabilities, renormalised
to sum to 1, and distils those (used as an attack on nasty teachers in the follow-up literature,
e.g. the sparse-target baselines of Ma et al. 2022, "Stingy Teacher")::

    p^k = top_k(σ_τ(f_T(x))) / Σ top_k(σ_τ(f_T(x)))          (0 outside the top k)
    L   = α·τ²·KL(p^k ‖ σ_τ(f_S(x))) + (1 − α)·CE(f_S(x), y)

Classes outside the top k contribute nothing to the KL (0·log 0 = 0). k = number of classes is
Hinton KD exactly; k = 1 is CE against the teacher's argmax (scaled by α·τ²).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_soft_targets(teacher_logits: Tensor, k: int, tau: float) -> Tensor:
    """``σ_τ(teacher_logits)`` with all but the k largest entries of each row zeroed, renormalised (fp32)."""
    probabilities = torch.softmax(teacher_logits.detach().float() / tau, dim=-1)
    top = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
    kept = torch.zeros_like(probabilities).scatter_(-1, top.indices, top.values)
    return kept / kept.sum(dim=-1, keepdim=True)


def topk_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float, tau: float,
                 k: int, return_parts: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """``α·τ²·KL(p^k ‖ σ_τ(f_S)) + (1 − α)·CE(f_S, y)``, batch mean; parts ``ce``, ``kl`` (without α·τ²)."""
    targets = topk_soft_targets(teacher_logits, k, tau)
    log_q = F.log_softmax(student_logits.float() / tau, dim=-1)
    kl = (torch.xlogy(targets, targets) - targets * log_q).sum(dim=-1).mean()
    ce = F.cross_entropy(student_logits.float(), labels)
    loss = alpha * tau * tau * kl + (1.0 - alpha) * ce
    return (loss, {"ce": ce.detach(), "kl": kl.detach()}) if return_parts else loss
