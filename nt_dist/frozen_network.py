"""The frozen network: the adversary of a nasty teacher, the teacher of a student.

Built from its checkpoint by :func:`load_frozen_network` (the recipe section that names it is
the objective's :class:`~nt_dist.objectives.registry.FrozenRole`), and called through
:class:`FrozenNetwork`, which serves its logits, from :class:`LogitCache` where it can.

A naive nasty-teacher step runs a full forward of the frozen network on every batch: about
+28 % over a normal step for a ResNet-18 on CPU. The network never changes, so its logits are a
pure function of the input image. When the augmentation repeats (``data.augment_views: K``:
every sample cycles through K fixed augmented views; or ``data.augment: none``), each
(sample, view) pair is computed once and served from :class:`LogitCache` afterwards: after
the first K epochs a step costs what a normal step costs. The trade-off is the augmentation
diversity (K views per sample instead of a fresh one every epoch), measured in
``benchmarks/RESULTS.md``; the loss computed for a given image is unchanged. The cache is
saved beside the checkpoints (``train.save_checkpoint``), so a preempted run does not pay for
its views again.

Without repeating views, the forward itself can be made cheaper: ``precision="bf16"`` runs
it under bf16 autocast while the trained network stays in its own precision (1.9x faster on a
CPU with AVX512-BF16; on GPUs a bf16 run already autocasts it). The KL is still computed in
fp32 from the upcast logits; what the rounding costs is measured in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from nt_dist import checkpoint
from nt_dist.defences import release
from nt_dist.errors import warn
from nt_dist.fileio import atomic_save_tensors, file_sha256
from nt_dist.models import build_model

if TYPE_CHECKING:
    from nt_dist.config import Recipe
    from nt_dist.objectives.registry import FrozenRole

# run: whatever the training step uses (run.precision's autocast); fp32: always full
# precision; bf16: bf16 autocast for the frozen forward only
FrozenPrecision = Literal["run", "fp32", "bf16"]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (CUDA Ampere+, or a CPU with AVX512-BF16
    or AMX). Elsewhere bf16 is emulated and slower than fp32 (~60x on an AVX2 CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def frozen_logits(network: nn.Module, images: Tensor, precision: FrozenPrecision = "run") -> Tensor:
    """Logits of a frozen network: eval mode, inference mode, no autograd graph. The copy
    turns the inference tensor into one autograd may save for the loss's backward; logits
    computed under a ``precision`` of their own come back in fp32."""
    if precision == "fp32":
        images = images.float()
    # "run" leaves the caller's autocast alone; fp32 switches it off; bf16 switches it on
    own = torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), (contextlib.nullcontext() if precision == "run" else own):
        logits = network(images)
    return logits.clone() if precision == "run" else logits.to(torch.float32, copy=True)


class LogitCache:
    """Dense ``[samples, views, classes]`` store of fp32 logits with a filled mask.

    Memory: ``samples x views x classes x 4`` bytes on the training device (CIFAR-10, 20 views:
    40 MB; Tiny-ImageNet, 20 views: 1.6 GB), and as much on disk beside the checkpoints.
    ``key`` names everything the logits depend on (the frozen weights' hash, the data and its
    augmentation, the seed, the precision): a saved cache is loaded only under the same key,
    so a resumed run does not recompute the views it already has, and a stale one is never used.
    """

    def __init__(self, samples: int, views: int, classes: int, device: torch.device, key: str = "") -> None:
        self.views, self.key = views, key
        self.logits = torch.zeros(samples, views, classes, dtype=torch.float32, device=device)
        self.filled = torch.zeros(samples, views, dtype=torch.bool, device=device)
        self.count = 0
        self.saved = 0  # count at the last save
        self.capacity = samples * views

    def save(self, path: Path) -> None:
        atomic_save_tensors({"logits": self.logits.cpu(), "filled": self.filled.cpu()}, path, {"key": self.key})

    def save_if_grown(self, path: Path, accelerator: Any) -> None:
        """Save when it has grown since it was last saved; every rank holds the same,
        all-gathered cache, so the main process writes it."""
        if self.count <= self.saved:
            return
        if accelerator.is_main_process:
            self.save(path)
        self.saved = self.count
        accelerator.wait_for_everyone()

    def load(self, path: Path) -> str:
        """Fill from ``path``; returns "" on success, else why the file was not used."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("key") != self.key:
                    return "made for other frozen weights, data, seed or precision"
                logits, filled = handle.get_tensor("logits"), handle.get_tensor("filled")
        except (SafetensorError, OSError) as exc:
            return f"unreadable ({exc})"
        if logits.shape != self.logits.shape or filled.shape != self.filled.shape:
            return f"shape {tuple(logits.shape)}, expected {tuple(self.logits.shape)}"
        self.logits.copy_(logits)
        self.filled.copy_(filled)
        self.count = self.saved = int(filled.sum().item())
        return ""

    @property
    def complete(self) -> bool:
        return self.count >= self.capacity

    def lookup(self, index: Tensor, view: Tensor) -> tuple[Tensor, Tensor]:
        return self.filled[index, view], self.logits[index, view]

    def store(self, index: Tensor, view: Tensor, logits: Tensor) -> None:
        fresh = ~self.filled[index, view]
        self.count += int(fresh.sum().item())  # duplicates in one batch cannot occur: one view per epoch
        self.logits[index, view] = logits.float()
        self.filled[index, view] = True


