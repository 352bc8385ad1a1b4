"""The training loop: one step function per role, one epoch function, one run function.

Launch it as ``accelerate launch [options] -m nt_dist.train RECIPE.yaml [--set k=v ...]``
(any number of processes; gloo on CPU, NCCL on GPU) or ``nt-dist train RECIPE`` (one process).

Roles (``run.role``):
  teacher, baseline  ``CE(f(x), y)``
  nasty              ``CE(f_T(x), y) − ω·τ²·KL(σ_τ(f_T(x)) ‖ σ_τ(f_A(x)))``, f_A frozen
  student            ``α·τ²·KL(σ_τ(f_T(x)) ‖ σ_τ(f_S(x))) + (1−α)·CE(f_S(x), y)``, f_T frozen, or
                     another attack (``distill.method``, :mod:`nt_dist.attacks`) through the
                     teacher's released outputs (``defence``, :mod:`nt_dist.defences`)
The frozen network is never handed to ``accelerator.prepare`` (no DDP wrapper, no gradient
sync, no optimizer state): it runs in eval mode under ``torch.inference_mode``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nt_dist import __version__, attacks, checkpoint, preflight, rundir
from nt_dist.checkpoint import TrainState
from nt_dist.config import Recipe, load_recipe
from nt_dist.data import DataBundle, build_data, data_inputs
from nt_dist.defences import release
from nt_dist.errors import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_RUN_ERROR,
    EXIT_USER_ERROR,
    Preempted,
    RunError,
    UserError,
    warn,
)
from nt_dist.frozen import FrozenNetwork, LogitCache, native_bf16
from nt_dist.losses import kd_loss, nasty_teacher_loss
from nt_dist.models import UnknownModelError, create_model
from nt_dist.optim import build_optimizer, build_scheduler
from nt_dist.ranks import Preemption, agree, claim_folder, launched, on_every_rank, report
from nt_dist.tracking import Tracker, experiment_of, run_params, run_tags, tracking_uri

StepFn = Callable[..., dict[str, Tensor]]  # (model, images, labels, index=None, epoch=0) -> outputs
Frozen = Callable[..., Tensor]  # (images, index=None, epoch=0) -> logits: a FrozenNetwork or a module


# ============================================================================ step functions


def ce_step(model: nn.Module, images: Tensor, labels: Tensor, index: Tensor | None = None,
            epoch: int = 0) -> dict[str, Tensor]:
    """Normal training (teacher, baseline student): ``CE(f(x), y)``."""
    logits = model(images)
    ce = F.cross_entropy(logits.float(), labels)
    return {"loss": ce, "logits": logits, "ce": ce.detach()}


def _frozen(network: Frozen) -> FrozenNetwork:
    return FrozenNetwork(network) if isinstance(network, nn.Module) else network


def nasty_step(model: nn.Module, images: Tensor, labels: Tensor, index: Tensor | None = None, epoch: int = 0, *,
               adversary: Frozen, tau: float, omega: float) -> dict[str, Tensor]:
    """Self-undermining KD against the frozen adversary (Ma et al., 2021)."""
    adversary_logits = _frozen(adversary)(images, index, epoch)
    logits = model(images)
    loss, parts = nasty_teacher_loss(logits, adversary_logits, labels, omega, tau, return_parts=True)
    return {"loss": loss, "logits": logits, **parts}


def student_step(model: nn.Module, images: Tensor, labels: Tensor, index: Tensor | None = None, epoch: int = 0, *,
                 teacher: Frozen, tau: float, alpha: float) -> dict[str, Tensor]:
    """Hinton KD from the frozen teacher (Hinton et al., 2015)."""
    teacher_logits = _frozen(teacher)(images, index, epoch)
    logits = model(images)
    loss, parts = kd_loss(logits, teacher_logits, labels, alpha, tau, return_parts=True)
    return {"loss": loss, "logits": logits, **parts}


# ============================================================================ run context


@dataclass
class Run:
    """What the epoch function needs; built once by :func:`setup`."""

    recipe: Recipe
    accelerator: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: DataBundle
    step_fn: StepFn
    tracker: Tracker
    state: TrainState
    output_dir: Path
    lineage: dict[str, str] = field(default_factory=dict)
    input_dtype: torch.dtype | None = None  # DeepSpeed bf16/fp16 engines take low-precision inputs
    preempt: Preemption | None = None
    frozen: FrozenNetwork | None = None  # nasty/student roles: the adversary/teacher and its cache
    lock: rundir.RunLock | None = None  # the run folder's lock (main process)
    token: str = ""  # the main process's pid, on every rank: unique temporary names


class NonFiniteLoss(RunError):
    pass


def build_accelerator(recipe: Recipe, source: str = "<recipe>") -> Any:
    """Accelerate decides the process layout (from ``accelerate launch``); the recipe decides
    the precision. Without CUDA, processes talk over gloo: through accelerate's MULTI_CPU
    path (``cpu=True``), or, under DeepSpeed (which ``cpu=True`` would switch off), by naming
    the backend."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    # accelerate keeps one process-wide state: forget the previous run's precision when several
    # recipes train in one process (the quickstart; library use). The process group stays.
    AcceleratorState._reset_state()
    precision = recipe.run.precision
    cuda = torch.cuda.is_available()
    if precision == "fp16" and not cuda:
        raise UserError(f"{source}: run.precision: fp16 needs a GPU; use bf16 or no on CPU")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise UserError("accelerate config: distributed_type FSDP is not supported: under FSDP each rank keeps "
                        "its own BatchNorm running statistics (DDP and ZeRO broadcast them) and accelerate runs "
                        "FSDP on GPUs only; shard with cluster/deepspeed_zero3.yaml instead")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not cuda:  # DeepSpeed finds the CPU itself, but says so on stdout ("Setting accelerator to CPU")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = {"backend": "gloo"} if deepspeed and not cuda else {}
    handlers = [InitProcessGroupKwargs(timeout=timedelta(minutes=10), **backend)]
    return Accelerator(cpu=not cuda and not deepspeed, mixed_precision=precision,
                       kwargs_handlers=handlers, step_scheduler_with_optimizer=False)


