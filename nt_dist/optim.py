"""Optimizers and learning-rate schedules, taken from torch (nothing hand-written).

Schedules are stepped once per optimizer step, so a run resumed mid-epoch continues on the
exact curve; milestones and warm-up are given in epochs and converted with the number of
steps per epoch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

from nt_dist.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int,
                    steps_per_epoch: int) -> Any:
    """``constant``, ``multistep`` (×gamma at each milestone epoch) or ``cosine`` (to 0 at the
    last step), optionally after ``warmup_epochs`` of linear warm-up from lr/100."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "multistep":
        milestones = [m * steps_per_epoch - warmup for m in cfg.milestones]
        main: Any = lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)
    elif cfg.schedule == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup <= 0:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
