"""Teacher-side defences: how a teacher's outputs are released to whoever queries it.

A nasty teacher changes the weights; these change only what leaves the model, so any teacher
checkpoint can be served through them (``defence.name`` of a student's recipe wraps the frozen
teacher it learns from). They are what a protection report compares a nasty teacher with:

``stingy``  Stingy Teacher (Ma et al., "Stingy Teacher: Sparse Logits Suffice to Fail Knowledge
            Distillation", 2022): release the top-k logits of a normal teacher and set every other
            logit to −inf, so the softened distribution a student sees has exactly k non-zero
            probabilities; the top-1 prediction is unchanged by construction; no retraining.
            k = int(``top_k_ratio`` × classes) (the authors' ``sparse_ratio``: 0.2 on CIFAR-10,
            0.1 on CIFAR-100 and Tiny-ImageNet, the defaults below and from 100 classes) or an
            absolute ``top_k``. Follows ``train_kd_stingy.py`` of HowieMa/stingy-teacher at commit
            b6206bf47c5b372c538c0ae655a50e8ee557db67 (its ``loss_fn_kd_stingy``; the ImageNet script
            does the same). Deviations: (1) the sparse logits are what the teacher *releases*, so
            they reach every attack, not only the KD loss their script builds them in; (2) k is at
            least 1 (their ``int(ratio × classes)`` can be 0 below 5 classes at ratio 0.2); (3) ties
            at the k-th logit are broken by ``torch.topk`` as theirs, but on our device.
``noise``   Gaussian noise of std ``noise_std`` added to the logits (logit perturbation).
``round``   the softmax probabilities rounded to ``decimals`` places, released as their log
            (a probability rounded to 0 is floored at half the last place, so KL stays finite).

Each is a pure function of the logits; :class:`Released` wraps a network with one of them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nt_dist.config import DefenceConfig

AUTHORS_RATIO = {10: 0.2, 100: 0.1}  # Stingy's sparse_ratio in its CIFAR-10 / CIFAR-100 configs


def stingy_k(cfg: DefenceConfig, classes: int) -> int:
    """The logits Stingy keeps: ``top_k`` when set, else ``int(ratio × classes)`` with the ratio
    ``top_k_ratio`` or, when that is 0, the authors' (0.2 below 100 classes, 0.1 from 100); at
    least 1, at most ``classes``."""
    if cfg.top_k:
        return min(cfg.top_k, classes)
    ratio = cfg.top_k_ratio or (AUTHORS_RATIO[10] if classes < 100 else AUTHORS_RATIO[100])
    return max(1, min(classes, int(ratio * classes)))


def stingy(logits: Tensor, k: int) -> Tensor:
    """The ``k`` largest logits of each row kept, every other logit set to −inf."""
    k = min(k, logits.shape[-1])
    values, kept = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, kept, values)


def noisy(logits: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    """``logits + std·ε``, ε ~ N(0, 1) drawn from ``generator``."""
    noise = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    return logits + std * noise.to(logits.dtype)


def rounded(logits: Tensor, decimals: int) -> Tensor:
    """``log(round(softmax(logits), decimals))``, each probability floored at ``0.5·10^-decimals``."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    step = 10.0 ** -decimals
    return torch.log(torch.clamp(torch.round(probabilities / step) * step, min=step / 2))


class Released(nn.Module):
    """``network`` as its outputs are released under ``cfg`` (a frozen teacher: eval mode,
    no trained parameters of its own). The noise comes from a generator seeded with ``seed``,
    so a run is reproducible and its noise does not move any other random stream."""

    def __init__(self, network: nn.Module, cfg: DefenceConfig, seed: int = 0) -> None:
        super().__init__()
        self.network, self.cfg, self.seed = network, cfg, seed
        self._generator: torch.Generator | None = None

    def forward(self, images: Tensor) -> Tensor:
        logits = self.network(images)
        name = self.cfg.name
        if name == "stingy":
            return stingy(logits, stingy_k(self.cfg, logits.shape[-1]))
        if name == "noise":
            if self._generator is None or self._generator.device != logits.device:
                self._generator = torch.Generator(device=logits.device).manual_seed(self.seed)
            return noisy(logits, self.cfg.noise_std, self._generator)
        if name == "round":
            return rounded(logits, self.cfg.decimals)
        return logits


def release(network: nn.Module, cfg: DefenceConfig, seed: int = 0) -> nn.Module:
    """``network`` itself without a defence, else wrapped in :class:`Released`."""
    return network if cfg.name == "none" else Released(network, cfg, seed)