def make_model(name: str, num_classes: int, key: str = "model.name") -> nn.Module:
    try:
        return create_model(name, num_classes=num_classes)
    except UnknownModelError as exc:
        raise UserError(f"{key}: {exc}") from None


def build_frozen(recipe: Recipe, num_classes: int, accelerator: Any, train_size: int,
                 dtype: torch.dtype | None = None) -> tuple[StepFn, dict[str, str], FrozenNetwork | None]:
    """The role's step function, with its frozen network loaded (and its logit cache when
    the recipe asks for one), lineage tags, and the frozen network (None for CE roles)."""
    role = recipe.run.role
    if role in ("teacher", "baseline"):
        return ce_step, {}, None
    if role == "nasty":
        cfg, key, kind = recipe.nasty, "nasty.adversary_checkpoint", "adversary"
        name, path = cfg.adversary, cfg.adversary_checkpoint
    else:
        cfg, key, kind = recipe.distill, "distill.teacher_checkpoint", "teacher"
        name, path = cfg.teacher, cfg.teacher_checkpoint
    network, meta = checkpoint.load_frozen_model(
        name, path, num_classes, key, partial(make_model, key=key.replace("_checkpoint", "")))
    precision = cfg.adversary_precision if role == "nasty" else cfg.teacher_precision
    network = network.to(device=accelerator.device, dtype=None if precision == "fp32" else dtype)
    if recipe.model.channels_last:
        network = network.to(memory_format=torch.channels_last)
    if role == "student":  # what the teacher releases: its logits, or a defence's rewrite of them
        network = release(network, recipe.defence, recipe.run.seed)
    if precision == "bf16" and not native_bf16(accelerator.device) and accelerator.is_main_process:
        warn(f"{key.split('.')[0]}.{kind}_precision: bf16 has no hardware support on this "
             f"{accelerator.device.type} and runs slower than fp32 here; use run or fp32")
    cache = None
    if cfg.cache_logits:
        views = recipe.data.augment_views or 1  # augment: none -> one view
        identity = cache_key(recipe, checkpoint.resolve_model_file(path, key), precision, dtype)
        cache = LogitCache(train_size, views, num_classes, accelerator.device, identity)
    frozen = FrozenNetwork(network, cache, accelerator, precision)
    lineage = {f"{kind}_checkpoint": str(Path(path).resolve()),
               f"{kind}_architecture": meta.get("architecture", name),
               f"{kind}_run_id": meta.get("mlflow_run_id", ""),
               f"{kind}_run_name": meta.get("mlflow_run_name", ""),
               f"{kind}_experiment": meta.get("mlflow_experiment", ""),
               f"{kind}_experiment_id": meta.get("mlflow_experiment_id", "")}
    if role == "nasty":
        step = partial(nasty_step, adversary=frozen, tau=recipe.nasty.tau, omega=recipe.nasty.omega)
    else:
        lineage.update(attack=recipe.distill.method, defence=recipe.defence.name)
        step = attacks.student_step_for(recipe, frozen, student_step)
    return step, lineage, frozen


