"""The training loop: set up a run, train epoch by epoch, evaluate, checkpoint, export.

Launch it as ``accelerate launch [options] -m nt_dist.train RECIPE.yaml [--set k=v ...]``
(any number of processes; gloo on CPU, NCCL on GPU) or ``nt-dist train RECIPE`` (one process).

What a step optimises is the run's objective (:mod:`nt_dist.objectives`: ``run.role``, and for a
student ``distill.method``); this file never branches on it. The frozen network an objective
learns against (:mod:`nt_dist.frozen_network`) is never handed to ``accelerator.prepare`` (no
DDP wrapper, no gradient sync, no optimizer state): it runs in eval mode under
``torch.inference_mode``. Backend plumbing is in :mod:`nt_dist.engine`, the end of a run in
:mod:`nt_dist.export`, what it prints in :mod:`nt_dist.console`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nt_dist import checkpoint, console, engine, preflight, rundir
from nt_dist.checkpoint import EpochTally, TrainState
from nt_dist.config import Recipe
from nt_dist.data import DataBundle, build_data, data_inputs
from nt_dist.data.resolution import ResolutionSchedule
from nt_dist.errors import Preempted, RunError, UserError
from nt_dist.evaluation import evaluate
from nt_dist.export import export_run
from nt_dist.frozen_network import FrozenNetwork, cache_key, load_frozen_network, restore_cache
from nt_dist.lineage import run_params, run_tags
from nt_dist.models import build_recipe_model
from nt_dist.objectives import Objective, StepFn, objective_for
from nt_dist.optim import build_optimizer, build_scheduler
from nt_dist.ranks import Preemption, agree, check_finite, claim_folder, launched, on_every_rank
from nt_dist.tracking import Tracker


@dataclass
class Run:
    """What the epoch function needs; built once by :func:`setup`."""

    recipe: Recipe
    objective: Objective
    accelerator: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: DataBundle
    step_fn: StepFn
    tracker: Tracker
    state: TrainState
    output_dir: Path
    lineage: dict[str, str]
    input_dtype: torch.dtype | None = None  # DeepSpeed bf16/fp16 engines take low-precision inputs
    frozen_network: FrozenNetwork | None = None  # the adversary/teacher and its logit cache
    lock: rundir.RunLock | None = None  # the run folder's lock (main process)
    tmp_tag: str = ""  # the main process's pid, on every rank: unique temporary file names
    preempt: Preemption | None = None
    tally: EpochTally | None = None  # the epoch in progress's metric sums (checkpointed with the state)

    def prepare(self, images: Tensor) -> Tensor:
        return engine.prepare_inputs(images, self.input_dtype, self.recipe.model.channels_last)


# ============================================================================ setup


def setup(recipe: Recipe, source: str) -> Run:
    """Everything before the first step: processes, the run folder, data, model, optimizer,
    resume, tracking."""
    accelerator = engine.build_accelerator(recipe, source)
    lock = claim_folder(accelerator, recipe, source)
    try:
        return _build(accelerator, recipe, source, lock)
    except BaseException:
        if lock is not None:
            lock.abandon()
        raise


def _build(accelerator: Any, recipe: Recipe, source: str, lock: rundir.RunLock | None) -> Run:
    from accelerate.utils import set_seed

    objective, main = objective_for(recipe), accelerator.is_main_process
    set_seed(recipe.run.seed)
    output_dir = Path(recipe.run.output_dir)
    data = on_every_rank(accelerator, lambda: build_data(recipe.data, recipe.run.seed, accelerator.process_index,
                                                         accelerator.num_processes, accelerator.device))
    set_seed(recipe.run.seed)  # the initialisation depends on the seed alone, not on what building the data drew
    num_classes = recipe.model.num_classes or data.num_classes
    if num_classes != data.num_classes:
        raise UserError(f"{source}: model.num_classes: {num_classes} but {recipe.data.name} has "
                        f"{data.num_classes} classes")
    model = objective.wrap_model(build_recipe_model(recipe.model, num_classes, source), recipe, num_classes, source)
    model = engine.place_model(model, recipe, accelerator)
    dtype = engine.input_dtype(accelerator)
    frozen, lineage, source_split = None, objective.tags(recipe), None
    if objective.frozen is not None:
        frozen, frozen_lineage = load_frozen_network(recipe, objective.frozen, num_classes, accelerator,
                                                     data.train_size, dtype)
        lineage = {**frozen_lineage, **lineage}
    if objective.data_free:  # trains on synthetic images, never on the training split
        assert frozen is not None and objective.frozen is not None
        source_split = objective.train_source(
            recipe, frozen.network, num_classes=num_classes, device=accelerator.device,
            rank=accelerator.process_index, identity=cache_key(recipe, objective.frozen, "run", dtype),
            student=model, main=main)
        data = dataclasses.replace(data, train=source_split)
    step_fn = objective.step(recipe, frozen, source_split)
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.optim, recipe.run.epochs, data.train.steps_per_epoch)
    if recipe.model.compile:
        model = torch.compile(model)
    engine.fill_deepspeed_config(accelerator, recipe)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if hasattr(source_split, "state_dict"):  # DAFL's generator, its Adam and noise
        accelerator.register_for_checkpointing(source_split)
    resumed = checkpoint.resume(accelerator, output_dir, recipe.run.resume)
    if resumed and frozen is not None and frozen.cache is not None:
        restore_cache(frozen.cache, output_dir / checkpoint.CACHE_FILE, main)
    state = resumed[0] if resumed else TrainState()
    if state.epoch > recipe.run.epochs:
        raise UserError(f"{source}: run.epochs: {recipe.run.epochs}, but the checkpoint {resumed[1]} has "
                        f"already trained {state.epoch} epochs")
    if main:
        rundir.trim_log(output_dir, state.global_step, mid_epoch=state.step_in_epoch > 0)
        if resumed:
            console.print_resumed(recipe, resumed[1], state)
    tracker = Tracker(recipe.tracking, output_dir, active=main)
    return Run(recipe, objective, accelerator, model, optimizer, scheduler, data, step_fn, tracker, state, output_dir,
               lineage, input_dtype=dtype, frozen_network=frozen, lock=lock,
               tmp_tag=agree(accelerator, str(os.getpid())))


def save_checkpoint(run: Run, with_cache: bool = True) -> None:
    """The training state, and the logit cache (epoch ends and preemption; mid-epoch
    checkpoints skip it to bound the writes)."""
    if run.tally is not None:  # mid-epoch: the epoch's sums so far, so a resume logs the whole epoch
        run.tally.store(run.accelerator, run.state)
    try:
        checkpoint.save_training_state(run.accelerator, run.output_dir, run.state, run.recipe.run.keep_last,
                                       run.tmp_tag)
        if with_cache and run.frozen_network is not None and run.frozen_network.cache is not None:
            run.frozen_network.cache.save_if_grown(run.output_dir / checkpoint.CACHE_FILE, run.accelerator)
    except OSError as exc:
        newest = checkpoint.checkpoint_dirs(run.output_dir)[:1]
        kept = f"the newest complete checkpoint is {newest[0]}" if newest else "no complete checkpoint was kept"
        raise RunError(f"run.output_dir: {exc.strerror or exc} while writing the checkpoint of step "
                       f"{run.state.global_step} in {run.output_dir}; {kept}") from None


# ============================================================================ one epoch


def train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the training set from ``run.state.step_in_epoch``; returns epoch means."""
    acc, recipe, state, frozen = run.accelerator, run.recipe, run.state, run.frozen_network
    run.model.train()
    steps = run.data.train.steps_per_epoch
    tally = run.tally = run.tally or EpochTally(state, acc.device)  # carried on from a mid-epoch checkpoint
    window: list[tuple[int, dict[str, Tensor]]] = []
    seen, started = 0, time.perf_counter()
    bar = console.progress_bar(recipe, steps, state.step_in_epoch, epoch) if acc.is_main_process else None
    # sample indices of each batch, read only by the frozen-logit cache (the recipe check refuses it elsewhere)
    caching = frozen is not None and frozen.cache is not None
    indices = iter(run.data.train.batch_indices(epoch, state.step_in_epoch)) if caching else None
    lookups = (frozen.hits, frozen.misses) if frozen is not None else (0, 0)
    for images, labels in run.data.train.epoch(epoch, state.step_in_epoch):
        images = run.prepare(images)
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
        parts = {k: v.detach() for k, v in out.items() if k != "logits"}
        tally.add(parts)
        window.append((state.global_step, parts))
        last = state.step_in_epoch == steps
        limit = bool(recipe.run.max_steps) and state.global_step >= recipe.run.max_steps
        every = recipe.run.checkpoint_every_steps
        checkpoint_due = bool(every) and state.global_step % every == 0 and not last
        stop = run.preempt is not None and run.preempt.agreed(acc)
        if len(window) >= 10 or last or limit or checkpoint_due or stop:
            check_finite(acc, window, epoch)  # never checkpoint a state that saw a NaN
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
    means = tally.means(acc, state)  # the whole epoch's, a resume included; throughput below is this call's
    means.update(images_per_s=seen * acc.num_processes / max(elapsed, 1e-9), epoch_time_s=elapsed)
    if recipe.data.min_res:  # progressive resizing: the side of this epoch's training images
        means["resolution"] = ResolutionSchedule.of(recipe.data).at(epoch)
    if caching:
        counts = torch.tensor([frozen.hits - lookups[0], frozen.misses - lookups[1]], device=acc.device)
        hits, misses = acc.reduce(counts, reduction="sum").tolist()
        means["cache_hit_rate"] = hits / max(1, hits + misses)  # share of frozen logits served from memory
    return means


