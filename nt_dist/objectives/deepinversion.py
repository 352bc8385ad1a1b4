"""DeepInversion (``distill.method: deepinversion``; Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion", CVPR 2020), with Adaptive DeepInversion's optional competition term.

Images are synthesised from the frozen teacher alone: a batch x with target classes y starts
as N(0, 1) noise and Adam updates it, each step, to lower::

    L(x) = CE(f_T(x̃), y) + w_bn·Σ_l (‖μ_l(x̃) − μ_l‖₂ + ‖σ²_l(x̃) − σ²_l‖₂)
           + w_tv·TV(x̃) + w_l2·R(x̃) + w_adi·C(f_S(x̃), f_T(x̃))

- x̃, the step's jitter (``datafree.jitter``): ``cifar`` rolls x by (dy, dx), both uniform integers
  in [−2, 2], no flip; ``imagenet`` rolls by integers in [−s, s], s = max(1, round(30·size/224)),
  then flips along the width with probability ½.
- μ_l, σ²_l: the batch mean and biased variance of BatchNorm layer l's input; the right-hand
  terms are its running statistics.
- TV: the sum of the L2 norms of the four neighbour differences (horizontal, vertical, both
  diagonals) of x̃.
- R: ``cifar`` ‖x̃‖₂ over the whole batch (a norm, not squared); ``imagenet`` mean_i ‖x̃_i‖₂.
- C (competition, :func:`competition_loss`): P = σ(f_S(x̃)/3), Q = σ(f_T(x̃)/3), M = (P + Q)/2,
  each then clamped to [0.01, 0.99] (not renormalised); C = 1 − clamp(½·KL(M‖P) + ½·KL(M‖Q), 0, 1),
  KL summed over classes and averaged over the batch. It pushes the images to where teacher and
  student disagree; the student is in eval mode, its parameters untouched, and the gradient
  reaches x through it too.

The student then learns by KD (``distill.tau``, ``distill.alpha``, the target classes as labels)
on the synthesised images. Without the competition term the images are synthesised once, before
the first epoch, and saved beside the checkpoints (``synthetic_rank<r>.safetensors``, keyed by the
teacher and the settings, jitter included), so a resumed run does not synthesise them again; with
it, each epoch's images are synthesised anew against the student as it stands at the epoch's start.

Authors' code (NVlabs/DeepInversion): ``cifar10/deepinversion_cifar10.py`` (commit abafd38e, the
``cifar`` jitter) and the ``DeepInversionClass`` of ``deepinversion.py`` (commit 1585b0ed, the
``imagenet`` jitter). Agreeing with it: the noise start, Adam on the pixels (default betas), the jitter
(roll offsets, flip), the teacher and the student both fed x̃, CE on the teacher's logits, the BN
loss (every BatchNorm2d, biased variance, unscaled L2 norms), TV and the l2 prior on x̃, the
competition term exactly as they compute it, and the weights' roles. Defaults are the CIFAR README's
"paper parameters" command: ``--bs=256 --r_feature_weight=10 --di_lr=0.05`` with the script's
2,000 iterations, TV 2.5e-5, l2 0 and no competition.

Deviations:

1. Randomness (noise, roll offsets, flips) comes from a ``torch.Generator`` seeded per run, rank
   and epoch, not from Python's ``random`` and the global torch RNG: same distributions, other draws.
2. Images kept: the final ones. The CIFAR script keeps ``best_inputs = inputs.data``, a view of the
   same storage, so it returns the final images too; the ImageNet class never updates ``best_cost``,
   so it also keeps the last step's images (given a loss below 1e4).
3. Targets: batch b of rank r holds classes (k + (r·batches + b)·batch_size) mod C, k = 0..batch_size−1.
   The CIFAR script's ``[0..9]*25 + [0..5]`` is the same cycle for the first batch at 10 classes;
   our later batches continue the cycle instead of restarting at class 0 (the ImageNet class uses
   a fixed list of 42 preselected classes).
4. Image size: the data set's (``data.image_size``); the CIFAR script is fixed at 32 px.
5. ``imagenet`` jitter: the authors' 30 px at 224 px scaled to the image size (above). Not reproduced
   from the ImageNet class: the TV L1 term, the first-BN multiplier, the main-loss multiplier, the
   multi-resolution schedule (2k steps at half size, then 1k), the cosine learning rate, the clipping
   of pixels to the valid range after each step, Adam betas (0.5, 0.9), fp16/AMP, and ``detach_student``
   (we never detach, their default).
6. fp32 only; the CIFAR script's optional ``--amp`` (APEX O1) is not reproduced.
7. BN loss: the authors keep each layer's last call only; we sum every call of a layer used twice
   in one forward (the same for the usual networks).
8. Synthesis and training: the CIFAR script synthesises one batch and stops; the pool of
   ``datafree.batches`` batches per rank (seeded, saved for resume), the KD training on it (each
   image flipped left-right with probability ½), and, with the competition term, the per-epoch
   re-synthesis against the current student (ADI's alternation as the paper describes it) are ours.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nt_dist.errors import UserError
from nt_dist.fileio import atomic_save_tensors
from nt_dist.objectives.kd import DataFreeAttack
from nt_dist.objectives.registry import register

Jitter = Literal["cifar", "imagenet"]
JITTERS = ("cifar", "imagenet")
COMPETITION_T = 3.0  # the authors' temperature for the competition term


def bn_statistics_loss(features: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """``‖μ(x) − μ_BN‖₂ + ‖σ²(x) − σ²_BN‖₂`` over a BatchNorm2d input (N, C, H, W), biased variance."""
    x = features.float()
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


def total_variation(images: Tensor) -> Tensor:
    """Sum of the L2 norms of the horizontal, vertical and both diagonal neighbour differences
    (the authors' ``loss_var_l2``); pass the jittered images, as they do."""
    d1 = images[:, :, :, :-1] - images[:, :, :, 1:]
    d2 = images[:, :, :-1, :] - images[:, :, 1:, :]
    d3 = images[:, :, 1:, :-1] - images[:, :, :-1, 1:]
    d4 = images[:, :, :-1, :-1] - images[:, :, 1:, 1:]
    return sum(torch.linalg.vector_norm(d) for d in (d1, d2, d3, d4))  # type: ignore[return-value]


def l2_prior(images: Tensor, jitter: Jitter) -> Tensor:
    """The l2 image prior of the jittered batch: ``cifar`` the L2 norm of the whole batch (not
    squared; ``torch.norm(inputs_jit, 2)``), ``imagenet`` the mean of the per-image L2 norms."""
    if jitter == "cifar":
        return torch.linalg.vector_norm(images)
    return torch.linalg.vector_norm(images.flatten(1), dim=1).mean()


def competition_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = COMPETITION_T) -> Tensor:
    """Adaptive DeepInversion's competition term as the authors compute it: with P = σ(s/T),
    Q = σ(t/T), M = (P + Q)/2, all three clamped to [0.01, 0.99] (not renormalised),
    ``1 − clamp(½·KL(M‖P) + ½·KL(M‖Q), 0, 1)``, KL summed over classes and averaged over the
    batch (``KLDivLoss(reduction="batchmean")``). 1 where they agree, 0 once they differ enough."""
    p = torch.softmax(student_logits.float() / T, dim=1)
    q = torch.softmax(teacher_logits.float() / T, dim=1)
    m = 0.5 * (p + q)
    p, q, m = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99), m.clamp(0.01, 0.99)
    js = 0.5 * F.kl_div(p.log(), m, reduction="batchmean") + 0.5 * F.kl_div(q.log(), m, reduction="batchmean")
    return 1.0 - js.clamp(0.0, 1.0)