def cache_key(recipe: Recipe, model_file: Path, precision: str, dtype: torch.dtype | None) -> str:
    """Everything a frozen network's logits of (sample, view) depend on, as one JSON string."""
    import hashlib

    digest = hashlib.sha256()
    with model_file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    data = recipe.data
    return json.dumps({"frozen_sha256": digest.hexdigest(), "precision": precision, "dtype": str(dtype),
                       "run_precision": recipe.run.precision,
                       "seed": recipe.run.seed, "data": data.name, "root": str(Path(data.root).resolve()) if data.root else "",
                       "image_size": data.image_size, "augment": data.augment, "views": data.augment_views,
                       "train_subset": data.train_subset,
                       # a defence rewrites what is cached (keys of undefended runs stay as they were)
                       **({"defence": dataclasses.asdict(recipe.defence)}
                          if recipe.run.role == "student" and recipe.defence.name != "none" else {})},
                      sort_keys=True)


def _fill_deepspeed_config(accelerator: Any, recipe: Recipe) -> None:
    """Under DeepSpeed, "auto" entries of the JSON come from the recipe (we feed data
    ourselves, so accelerate cannot read the micro-batch size off a DataLoader)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = recipe.data.batch_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = recipe.optim.grad_clip
    if config.get("train_batch_size") == "auto":
        config["train_batch_size"] = recipe.data.batch_size * accelerator.num_processes


def input_dtype(accelerator: Any) -> torch.dtype | None:
    """DeepSpeed's bf16/fp16 engines hold low-precision weights and do not autocast: their
    inputs (and the frozen network beside them) must be cast. None: leave inputs as they are."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    config = plugin.deepspeed_config
    if config.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return None


def _unwrapped(run: Run) -> nn.Module:
    """The model without its DDP wrapper. ``accelerator.unwrap_model`` would import DeepSpeed
    (1.2 s, and a warning on stdout) whenever it is installed, used or not; it is called only
    under DeepSpeed."""
    if under_deepspeed(run.accelerator):
        return run.accelerator.unwrap_model(run.model)
    from torch.nn.parallel import DistributedDataParallel

    inner = getattr(run.model, "_orig_mod", run.model)  # torch.compile's wrapper
    return inner.module if isinstance(inner, DistributedDataParallel) else run.model


def under_deepspeed(accelerator: Any) -> bool:
    """The model goes to a DeepSpeed engine. Its parameters then stay contiguous (NCHW) under
    ``model.channels_last``: the engine's _broadcast_model views each parameter as bytes, which
    fails on channels-last weights ("self.stride(-1) must be 1 to view BFloat16 as Byte"), and
    ZeRO-1/2 re-point parameters into a flat NCHW buffer anyway. Inputs stay channels-last
    (_prepare_inputs): cuDNN and oneDNN pick the NHWC kernel when the input or the weight is
    channels-last, so activations stay NHWC."""
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def setup(recipe: Recipe, source: str) -> Run:
    """Everything before the first step: processes, the run folder, data, model, optimizer,
    resume, tracking."""
    accelerator = build_accelerator(recipe, source)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv kernels once
    lock = claim_folder(accelerator, recipe, source)
    try:
        return _build(accelerator, recipe, source, lock)
    except BaseException:
        if lock is not None:
            lock.abandon()
        raise


