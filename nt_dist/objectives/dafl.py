"""DAFL (``distill.method: dafl``): data-free learning of student networks (Chen et al., ICCV 2019).

The frozen teacher acts as a fixed discriminator. A generator G(z) learns to produce images the
teacher answers as it answers real ones; the student learns by KD on G's images, alternately,
every step. With ``t = f_T(G(z))`` and ``a`` the teacher's features before its classifier::

    L_oh = CE(t, argmax t)                           one-hot: confident answers
    L_a  = −mean |a|                                  activation: strong features
    L_ie = Σ_c p̄_c·log10 p̄_c,  p̄ = mean_batch σ(t)    information entropy: balanced classes
    L_G  = w_oh·L_oh + w_a·L_a + w_ie·L_ie
    L_S  = α·τ²·KL(σ_τ(t) ‖ σ_τ(f_S(G(z)))) + (1 − α)·CE(f_S(G(z)), argmax t)

The authors' code (``DAFL/DAFL-train.py`` of huawei-noah/Data-Efficient-Model-Compression,
now in huawei-noah/Efficient-Computing at commit 132e841b985fdebbff326ecfab7902b4f15dc5bb) is followed:
its generator (with its ``BatchNorm2d(.., 0.8)``, i.e. eps = 0.8), ``log10`` in L_ie, Adam for G,
and the student trained on the same images G made before its update. Their CIFAR command:
``--n_epochs 2000 --batch_size 1024 --lr_G 0.02 --lr_S 0.1 --latent_dim 1000 --oh 0.05 --ie 5
--a 0.01`` with KD at τ = 1 and α = 1 (``recipes/paper/*/student_dafl.yaml``).

:class:`GeneratorSource` is the student's training split: each batch it yields is made by G
after G's own step, labelled with the teacher's argmax. Each process trains its own generator
from its own noise stream; its weights, Adam state and noise stream are checkpointed.

Deviations: (1) one generator per process, each on its share of the batch (theirs: one generator
under ``DataParallel``); (2) the student's KD is :func:`~nt_dist.losses.kd_loss` at the recipe's τ
and α (theirs ``kdloss`` is τ = 1, α = 1, the defaults of ``recipes/paper``); (3) the student's
learning-rate schedule is the recipe's (theirs ×0.1 at epochs 800 and 1600 of 2000); (4) the model
kept is the last epoch's (theirs saves the student of best *test* accuracy); (5) a class of
p̄_c = 0 (only a Stingy release makes one) adds 0 to L_ie and to its gradient, where theirs is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nt_dist.errors import UserError
from nt_dist.objectives.kd import DataFreeAttack
from nt_dist.objectives.registry import StepFn, register


class Generator(nn.Module):
    """DAFL's generator: ``z -> Linear -> 128 x s/4 x s/4 -> BN -> up x2 -> conv 128 -> BN ->
    LeakyReLU -> up x2 -> conv 64 -> BN -> LeakyReLU -> conv C -> tanh -> BN(affine=False)``."""

    def __init__(self, latent_dim: int, image_size: int, channels: int = 3) -> None:
        super().__init__()
        self.init_size = image_size // 4
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(128)
        self.conv1 = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128, 0.8),
                                   nn.LeakyReLU(0.2, inplace=True))
        self.conv2 = nn.Sequential(nn.Conv2d(128, 64, 3, padding=1), nn.BatchNorm2d(64, 0.8),
                                   nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(64, channels, 3, padding=1),
                                   nn.Tanh(), nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: Tensor) -> Tensor:
        x = self.bn0(self.l1(z).view(z.shape[0], 128, self.init_size, self.init_size))
        x = self.conv1(F.interpolate(x, scale_factor=2))
        return self.conv2(F.interpolate(x, scale_factor=2))


def dafl_generator_loss(teacher_logits: Tensor, teacher_features: Tensor, onehot_weight: float,
                        activation_weight: float, entropy_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """``L_G`` of the module docstring and its parts ``oh``, ``act``, ``ie`` (unweighted)."""
    logits = teacher_logits.float()
    oh = F.cross_entropy(logits, logits.argmax(dim=1))
    act = -teacher_features.float().abs().mean()
    mean_p = torch.softmax(logits, dim=1).mean(dim=0)
    # log10 as the authors. A class no image of the batch can reach (p̄_c = 0: a Stingy release's −inf)
    # adds 0, and 0 to the gradient: xlogy's derivative there, log 0 + 1, would make it NaN
    reached = mean_p > 0
    ie = torch.where(reached, mean_p * torch.log(torch.where(reached, mean_p, 1.0)), 0.0).sum() / math.log(10)
    loss = onehot_weight * oh + activation_weight * act + entropy_weight * ie
    return loss, {"oh": oh.detach(), "act": act.detach(), "ie": ie.detach()}


def classifier_input(network: nn.Module, key: str) -> tuple[nn.Module, list[Tensor]]:
    """The network's last ``nn.Linear`` (its classifier) and a list that a forward pre-hook
    fills with that layer's input (the features DAFL's activation loss reads)."""
    linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{key}: DAFL reads the features entering the teacher's classifier, and this teacher "
                        "has no nn.Linear layer")
    seen: list[Tensor] = []
    linears[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    return linears[-1], seen


class GeneratorSource:
    """The data-free student's training batches: G's images, made after G's step against the
    frozen ``teacher`` (the network with its gradients off, in eval mode)."""

    def __init__(self, teacher: nn.Module, *, latent_dim: int, image_size: int, batch_size: int,
                 steps_per_epoch: int, lr: float, weights: tuple[float, float, float], seed: int,
                 device: torch.device, key: str = "distill.teacher_checkpoint") -> None:
        if image_size % 4:
            raise UserError(f"data.image_size: DAFL's generator upsamples by 4, so the image size must be a "
                            f"multiple of 4 (got {image_size})")
        self.teacher, self.weights = teacher, weights
        self.steps_per_epoch, self.batch_size, self.latent_dim = steps_per_epoch, batch_size, latent_dim
        self.device = device
        with torch.random.fork_rng(devices=[]):  # G's initial weights: a function of the seed, nothing else moved
            torch.manual_seed(seed)
            self.generator = Generator(latent_dim, image_size).to(device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=lr)
        self.noise = torch.Generator(device=device).manual_seed(seed)
        _, self._features = classifier_input(teacher, key)
        self.last: dict[str, Tensor] = {}

    def step(self) -> tuple[Tensor, Tensor]:
        """One generator update; returns the images it made before the update and their labels."""
        self.generator.train()
        z = torch.randn(self.batch_size, self.latent_dim, generator=self.noise, device=self.device)
        images = self.generator(z)
        self._features.clear()
        logits = self.teacher(images)
        loss, self.last = dafl_generator_loss(logits, self._features[-1], *self.weights)
        self._features.clear()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return images.detach(), logits.detach().argmax(dim=1)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        for _ in range(start_step, self.steps_per_epoch):
            yield self.step()

    def state_dict(self) -> dict[str, object]:
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "noise": self.noise.get_state()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.generator.load_state_dict(state["generator"])  # type: ignore[arg-type]
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        self.noise.set_state(state["noise"])  # type: ignore[arg-type]


def with_source_parts(step: Any, source: Any) -> Any:
    """``step`` whose outputs also carry the generator's last losses (``generator_oh``,
    ``generator_act``, ``generator_ie``), so they are logged per epoch."""
    def step_with_parts(*args: Any, **kwargs: Any) -> dict[str, Tensor]:
        out = step(*args, **kwargs)
        return {**out, **{f"generator_{k}": v for k, v in getattr(source, "last", {}).items()}}

    return step_with_parts


@register
class DAFL(DataFreeAttack):
    name = "dafl"
    summary = "data-free: a generator trained against the teacher (Chen et al., ICCV 2019), KD on its images"

    def step(self, recipe: Any, frozen: Any, source: Any = None) -> StepFn:
        return with_source_parts(super().step(recipe, frozen), source)

    def train_source(self, recipe: Any, teacher: nn.Module, *, num_classes: int, device: torch.device, rank: int,
                     identity: str, student: nn.Module, main: bool) -> GeneratorSource:
        cfg = recipe.datafree
        return GeneratorSource(teacher, latent_dim=cfg.latent_dim, image_size=recipe.data.image_size,
                               batch_size=cfg.batch_size, steps_per_epoch=cfg.steps_per_epoch, lr=cfg.generator_lr,
                               weights=(cfg.onehot_weight, cfg.activation_weight, cfg.entropy_weight),
                               seed=recipe.run.seed * 1009 + rank, device=device)

    def audit_columns(self, plan: Any) -> dict[str, dict[str, Any]]:
        """DAFL's own student loss: KL at τ = 1, no labels."""
        return {"DAFL": {"distill.method": "dafl", "distill.tau": 1.0, "distill.alpha": 1.0}}