class BatchNormProbe:
    """Forward hooks on every BatchNorm2d of the teacher, summing the statistics loss of the
    inputs they see; :meth:`remove` takes the hooks off again."""

    def __init__(self, network: nn.Module, key: str = "distill.teacher_checkpoint") -> None:
        layers = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
        if not layers:
            raise UserError(f"{key}: DeepInversion matches the teacher's BatchNorm statistics, and this teacher has "
                            "no BatchNorm2d layer with running statistics")
        self.losses: list[Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in layers]

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.losses.append(bn_statistics_loss(inputs[0], module.running_mean, module.running_var))  # type: ignore[arg-type]

    def take(self) -> Tensor:
        total = torch.stack(self.losses).sum()
        self.losses = []
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def jitter_shift(image_size: int, jitter: Jitter) -> int:
    """The largest roll offset: 2 px (``cifar``), or the ImageNet class's 30 px at 224 px scaled to
    the image size, at least 1 (``imagenet``)."""
    return 2 if jitter == "cifar" else max(1, round(30 * image_size / 224))


def jitter_images(images: Tensor, generator: torch.Generator, jitter: Jitter) -> Tensor:
    """One step's x̃: ``torch.roll`` by (dy, dx) uniform in [−s, s] over (H, W); ``imagenet`` then
    flips along the width with probability ½. Draws from ``generator`` only."""
    if jitter not in JITTERS:
        raise ValueError(f"jitter: got {jitter!r}; expected one of {', '.join(JITTERS)}")
    s = jitter_shift(images.shape[-1], jitter)
    dy, dx = torch.randint(-s, s + 1, (2,), generator=generator, device=images.device).tolist()
    images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    if jitter == "imagenet" and float(torch.rand((), generator=generator, device=images.device)) > 0.5:
        images = torch.flip(images, dims=(3,))
    return images


