"""Scoring a network on an evaluation split: one function for the training loop (every epoch,
every process) and the audit (a released teacher, one process)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def evaluate(model: nn.Module, split: Any, accelerator: Any = None,
             prepare: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """Top-1/top-5 (percent) and CE of ``model`` (in eval mode) over ``split``
    (:class:`~nt_dist.data.EvalSource`). With ``accelerator``, each rank scores a disjoint,
    unpadded shard under the run's autocast and the sums are all-reduced, so every sample counts
    exactly once; ``prepare`` casts or re-lays each batch as the training step's inputs."""
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters(), torch.empty(0)).device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, ce, count
    with torch.inference_mode():
        for images, labels in split.batches():
            if prepare is not None:
                images = prepare(images)
            with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
                logits = model(images)
            logits = logits.float()
            k = min(5, logits.shape[1])
            hit = logits.topk(k, dim=1).indices.eq(labels[:, None])
            totals += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(),
                                   F.cross_entropy(logits, labels, reduction="sum"),
                                   torch.tensor(labels.shape[0], device=logits.device)]).double()
    if accelerator is not None:
        totals = accelerator.reduce(totals.clone(), reduction="sum")
    top1, top5, ce, count = totals.tolist()
    if int(count) != len(split):
        raise RuntimeError(f"evaluation counted {int(count)} samples, expected {len(split)}")
    return {"test_top1": 100.0 * top1 / count, "test_top5": 100.0 * top5 / count, "test_ce": ce / count}
