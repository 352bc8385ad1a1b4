"""DeepInversion (``distill.method: deepinversion``; Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion", CVPR 2020).

Images are synthesised from the frozen teacher alone: starting from noise, a batch x with
target classes y is optimised (Adam) so the teacher classifies it as y while the statistics of
every BatchNorm layer's input match the running statistics the teacher stored in training::

    L(x) = CE(f_T(x̃), y) + w_bn·Σ_l (‖μ_l(x̃) − μ_l‖₂ + ‖σ²_l(x̃) − σ²_l‖₂)
           + w_tv·TV(x) + w_l2·‖x‖² + w_adi·(1 − JS(σ(f_T(x̃)) ‖ σ(f_S(x̃))))

x̃ is x randomly shifted (up to 2 px) and flipped each step (the authors' jitter); TV is the sum
of the L2 norms of the four neighbour differences (their ``get_image_prior_losses``). The last
term, Adaptive DeepInversion's competition, is optional (``datafree.competition_weight``): it
pushes the images to where teacher and student disagree. The student then learns by KD
(``distill.tau``, ``distill.alpha``, the target classes as labels) on the synthesised images.

Defaults follow the authors' CIFAR-10 script (Adam lr 0.05, 2,000 steps, BN weight 10, TV
2.5e-5). Without the competition term the images are synthesised once, before the first epoch,
and saved beside the checkpoints (``synthetic_rank<r>.safetensors``, keyed by the teacher and
the settings), so a resumed run does not synthesise them again; with it, each epoch's images are
synthesised anew against the student as it stands at the epoch's start.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nt_dist.errors import UserError
from nt_dist.fileio import atomic_save_tensors
from nt_dist.objectives.kd import DataFreeAttack
from nt_dist.objectives.registry import register


def bn_statistics_loss(features: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """``‖μ(x) − μ_BN‖₂ + ‖σ²(x) − σ²_BN‖₂`` over a BatchNorm2d input (N, C, H, W), biased variance."""
    x = features.float()
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


def total_variation(images: Tensor) -> Tensor:
    """Sum of the L2 norms of the horizontal, vertical and both diagonal neighbour differences."""
    d1 = images[:, :, :, :-1] - images[:, :, :, 1:]
    d2 = images[:, :, :-1, :] - images[:, :, 1:, :]
    d3 = images[:, :, 1:, :-1] - images[:, :, :-1, 1:]
    d4 = images[:, :, :-1, :-1] - images[:, :, 1:, 1:]
    return sum(torch.linalg.vector_norm(d) for d in (d1, d2, d3, d4))  # type: ignore[return-value]


def js_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Jensen-Shannon divergence of σ(p) and σ(q) (natural log, batch mean; 0 ≤ JS ≤ ln 2)."""
    p, q = torch.softmax(p_logits.float(), dim=1), torch.softmax(q_logits.float(), dim=1)
    m = (p + q) / 2
    kl = lambda a: (torch.xlogy(a, a) - torch.xlogy(a, m)).sum(dim=1)  # noqa: E731
    return (0.5 * (kl(p) + kl(q))).mean()


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


def _jitter(images: Tensor, generator: torch.Generator) -> Tensor:
    dx, dy, flip = torch.randint(-2, 3, (3,), generator=generator, device=images.device).tolist()
    images = torch.roll(images, shifts=(dx, dy), dims=(2, 3))
    return images.flip(3) if flip > 0 else images


def invert_batch(teacher: nn.Module, probe: BatchNormProbe, targets: Tensor, image_size: int, *, steps: int,
                 lr: float, bn_weight: float, tv_weight: float, l2_weight: float, competition_weight: float = 0.0,
                 student: Callable[[Tensor], Tensor] | None = None, generator: torch.Generator) -> tuple[Tensor, list[float]]:
    """Synthesise one batch for ``targets``; returns the images and the loss at each step."""
    device = targets.device
    images = torch.randn(len(targets), 3, image_size, image_size, generator=generator, device=device)
    images.requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=lr)
    history = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        seen = _jitter(images, generator)
        logits = teacher(seen)
        loss = F.cross_entropy(logits.float(), targets) + bn_weight * probe.take()
        loss = loss + tv_weight * total_variation(images) + l2_weight * images.pow(2).sum()
        if competition_weight and student is not None:
            loss = loss + competition_weight * (1.0 - js_divergence(logits, student(seen)))
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    probe.losses = []
    return images.detach(), history


class InversionSource:
    """The data-free student's training batches: ``batches`` synthesised batches per epoch,
    in a seeded shuffled order, each randomly flipped; labels are the target classes."""

    def __init__(self, teacher: nn.Module, *, num_classes: int, image_size: int, batch_size: int, batches: int,
                 settings: dict[str, float], seed: int, rank: int, device: torch.device, folder: Path,
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
    return out[0] if isinstance(out, tuple) else out


@register
class DeepInversion(DataFreeAttack):
    name = "deepinversion"
    summary = "data-free: images synthesised from the teacher's BatchNorm statistics (Yin et al., CVPR 2020)"

    def train_source(self, recipe: Any, teacher: nn.Module, *, num_classes: int, device: torch.device, rank: int,
                     identity: str, student: nn.Module, main: bool) -> InversionSource:
        cfg = recipe.datafree
        settings = {"steps": cfg.inversion_steps, "lr": cfg.inversion_lr, "bn_weight": cfg.bn_weight,
                    "tv_weight": cfg.tv_weight, "l2_weight": cfg.l2_weight,
                    "competition_weight": cfg.competition_weight}
        name = recipe.run.name
        return InversionSource(teacher, num_classes=num_classes, image_size=recipe.data.image_size,
                               batch_size=cfg.batch_size, batches=cfg.batches, settings=settings,
                               seed=recipe.run.seed, rank=rank, device=device, folder=Path(recipe.run.output_dir),
                               identity=identity, student=partial(eval_logits, student),
                               announce=(lambda text: print(f"[{name}] {text}", flush=True)) if main
                               else (lambda text: None))

    def audit_columns(self, plan: Any) -> dict[str, dict[str, Any]]:
        return {"DeepInversion": {"distill.method": "deepinversion", "distill.alpha": 1.0}}