def invert_batch(teacher: nn.Module, probe: BatchNormProbe, targets: Tensor, image_size: int, *, steps: int,
                 lr: float, bn_weight: float, tv_weight: float, l2_weight: float, competition_weight: float = 0.0,
                 jitter: Jitter = "cifar", student: Callable[[Tensor], Tensor] | None = None,
                 generator: torch.Generator) -> tuple[Tensor, list[float]]:
    """Synthesise one batch for ``targets``; returns the final images and the loss at each step
    (the module docstring's L, every prior on the jittered images)."""
    device = targets.device
    images = torch.randn(len(targets), 3, image_size, image_size, generator=generator, device=device)
    images.requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=lr)
    history = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        seen = jitter_images(images, generator, jitter)
        logits = teacher(seen)
        loss = F.cross_entropy(logits.float(), targets) + bn_weight * probe.take()
        loss = loss + tv_weight * total_variation(seen) + l2_weight * l2_prior(seen, jitter)
        if competition_weight and student is not None:
            loss = loss + competition_weight * competition_loss(student(seen), logits)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    probe.losses = []
    return images.detach(), history


class InversionSource:
    """The data-free student's training batches: ``batches`` synthesised batches per epoch,
    in a seeded shuffled order, each randomly flipped; labels are the target classes."""

    def __init__(self, teacher: nn.Module, *, num_classes: int, image_size: int, batch_size: int, batches: int,
                 settings: dict[str, Any], seed: int, rank: int, device: torch.device, folder: Path,
                 identity: str, student: Callable[[Tensor], Tensor] | None = None,
                 announce: Callable[[str], None] = print) -> None:
        self.teacher, self.num_classes, self.image_size = teacher, num_classes, image_size
        self.batch_size, self.steps_per_epoch, self.settings = batch_size, batches, settings
        self.seed, self.rank, self.device, self.student, self.announce = seed, rank, device, student, announce
        self.path = folder / f"synthetic_rank{rank}.safetensors"
        self.identity = json.dumps({"teacher": identity, "settings": settings, "seed": seed, "batches": batches,
                                    "batch_size": batch_size, "image_size": image_size}, sort_keys=True)
        self.images: Tensor | None = None
        self.labels: Tensor | None = None
        self.made_for = -1  # the epoch whose images are held (-1: the fixed pool)

    def synthesise(self, epoch: int) -> None:
        """The pool of ``batches`` batches (targets cycle through the classes), for ``epoch``
        under the competition term, else once (loaded from the run folder when it is there)."""
        adaptive = bool(self.settings["competition_weight"]) and self.student is not None
        if self.images is not None and (not adaptive or self.made_for == epoch):
            return
        if not adaptive and self._load():
            return
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.rank * 7919 + epoch)
        probe = BatchNormProbe(self.teacher)
        images, labels = [], []
        try:
            for b in range(self.steps_per_epoch):
                offset = (self.rank * self.steps_per_epoch + b) * self.batch_size
                targets = (torch.arange(self.batch_size, device=self.device) + offset) % self.num_classes
                batch, history = invert_batch(self.teacher, probe, targets, self.image_size, generator=generator,
                                              student=self.student if adaptive else None, **self.settings)
                images.append(batch)
                labels.append(targets)
                self.announce(f"DeepInversion: batch {b + 1}/{self.steps_per_epoch} synthesised "
                              f"(loss {history[0]:.3f} -> {history[-1]:.3f})")
        finally:
            probe.remove()
        self.images, self.labels, self.made_for = torch.stack(images), torch.stack(labels), epoch if adaptive else -1
        if not adaptive:
            atomic_save_tensors({"images": self.images.cpu(), "labels": self.labels.cpu()}, self.path,
                                {"key": self.identity})

    def _load(self) -> bool:
        from safetensors import SafetensorError, safe_open

        if not self.path.is_file():
            return False
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                if (handle.metadata() or {}).get("key") != self.identity:
                    return False
                self.images = handle.get_tensor("images").to(self.device)
                self.labels = handle.get_tensor("labels").to(self.device)
        except (SafetensorError, OSError):
            return False
        return True

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        self.synthesise(epoch)
        assert self.images is not None and self.labels is not None
        order = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(self.steps_per_epoch, generator=order).tolist()
        flips = torch.rand(self.steps_per_epoch, self.batch_size, generator=order) < 0.5
        for step in range(start_step, self.steps_per_epoch):
            batch = permutation[step]
            images = self.images[batch]
            flip = flips[step].to(self.device)[:, None, None, None]
            yield torch.where(flip, images.flip(3), images), self.labels[batch]


