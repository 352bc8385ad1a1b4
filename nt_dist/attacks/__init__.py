"""Attacks: the ways a student steals from a teacher, as student roles (``distill.method``).

========== ======================================================= =============================
method     what the student does                                   where
========== ======================================================= =============================
kd         Hinton KD: ``α·τ²·KL(σ_τ(f_T) ‖ σ_τ(f_S)) + (1−α)·CE``  :func:`nt_dist.losses.kd_loss`
topk       KD on the teacher's top-k softened classes, renormalised :mod:`.sparse_kd`
skeptical  KD into an auxiliary head on a shallow layer; the main  :mod:`.skeptical`
           head self-distils from it (Kundu et al., NeurIPS 2021)
dafl       data-free: a generator trained against the teacher      :mod:`.dafl`
           (Chen et al., ICCV 2019), KD on its images
deepinversion data-free: images synthesised from the teacher's     :mod:`.deepinversion`
           BatchNorm statistics (Yin et al., CVPR 2020), KD on them
========== ======================================================= =============================

Every attack works against any teacher checkpoint (any architecture, any data set), through
any teacher-side defence (:mod:`nt_dist.defences`). This module builds the pieces the training
loop needs: the step function, the student network (the skeptical student's auxiliary head),
and the data-free training source.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nt_dist.attacks.dafl import GeneratorSource
from nt_dist.attacks.deepinversion import InversionSource
from nt_dist.attacks.skeptical import SkepticalStudent, plain_state, skeptical_loss
from nt_dist.attacks.sparse_kd import topk_kd_loss
from nt_dist.config import DATA_FREE_METHODS, Recipe

DATA_FREE = DATA_FREE_METHODS


def topk_step(model: nn.Module, images: Tensor, labels: Tensor, index: Tensor | None = None, epoch: int = 0, *,
              teacher: Any, tau: float, alpha: float, k: int) -> dict[str, Tensor]:
    """KD on the teacher's top-k softened classes (:mod:`.sparse_kd`)."""
    teacher_logits = teacher(images, index, epoch)
    logits = model(images)
    loss, parts = topk_kd_loss(logits, teacher_logits, labels, alpha, tau, k, return_parts=True)
    return {"loss": loss, "logits": logits, **parts}


def skeptical_step(model: nn.Module, images: Tensor, labels: Tensor, index: Tensor | None = None, epoch: int = 0,
                   *, teacher: Any, tau: float, alpha: float, beta: float) -> dict[str, Tensor]:
    """The skeptical student's step (:mod:`.skeptical`): the model returns (main, auxiliary) logits."""
    teacher_logits = teacher(images, index, epoch)
    logits, aux = model(images)
    loss, parts = skeptical_loss(logits, aux, teacher_logits, labels, alpha, tau, beta, return_parts=True)
    return {"loss": loss, "logits": logits, **parts}


def student_step_for(recipe: Recipe, teacher: Any, kd_step: Any) -> Any:
    """The step function of ``recipe``'s attack; ``kd_step`` is Hinton KD (used by kd and the data-free attacks)."""
    d = recipe.distill
    if d.method == "topk":
        return partial(topk_step, teacher=teacher, tau=d.tau, alpha=d.alpha, k=d.top_k)
    if d.method == "skeptical":
        return partial(skeptical_step, teacher=teacher, tau=d.tau, alpha=d.alpha, beta=d.self_weight)
    return partial(kd_step, teacher=teacher, tau=d.tau, alpha=d.alpha)


def with_source_parts(step: Any, source: Any) -> Any:
    """``step`` whose outputs also carry the data-free source's last losses (DAFL's generator:
    ``generator_oh``, ``generator_act``, ``generator_ie``), so they are logged per epoch."""
    def step_with_parts(*args: Any, **kwargs: Any) -> dict[str, Tensor]:
        out = step(*args, **kwargs)
        return {**out, **{f"generator_{k}": v for k, v in getattr(source, "last", {}).items()}}

    return step_with_parts


def student_model(model: nn.Module, recipe: Recipe, num_classes: int, source: str) -> nn.Module:
    """The network being trained: the skeptical student carries its auxiliary head."""
    if recipe.run.role == "student" and recipe.distill.method == "skeptical":
        return SkepticalStudent(model, num_classes, recipe.data.image_size, recipe.distill.aux_layer,
                                key=f"{source}: distill.aux_layer")
    return model


def exported_state(recipe: Recipe, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """What ``model.safetensors`` holds: the plain student (no auxiliary head)."""
    if recipe.run.role == "student" and recipe.distill.method == "skeptical":
        return plain_state(state)
    return state


def data_free_source(recipe: Recipe, teacher: nn.Module, num_classes: int, device: torch.device, rank: int,
                     identity: str, student: nn.Module | None = None, main: bool = True) -> Any:
    """The synthetic training split of a data-free attack (None for the others). ``teacher`` is
    the frozen network itself (gradients flow through it to the images, not into it)."""
    method = recipe.distill.method if recipe.run.role == "student" else ""
    cfg, seed = recipe.datafree, recipe.run.seed * 1009 + rank
    if method == "dafl":
        return GeneratorSource(teacher, latent_dim=cfg.latent_dim, image_size=recipe.data.image_size,
                               batch_size=cfg.batch_size, steps_per_epoch=cfg.steps_per_epoch, lr=cfg.generator_lr,
                               weights=(cfg.onehot_weight, cfg.activation_weight, cfg.entropy_weight), seed=seed,
                               device=device)
    if method == "deepinversion":
        settings = {"steps": cfg.inversion_steps, "lr": cfg.inversion_lr, "bn_weight": cfg.bn_weight,
                    "tv_weight": cfg.tv_weight, "l2_weight": cfg.l2_weight,
                    "competition_weight": cfg.competition_weight}
        judge = None if student is None else partial(_eval_logits, student)
        return InversionSource(teacher, num_classes=num_classes, image_size=recipe.data.image_size,
                               batch_size=cfg.batch_size, batches=cfg.batches, settings=settings,
                               seed=recipe.run.seed, rank=rank, device=device, folder=Path(recipe.run.output_dir),
                               identity=identity, student=judge,
                               announce=(lambda text: print(f"[{recipe.run.name}] {text}", flush=True)) if main
                               else (lambda text: None))
    return None


def _eval_logits(student: nn.Module, images: Tensor) -> Tensor:
    """The student's logits in eval mode (ADI's competition term), its parameters untouched."""
    was_training = student.training
    flags = [p.requires_grad for p in student.parameters()]
    student.eval()
    try:
        for p in student.parameters():
            p.requires_grad_(False)
        out = student(images)
    finally:
        for p, flag in zip(student.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        student.train(was_training)
    return out[0] if isinstance(out, tuple) else out