def evaluate_run(run: Run) -> dict[str, float]:
    """The evaluation split's scores, every rank scoring its shard of the plain model (no DDP
    forward: shards may differ by one batch)."""
    return evaluate(engine.unwrapped(run.accelerator, run.model), run.data.eval, run.accelerator, run.prepare)


# ============================================================================ the run


def train(recipe: Recipe, source: str = "<recipe>") -> dict[str, float]:
    """Train what ``recipe`` describes; returns the final evaluation metrics."""
    folder = rundir.folder_state(recipe, source)
    if folder.kind == "finished" and folder.results is not None:
        if launched()[0] == 0:
            console.print_finished(recipe, folder.results)
        return folder.results["final"]
    preflight.validate(recipe, source, frozen_files=True)  # the adversary/teacher too: before any data
    run = setup(recipe, source)
    status = "FAILED"
    try:
        state = run.state
        tags = run_tags(recipe, run.lineage, source)
        state.mlflow_run_id = run.tracker.start(recipe.tracking.run_name or recipe.run.name,
                                                run_params(recipe), tags, state.mlflow_run_id)
        if run.accelerator.is_main_process and recipe.tracking.enabled:  # a resumed run's are kept once
            inputs = data_inputs(recipe.data, run.data)
            run.tracker.log_inputs([i for i in inputs if i.context != "train" or not run.objective.data_free])
        run.preempt = Preemption(on_stall=lambda: run.tracker.mark("KILLED"))  # before a launcher's SIGKILL
        run.preempt.install()
        final = _loop(run)
        status = "FINISHED"
        if run.accelerator.is_main_process:
            console.print_done(recipe, final, run.tracker.run_id, run.tracker.experiment_id)
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


