"""Losses of the nasty-teacher method, as pure functions of tensors.

Every KL here is ``KL(P ‖ Q) = Σ_c P_c (log P_c − log Q_c)`` with the *first* argument the
distribution being matched, summed over classes and averaged over the batch (PyTorch's
``batchmean``), computed in float32 even under autocast: at τ = 20 the softened
probabilities of 200 classes differ in the fourth decimal and bf16 rounds that away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_kl(p_logits: Tensor, q_logits: Tensor, tau: float) -> Tensor:
    """``KL(σ_τ(p_logits) ‖ σ_τ(q_logits))``, batch mean, in fp32 (no τ² factor).

    A −inf logit in ``p_logits`` (a Stingy teacher's release) is a class of probability 0 and
    contributes 0 (0·log 0 = 0, as PyTorch's ``KLDivLoss`` takes it), with no NaN in the gradient.
    """
    log_p = F.log_softmax(p_logits.float() / tau, dim=-1)
    log_q = F.log_softmax(q_logits.float() / tau, dim=-1)
    p = log_p.exp()
    log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))  # 0·log 0 = 0, and no −inf in the graph
    return (p * (log_p - log_q)).sum(dim=-1).mean()


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: float,
    tau: float,
    return_parts: bool = False,
    label_smoothing: float = 0.0,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Hinton knowledge distillation (Hinton, Vinyals & Dean, 2015).

    ``L = α·τ²·KL(σ_τ(f_T(x)) ‖ σ_τ(f_S(x))) + (1 − α)·CE(f_S(x), y)``

    ``teacher_logits`` is detached: no gradient ever reaches the teacher. The τ² factor keeps
    the soft-target gradients on the scale of the hard-label ones as τ grows. With
    ``return_parts`` the result is ``(loss, {"ce": ..., "kl": ...})`` (``kl`` without α·τ²).
    ``label_smoothing`` smooths the labels of the CE term only (the teacher's soft targets are
    what they are).
    """
    ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    kl = soft_kl(teacher_logits.detach(), student_logits, tau)
    loss = alpha * tau * tau * kl + (1.0 - alpha) * ce
    return (loss, {"ce": ce.detach(), "kl": kl.detach()}) if return_parts else loss


def nasty_teacher_loss(
    teacher_logits: Tensor,
    adversary_logits: Tensor,
    labels: Tensor,
    omega: float,
    tau: float,
    return_parts: bool = False,
    label_smoothing: float = 0.0,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Self-undermining knowledge distillation (Ma et al., "Undistillable: Making a Nasty
    Teacher that Cannot Teach Students", ICLR 2021, Eq. 2).

    ``L = CE(f_T(x), y) − ω·τ_A²·KL(σ_τA(f_T(x)) ‖ σ_τA(f_A(x)))``

    The teacher keeps its top-1 through the CE term while *maximising* the divergence of its
    softened outputs from the frozen adversary ``f_A`` (usually the normal teacher), which
    makes its dark knowledge misleading to any student. ``adversary_logits`` is detached: only
    the teacher's weights move. The authors' code (``train_nasty.py``) computes the same
    direction: ``KLDivLoss(batchmean)(log σ(f_A/T), σ(f_T/T))``. Parts: ``ce``, ``kl``.
    ``label_smoothing`` smooths the labels of the CE term only; the KL against the adversary is
    unchanged.
    """
    ce = F.cross_entropy(teacher_logits.float(), labels, label_smoothing=label_smoothing)
    kl = soft_kl(teacher_logits, adversary_logits.detach(), tau)
    loss = ce - omega * tau * tau * kl
    return (loss, {"ce": ce.detach(), "kl": kl.detach()}) if return_parts else loss