def _build(accelerator: Any, recipe: Recipe, source: str, lock: rundir.RunLock | None) -> Run:
    from accelerate.utils import set_seed

    set_seed(recipe.run.seed)
    output_dir = Path(recipe.run.output_dir)
    data = on_every_rank(accelerator, lambda: build_data(recipe.data, recipe.run.seed, accelerator.process_index,
                                                         accelerator.num_processes, accelerator.device))
    set_seed(recipe.run.seed)  # the initialisation depends on the seed alone, not on what building the data drew
    num_classes = recipe.model.num_classes or data.num_classes
    if num_classes != data.num_classes:
        raise UserError(f"{source}: model.num_classes: {num_classes} but {recipe.data.name} has "
                        f"{data.num_classes} classes")
    model = make_model(recipe.model.name, num_classes, f"{source}: model.name")
    model = attacks.student_model(model, recipe, num_classes, source)  # the skeptical student's auxiliary head
    if recipe.model.sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if recipe.model.channels_last and not under_deepspeed(accelerator):
        model = model.to(memory_format=torch.channels_last)
    dtype = input_dtype(accelerator)
    step_fn, lineage, frozen = build_frozen(recipe, num_classes, accelerator, data.train_size, dtype)
    synthetic = None
    if frozen is not None and recipe.run.role == "student" and recipe.distill.method in attacks.DATA_FREE:
        # a data-free attack trains on synthetic images, never on the training split
        identity = cache_key(recipe, checkpoint.resolve_model_file(recipe.distill.teacher_checkpoint,
                                                                   "distill.teacher_checkpoint"), "run", dtype)
        synthetic = attacks.data_free_source(recipe, frozen.network, num_classes, accelerator.device,
                                             accelerator.process_index, identity, model, accelerator.is_main_process)
    if synthetic is not None:
        data = dataclasses.replace(data, train=synthetic)
        step_fn = attacks.with_source_parts(step_fn, synthetic)
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.optim, recipe.run.epochs, data.train.steps_per_epoch)
    if recipe.model.compile:
        model = torch.compile(model)
    _fill_deepspeed_config(accelerator, recipe)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if synthetic is not None and hasattr(synthetic, "state_dict"):  # DAFL's generator, its Adam and noise
        accelerator.register_for_checkpointing(synthetic)
    resumed = checkpoint.resume(accelerator, output_dir, recipe.run.resume)
    if resumed and frozen is not None and frozen.cache is not None:
        _restore_cache(frozen.cache, output_dir / checkpoint.CACHE_FILE, accelerator)
    state = resumed[0] if resumed else TrainState()
    if state.epoch > recipe.run.epochs:
        raise UserError(f"{source}: run.epochs: {recipe.run.epochs}, but the checkpoint {resumed[1]} has "
                        f"already trained {state.epoch} epochs")
    if accelerator.is_main_process:
        rundir.trim_log(output_dir, state.global_step)
        if resumed:
            print(f"[{recipe.run.name}] resumed from {resumed[1]} (epoch {state.epoch + 1}, "
                  f"step {state.step_in_epoch} of the epoch, global step {state.global_step})", flush=True)
    tracker = Tracker(recipe.tracking, output_dir, active=accelerator.is_main_process)
    token = agree(accelerator, str(os.getpid()))
    return Run(recipe, accelerator, model, optimizer, scheduler, data, step_fn, tracker, state,
               output_dir, lineage, input_dtype=dtype, frozen=frozen, lock=lock, token=token)


def _restore_cache(cache: LogitCache, path: Path, accelerator: Any) -> None:
    if not path.is_file():
        return
    problem = cache.load(path)
    if accelerator.is_main_process:
        if problem:
            warn(f"{path}: not used, {problem}; the logits are computed again")
        else:
            print(f"loaded {cache.count} of {cache.capacity} cached frozen logits from {path}", flush=True)