def _loop(run: Run) -> dict[str, float]:
    recipe, acc, state = run.recipe, run.accelerator, run.state
    steps = run.data.train.steps_per_epoch
    metrics: dict[str, float] = {}
    run.tracker.log_artifact(run.output_dir / rundir.RECIPE_FILE)
    while state.epoch < recipe.run.epochs:
        epoch = state.epoch
        lr = state.lr_of_epoch(run.optimizer.param_groups[0]["lr"])  # its first step's, a resume included
        engine.reset_peak_memory(acc.device)
        train_metrics = train_epoch(run, epoch)
        stopped_early = bool(recipe.run.max_steps) and state.global_step >= recipe.run.max_steps
        metrics = {**train_metrics, **evaluate_run(run), "lr": lr, "epoch": epoch + 1,
                   **engine.peak_memory(acc.device)}
        run.tracker.log_metrics(metrics, step=state.global_step)
        if acc.is_main_process:
            console.print_epoch(recipe, epoch, metrics)
        if state.step_in_epoch >= steps:
            state.next_epoch()
            run.tally = None
        state.mlflow_run_id = run.tracker.run_id or state.mlflow_run_id
        save_checkpoint(run)
        if stopped_early:
            break
    if not metrics:  # resumed after the last epoch had been trained but before export
        metrics = evaluate_run(run)
    export_run(run, metrics)
    return metrics


if __name__ == "__main__":
    from nt_dist.entry import exit_launched, main

    exit_launched(main())
