"""Optimizers and learning-rate schedules, taken from torch and timm (nothing hand-written).

Schedules are stepped once per optimizer step, so a run resumed mid-epoch continues on the
exact curve; milestones and warm-up are given in epochs and converted with the number of
steps per epoch.

With ``optim.wd_skip_norm_bias`` the parameters are grouped by timm's
``param_groups_weight_decay`` (no decay on every 1-D parameter, i.e. normalisation weights and
biases, every ``.bias``, and what the model's ``no_weight_decay()`` names, e.g. a ViT's position
embedding and class token). ffcv-imagenet's ``bn_wd: 0`` skips only the BatchNorm parameters (names
containing ``bn``); the classifier's bias is decayed there and not here.

``optim.schedule: linear`` after ``optim.warmup_epochs`` of warm-up from
``optim.warmup_start_factor`` is ffcv-imagenet's ``cyclic`` schedule (``get_cyclic_lr`` of
``train_imagenet.py``, interpolated per iteration there too): lr x 1e-4 at step 0, the peak at
``lr_peak_epoch``, 0 after the last step, straight lines between.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

from nt_dist.config import OptimConfig


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[Any]:
    """The trainable parameters, as one group, or (``wd_skip_norm_bias``) timm's decay / no-decay groups."""
    if not cfg.wd_skip_norm_bias:
        return [p for p in model.parameters() if p.requires_grad]
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = parameter_groups(model, cfg)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def milestones(cfg: OptimConfig, epochs: int) -> list[int]:
    """The epochs at which a step schedule multiplies lr by gamma: ``optim.milestones``
    (multistep), or every ``optim.step_epochs`` (step)."""
    if cfg.schedule == "step":
        return list(range(cfg.step_epochs, epochs, cfg.step_epochs))
    return list(cfg.milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int,
                    steps_per_epoch: int) -> Any:
    """``constant``, ``multistep``/``step`` (x gamma at each milestone epoch), ``cosine`` (to 0 at
    the last step) or ``linear`` (straight to 0 at the last step), after ``warmup_epochs`` of
    linear warm-up from ``warmup_start_factor`` x lr; every one stepped per optimizer step."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule in ("multistep", "step"):
        steps = [m * steps_per_epoch - warmup for m in milestones(cfg, epochs)]
        main: Any = lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=cfg.gamma)
    elif cfg.schedule == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
    elif cfg.schedule == "linear":
        main = lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=total - warmup)
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup <= 0:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=cfg.warmup_start_factor, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