def save_checkpoint(run: Run, with_cache: bool = True) -> None:
    """The training state, and the logit cache when it has grown since it was last saved
    (epoch ends and preemption; mid-epoch checkpoints skip it to bound the writes)."""
    try:
        checkpoint.save_training_state(run.accelerator, run.output_dir, run.state, run.recipe.run.keep_last,
                                       run.token)
        cache = run.frozen.cache if run.frozen is not None else None
        if with_cache and cache is not None and cache.count > cache.saved:
            if run.accelerator.is_main_process:  # every rank holds the same, all-gathered cache
                cache.save(run.output_dir / checkpoint.CACHE_FILE)
            cache.saved = cache.count
            run.accelerator.wait_for_everyone()
    except OSError as exc:
        newest = checkpoint.checkpoint_dirs(run.output_dir)[:1]
        kept = f"the newest complete checkpoint is {newest[0]}" if newest else "no complete checkpoint was kept"
        raise RunError(f"run.output_dir: {exc.strerror or exc} while writing the checkpoint of step "
                       f"{run.state.global_step} in {run.output_dir}; {kept}") from None


# ============================================================================ epoch and evaluation


def train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the training set from ``run.state.step_in_epoch``; returns epoch means."""
    acc, recipe, state = run.accelerator, run.recipe, run.state
    run.model.train()
    steps = run.data.train.steps_per_epoch
    sums: dict[str, Tensor] = {}
    window: list[tuple[int, dict[str, Tensor]]] = []
    seen, taken, started = 0, 0, time.perf_counter()
    bar = _progress(acc, recipe, steps, state.step_in_epoch, epoch)
    batches: Iterator[tuple[Tensor, Tensor]] = run.data.train.epoch(epoch, state.step_in_epoch)
    indices = _batch_indices(run, epoch, state.step_in_epoch)
    lookups = (run.frozen.hits, run.frozen.misses) if run.frozen is not None else (0, 0)
    for images, labels in batches:
        images = _prepare_inputs(run, images)
        index = torch.as_tensor(next(indices), device=images.device) if indices is not None else None
        with acc.autocast():
            out = run.step_fn(run.model, images, labels, index, epoch)
        run.optimizer.zero_grad(set_to_none=True)
        acc.backward(out["loss"])
        if recipe.optim.grad_clip > 0:
            acc.clip_grad_norm_(run.model.parameters(), recipe.optim.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        state.step_in_epoch += 1
        state.global_step += 1
        seen += labels.shape[0]
        taken += 1
        parts = {k: v.detach() for k, v in out.items() if k != "logits"}
        for k, v in parts.items():
            sums[k] = sums.get(k, 0) + v.float()
        window.append((state.global_step, parts))
        last = state.step_in_epoch == steps
        limit = bool(recipe.run.max_steps) and state.global_step >= recipe.run.max_steps
        every = recipe.run.checkpoint_every_steps
        checkpoint_due = bool(every) and state.global_step % every == 0 and not last
        stop = _should_stop(run)
        if len(window) >= 10 or last or limit or checkpoint_due or stop:
            _check_finite(acc, window, epoch)  # never checkpoint a state that saw a NaN
            if bar is not None:
                bar.set_postfix(loss=f"{window[-1][1]['loss'].item():.4f}")
            window = []
        if bar is not None:
            bar.update(1)
        if stop:
            raise Preempted(run.preempt is not None and run.preempt.interrupted)
        if checkpoint_due:
            save_checkpoint(run, with_cache=False)
        if limit:
            break
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started
    means = {f"train_{k}": float(acc.reduce((v / max(1, taken)).reshape(1), reduction="mean").item())
             for k, v in sums.items()}
    means["images_per_s"] = seen * acc.num_processes / max(elapsed, 1e-9)
    means["epoch_time_s"] = elapsed
    if run.frozen is not None and run.frozen.cache is not None:
        counts = torch.tensor([run.frozen.hits - lookups[0], run.frozen.misses - lookups[1]], device=acc.device)
        hits, misses = acc.reduce(counts, reduction="sum").tolist()
        means["cache_hit_rate"] = hits / max(1, hits + misses)  # share of frozen logits served from memory
    return means


def _check_finite(acc: Any, window: list[tuple[int, dict[str, Tensor]]], epoch: int) -> None:
    """One host sync per window: find the first step whose loss is NaN/Inf and name it with
    its parts. Ranks agree (one all-reduce), so none is left waiting in a collective."""
    losses = torch.stack([parts["loss"].float() for _, parts in window])
    bad = (~torch.isfinite(losses)).any().float().reshape(1)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    if bad.item() == 0:
        return
    for (step, parts), loss in zip(window, losses.tolist(), strict=True):
        if not math.isfinite(loss):
            detail = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
            raise NonFiniteLoss(f"non-finite loss at step {step} (epoch {epoch + 1}): {detail}")
    raise NonFiniteLoss(f"non-finite loss on another process by step {window[-1][0]} (epoch {epoch + 1})")


def _batch_indices(run: Run, epoch: int, start_step: int) -> Iterator[list[int]] | None:
    """Sample indices of each batch, read only by the frozen-logit cache (device and torch
    loaders; the recipe check refuses the cache with ffcv)."""
    if run.frozen is None or run.frozen.cache is None:
        return None
    return iter(run.data.train.batch_indices(epoch, start_step))


def _prepare_inputs(run: Run, images: Tensor) -> Tensor:
    if run.input_dtype is not None:
        images = images.to(run.input_dtype)
    if run.recipe.model.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def _should_stop(run: Run) -> bool:
    return run.preempt is not None and run.preempt.agreed(run.accelerator)


def _progress(acc: Any, recipe: Recipe, steps: int, start: int, epoch: int) -> Any:
    if not (acc.is_main_process and recipe.run.progress):
        return None
    from tqdm.auto import tqdm

    # disable=None: tqdm draws only on an interactive terminal; piped (a file, SLURM's log) the
    # per-epoch line of _print_epoch is all there is
    return tqdm(total=steps, initial=start, desc=f"{recipe.run.name} epoch {epoch + 1}/{recipe.run.epochs}",
                dynamic_ncols=True, leave=False, file=sys.stderr, disable=None)


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Top-1/top-5 (percent) and CE over the evaluation split. Each rank scores a disjoint,
    unpadded shard; the sums are all-reduced, so every sample counts exactly once."""
    acc = run.accelerator
    model = _unwrapped(run)  # no DDP forward: shards may differ by one batch
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=acc.device)  # top1, top5, ce, count
    with torch.inference_mode():
        for images, labels in run.data.eval.batches():
            images = _prepare_inputs(run, images)
            with acc.autocast():
                logits = model(images)
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(labels[:, None])
            totals += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(),
                                   F.cross_entropy(logits, labels, reduction="sum"),
                                   torch.tensor(labels.shape[0], device=logits.device)]).double()
    totals = acc.reduce(totals.clone(), reduction="sum")
    top1, top5, ce, count = totals.tolist()
    if int(count) != len(run.data.eval):
        raise RuntimeError(f"evaluation counted {int(count)} samples, expected {len(run.data.eval)}")
    return {"test_top1": 100.0 * top1 / count, "test_top5": 100.0 * top5 / count, "test_ce": ce / count}