def eval_logits(student: nn.Module, images: Tensor) -> Tensor:
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
    return out[0] if isinstance(out, (tuple, list)) else out


@register
class DeepInversion(DataFreeAttack):
    name = "deepinversion"
    summary = "data-free: images synthesised from the teacher's BatchNorm statistics (Yin et al., CVPR 2020)"

    def train_source(self, recipe: Any, teacher: nn.Module, *, num_classes: int, device: torch.device, rank: int,
                     identity: str, student: nn.Module, main: bool) -> InversionSource:
        cfg = recipe.datafree
        settings = {"steps": cfg.inversion_steps, "lr": cfg.inversion_lr, "bn_weight": cfg.bn_weight,
                    "tv_weight": cfg.tv_weight, "l2_weight": cfg.l2_weight,
                    "competition_weight": cfg.competition_weight, "jitter": cfg.jitter}
        name = recipe.run.name
        return InversionSource(teacher, num_classes=num_classes, image_size=recipe.data.image_size,
                               batch_size=cfg.batch_size, batches=cfg.batches, settings=settings,
                               seed=recipe.run.seed, rank=rank, device=device, folder=Path(recipe.run.output_dir),
                               identity=identity, student=partial(eval_logits, student),
                               announce=(lambda text: print(f"[{name}] {text}", flush=True)) if main
                               else (lambda text: None))

    def audit_columns(self, plan: Any) -> dict[str, dict[str, Any]]:
        return {"DeepInversion": {"distill.method": "deepinversion", "distill.alpha": 1.0}}