class FrozenNetwork:
    """Callable ``(images, index, epoch) -> logits`` over the frozen network and its cache.

    Under several processes, each rank shares what it computed with the others (one
    all-gather of the batch's indices and logits per step, only while the cache fills), so a
    sample computed on rank 0 in epoch 0 is a hit on rank 1 in epoch K.
    """

    def __init__(self, network: nn.Module, cache: LogitCache | None = None, accelerator: Any = None,
                 precision: FrozenPrecision = "run") -> None:
        self.network, self.cache, self.accelerator, self.precision = network, cache, accelerator, precision
        self.hits = 0
        self.misses = 0

    def __call__(self, images: Tensor, index: Tensor | None = None, epoch: int = 0) -> Tensor:
        if self.cache is None or index is None:
            return frozen_logits(self.network, images, self.precision)
        view = torch.full_like(index, epoch % self.cache.views)
        filling = not self.cache.complete
        hit, cached = self.cache.lookup(index, view)
        logits = cached.clone()
        miss = ~hit
        n_miss = int(miss.sum().item())
        if n_miss:
            logits[miss] = frozen_logits(self.network, images[miss], self.precision).float()
        self.misses += n_miss
        self.hits += len(index) - n_miss
        if filling:
            self._share_and_store(index, view, logits)
        return logits

    def _share_and_store(self, index: Tensor, view: Tensor, logits: Tensor) -> None:
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:
            index, view, logits = acc.gather(index), acc.gather(view), acc.gather(logits)
        self.cache.store(index, view, logits)


def as_frozen_network(network: Any) -> Any:
    """A plain module as a :class:`FrozenNetwork` (callers that hand a step function a bare
    network, e.g. benchmarks); anything else is returned as it is."""
    return FrozenNetwork(network) if isinstance(network, nn.Module) else network


def step_against(model: nn.Module, images: Tensor, labels: Tensor, index: Tensor | None, epoch: int, *,
                 frozen: Any, loss: Any, **settings: Any) -> dict[str, Tensor]:
    """A training step that learns against the frozen network: its logits of the batch, the
    model's, and ``loss(logits, frozen_logits, labels, **settings, return_parts=True)``."""
    target = as_frozen_network(frozen)(images, index, epoch)
    logits = model(images)
    value, parts = loss(logits, target, labels, **settings, return_parts=True)
    return {"loss": value, "logits": logits, **parts}


def load_frozen_network(recipe: Recipe, role: FrozenRole, num_classes: int, accelerator: Any, train_size: int,
                        dtype: torch.dtype | None = None) -> tuple[FrozenNetwork, dict[str, str]]:
    """The frozen network ``role`` names in ``recipe``, on the training device, as released
    (through ``defence.*`` when ``role.released``), with its logit cache when the recipe asks
    for one; and its lineage tags (``<kind>_checkpoint``, ``<kind>_run_name``, ...)."""
    key, path = role.checkpoint_key, role.checkpoint(recipe)
    network, meta = checkpoint.load_frozen_model(role.architecture(recipe), path, num_classes, key,
                                                 lambda name, classes, **options: build_model(name, classes, role.architecture_key,
                                                                                       **options),
                                                 hint=f"; name it in the recipe ({role.architecture_key})")
    precision = role.precision(recipe)
    network = network.to(device=accelerator.device, dtype=None if precision == "fp32" else dtype)
    if recipe.model.channels_last:
        network = network.to(memory_format=torch.channels_last)
    if role.released:  # what the teacher releases: its logits, or a defence's rewrite of them
        network = release(network, recipe.defence, recipe.run.seed)
    if precision == "bf16" and not native_bf16(accelerator.device) and accelerator.is_main_process:
        warn(f"{role.section}.{role.kind}_precision: bf16 has no hardware support on this "
             f"{accelerator.device.type} and runs slower than fp32 here; use run or fp32")
    cache = None
    if role.cache_logits(recipe):
        views = recipe.data.augment_views or 1  # augment: none -> one view
        cache = LogitCache(train_size, views, num_classes, accelerator.device, cache_key(recipe, role, precision, dtype))
    lineage = {f"{role.kind}_checkpoint": str(Path(path).resolve()),
               f"{role.kind}_architecture": meta.get("architecture", role.architecture(recipe)),
               **{f"{role.kind}_{field}": meta.get(f"mlflow_{field}", "")
                  for field in ("run_id", "run_name", "experiment", "experiment_id")}}
    return FrozenNetwork(network, cache, accelerator, precision), lineage


def cache_key(recipe: Recipe, role: FrozenRole, precision: str, dtype: torch.dtype | None) -> str:
    """Everything a frozen network's logits of (sample, view) depend on, as one JSON string."""
    frozen_sha256 = file_sha256(checkpoint.resolve_model_file(role.checkpoint(recipe), role.checkpoint_key))
    data = recipe.data
    return json.dumps({"frozen_sha256": frozen_sha256, "precision": precision, "dtype": str(dtype),
                       "run_precision": recipe.run.precision,
                       "seed": recipe.run.seed, "data": data.name, "root": str(Path(data.root).resolve()) if data.root else "",
                       "image_size": data.image_size, "augment": data.augment, "views": data.augment_views,
                       "train_subset": data.train_subset,
                       # a defence rewrites what is cached (keys of undefended runs stay as they were)
                       **({"defence": dataclasses.asdict(recipe.defence)}
                          if role.released and recipe.defence.name != "none" else {})},
                      sort_keys=True)


def restore_cache(cache: LogitCache, path: Path, main: bool) -> None:
    """Fill ``cache`` from a resumed run's file, when it was made for the same key."""
    if not path.is_file():
        return
    problem = cache.load(path)
    if main:
        if problem:
            warn(f"{path}: not used, {problem}; the logits are computed again")
        else:
            print(f"loaded {cache.count} of {cache.capacity} cached frozen logits from {path}", flush=True)