# ============================================================================ run


def peak_memory(device: torch.device) -> dict[str, float]:
    """``peak_memory_mb``: the most device memory tensors held during the epoch (CUDA; the
    counter is reset as each epoch starts). Nothing on CPU: there the process's memory is
    in MLflow's system metrics (``system/system_memory_usage_megabytes``)."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}


def train(recipe: Recipe, source: str = "<recipe>") -> dict[str, float]:
    """Train what ``recipe`` describes; returns the final evaluation metrics."""
    folder = rundir.inspect(recipe, source)
    if folder.kind == "finished" and folder.results is not None:
        _announce_finished(recipe, folder.results)
        return folder.results["final"]
    preflight.validate(recipe, source)
    run = setup(recipe, source)
    status = "FAILED"
    try:
        state = run.state
        tags = run_tags(recipe, run.lineage, source)
        state.mlflow_run_id = run.tracker.start(recipe.tracking.run_name or recipe.run.name,
                                                run_params(recipe), tags, state.mlflow_run_id)
        if run.accelerator.is_main_process and recipe.tracking.enabled:  # a resumed run's are kept once
            inputs = data_inputs(recipe.data, run.data)
            if recipe.run.role == "student" and recipe.distill.method in attacks.DATA_FREE:
                inputs = [i for i in inputs if i.context != "train"]  # never read
            run.tracker.log_inputs(inputs)
        run.preempt = Preemption()
        run.preempt.install()
        final = _loop(run)
        status = "FINISHED"
        if run.accelerator.is_main_process:
            _announce_done(run, final)
        return final
    except Preempted:
        save_checkpoint(run)
        status = "KILLED"
        raise
    finally:
        if run.preempt is not None:
            run.preempt.uninstall()
        run.tracker.finish(status)
        if run.lock is not None:
            run.lock.release()


def _announce_done(run: Run, final: dict[str, float]) -> None:
    """The closing line: the score, where the model went, which MLflow run holds it."""
    recipe, tracker = run.recipe, run.tracker
    model = run.output_dir / checkpoint.MODEL_FILE
    print(f"[{recipe.run.name}] done: test_top1={final.get('test_top1', float('nan')):.2f}, model {model}; "
          f"{mlflow_where(recipe, tracker.run_id, tracker.experiment_id)}", flush=True)


def mlflow_where(recipe: Recipe, run_id: str, experiment_id: str) -> str:
    """Where a run is in MLflow, as a user would open it."""
    if not recipe.tracking.enabled:
        return "MLflow off (tracking.enabled: false)"
    if not run_id:
        return f"MLflow did not answer (events kept in {Path(recipe.run.output_dir) / 'mlflow_undelivered.jsonl'})"
    uri = tracking_uri(recipe.tracking)
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"MLflow run {run_id}: {uri.rstrip('/')}/{page}"
    database = Path(uri.removeprefix("sqlite:///"))
    command = "nt-dist ui" if database.resolve() == (Path.cwd() / "mlflow.db").resolve() else f"nt-dist ui --db {database}"
    return f"MLflow run {run_id} in {experiment_of(recipe.tracking)} ({command}, then http://127.0.0.1:5000/{page})"


def _announce_finished(recipe: Recipe, results: dict[str, Any]) -> None:
    if launched()[0] != 0:
        return
    folder = Path(recipe.run.output_dir)
    top1 = results["final"].get("test_top1")
    score = f"test_top1={top1:.2f}, " if isinstance(top1, (int, float)) else ""
    extend = "; a larger run.epochs extends it" if recipe.optim.schedule in rundir.EXTENSIBLE_SCHEDULES else ""
    print(f"[{recipe.run.name}] already finished: {score}results in {folder / rundir.RESULTS_FILE}, model in "
          f"{folder / checkpoint.MODEL_FILE} (run.resume=never starts over{extend})", flush=True)


def _loop(run: Run) -> dict[str, float]:
    recipe, acc, state = run.recipe, run.accelerator, run.state
    steps = run.data.train.steps_per_epoch
    metrics: dict[str, float] = {}
    run.tracker.log_artifact(run.output_dir / "resolved_recipe.yaml")
    while state.epoch < recipe.run.epochs:
        epoch = state.epoch
        lr = run.optimizer.param_groups[0]["lr"]
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(acc.device)
        train_metrics = train_epoch(run, epoch)
        stopped_early = bool(recipe.run.max_steps) and state.global_step >= recipe.run.max_steps
        metrics = {**train_metrics, **evaluate(run), "lr": lr, "epoch": epoch + 1, **peak_memory(acc.device)}
        run.tracker.log_metrics(metrics, step=state.global_step)
        if acc.is_main_process:
            _print_epoch(recipe, epoch, metrics)
        if state.step_in_epoch >= steps:
            state.epoch, state.step_in_epoch = epoch + 1, 0
        state.mlflow_run_id = run.tracker.run_id or state.mlflow_run_id
        save_checkpoint(run)
        if stopped_early:
            break
    if not metrics:  # resumed after the last epoch had been trained but before export
        metrics = evaluate(run)
    finish(run, metrics)
    return metrics


def finish(run: Run, metrics: dict[str, float]) -> None:
    """Model-only export, final metrics (their presence marks the run complete), artifacts."""
    acc, recipe = run.accelerator, run.recipe
    # under DeepSpeed a collective (ZeRO-3 gathers the shards); None off the main rank
    state_dict = acc.get_state_dict(run.model) if under_deepspeed(acc) else _unwrapped(run).state_dict()
    run.state.mlflow_run_id = run.tracker.run_id or run.state.mlflow_run_id
    if acc.is_main_process:
        meta = {"architecture": recipe.model.name, "num_classes": run.data.num_classes,
                "role": recipe.run.role, "dataset": recipe.data.name, "image_size": recipe.data.image_size,
                "mlflow_run_id": run.state.mlflow_run_id, "nt_dist_version": __version__,
                # lineage by name: a run trained from this model names this run and its experiment
                "mlflow_run_name": recipe.tracking.run_name or recipe.run.name,
                "mlflow_experiment": experiment_of(recipe.tracking) if recipe.tracking.enabled else "",
                "mlflow_experiment_id": run.tracker.experiment_id,
                "test_top1": f"{metrics.get('test_top1', float('nan')):.4f}"}
        # torch.compile wraps the module: export the plain module's names
        plain = attacks.exported_state(recipe, {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()})
        summary = {"final": {k: metrics[k] for k in ("test_top1", "test_top5", "test_ce") if k in metrics},
                   "global_step": run.state.global_step, "mlflow_run_id": run.state.mlflow_run_id,
                   "role": recipe.run.role, "name": recipe.run.name,
                   # what the run was asked for: the same command again finds it finished
                   "epochs": recipe.run.epochs, "max_steps": recipe.run.max_steps}
        try:
            checkpoint.export_model(plain, run.output_dir / checkpoint.MODEL_FILE, meta)
            checkpoint.atomic_write_text(run.output_dir / rundir.RESULTS_FILE, json.dumps(summary, indent=1))
        except OSError as exc:
            raise RunError(f"run.output_dir: {exc.strerror or exc} while exporting the model to {run.output_dir}; "
                           "the training checkpoints are kept: run the same command again") from None
        run.tracker.log_artifact(run.output_dir / checkpoint.MODEL_FILE)
        run.tracker.log_artifact(run.output_dir / "metrics.json")
    acc.wait_for_everyone()


def _print_epoch(recipe: Recipe, epoch: int, m: dict[str, float]) -> None:
    parts = " ".join(f"{k.removeprefix('train_')}={m[k]:.4f}" for k in m if k.startswith("train_"))
    print(f"[{recipe.run.name}] epoch {epoch + 1}/{recipe.run.epochs} {parts} "
          f"top1={m['test_top1']:.2f} top5={m['test_top5']:.2f} lr={m['lr']:.4g} "
          f"{m['images_per_s']:.0f} img/s", flush=True)


# ============================================================================ entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nt_dist.train",
                                     description="Train what a recipe describes (under accelerate launch).")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe field (repeatable), e.g. --set optim.lr=0.1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe: Recipe | None = None
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        train(recipe, source=args.recipe)
    except UserError as exc:
        return report(f"nt-dist: error: {exc}", EXIT_USER_ERROR)
    except RunError as exc:
        return report(f"nt-dist: error: {args.recipe}: {exc}", EXIT_RUN_ERROR)
    except Preempted as exc:
        where = recipe.run.output_dir if recipe is not None else "the run folder"
        kind = "interrupted" if exc.interrupted else "preempted"
        return report(f"nt-dist: {kind}: checkpoint saved in {where}; run the same command again to resume",
                      EXIT_INTERRUPTED if exc.interrupted else EXIT_PREEMPTED)
    except KeyboardInterrupt:
        where = f"{recipe.run.output_dir} keeps its newest checkpoint" if recipe is not None else "nothing was trained"
        return report(f"nt-dist: interrupted: {where}", EXIT_INTERRUPTED)
    finally:
        _destroy_process_group()
    return 0


def _destroy_process_group() -> None:
    """Without this, one DeepSpeed run in three aborted at exit (SIGABRT) on CPU."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_launched(code: int) -> None:
    """End a process started by a launcher (``accelerate launch``, torchrun) without the
    interpreter's teardown. Even after ``destroy_process_group`` a DeepSpeed rank on CPU
    sometimes aborted while exiting ("terminate called without an active exception", SIGABRT),
    after its work was done and saved; the launcher then failed the whole job. By this point
    every file is written atomically and MLflow has been told the run's end, so nothing is lost
    by skipping teardown: flush the streams and leave."""
    if launched()[1] > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_launched(main())
