"""Teacher-side defences: how a teacher's outputs are released to whoever queries it.

A nasty teacher changes the weights; these change only what leaves the model, so any teacher
checkpoint can be served through them (``defence.name`` of a student's recipe wraps the frozen
teacher it learns from). They are what a protection report compares a nasty teacher with:

``stingy``  Stingy Teacher (Ma et al., "Stingy Teacher: Sparse Logits Suffice to Fail Knowledge
            Distillation", 2022): release the top-k logits of a normal teacher, zero the rest;
            no retraining. The top-1 prediction is unchanged whenever the top logit is positive
            or k covers every class.
``noise``   Gaussian noise of std ``noise_std`` added to the logits (logit perturbation).
``round``   the softmax probabilities rounded to ``decimals`` places, released as their log
            (a probability rounded to 0 is floored at half the last place, so KL stays finite).

Each is a pure function of the logits; :class:`Released` wraps a network with one of them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nt_dist.config import DefenceConfig


def stingy(logits: Tensor, k: int) -> Tensor:
    """The ``k`` largest logits of each row kept, every other logit set to 0."""
    k = min(k, logits.shape[-1])
    kept = logits.topk(k, dim=-1).indices
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, kept, True)
    return torch.where(mask, logits, torch.zeros_like(logits))


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
            return stingy(logits, self.cfg.top_k)
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
