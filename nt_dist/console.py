"""What a run prints: its progress bar, one line per epoch, and its closing line (the score,
where the model went, which MLflow run holds it). Rank 0 only; callers check."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from nt_dist import checkpoint, rundir
from nt_dist.config import Recipe
from nt_dist.errors import warn
from nt_dist.tracking import experiment_of, run_page, tracking_uri
from nt_dist.tracking_ui import DEFAULT_UI_PORT, recorded_ui


def progress_bar(recipe: Recipe, steps: int, start: int, epoch: int) -> Any:
    """tqdm over the epoch's steps, or None (``run.progress: false``)."""
    if not recipe.run.progress:
        return None
    from tqdm.auto import tqdm

    # disable=None: tqdm draws only on an interactive terminal; piped (a file, SLURM's log) the
    # per-epoch line of print_epoch is all there is
    return tqdm(total=steps, initial=start, desc=f"{recipe.run.name} epoch {epoch + 1}/{recipe.run.epochs}",
                dynamic_ncols=True, leave=False, file=sys.stderr, disable=None)


def print_epoch(recipe: Recipe, epoch: int, m: dict[str, float]) -> None:
    parts = " ".join(f"{k.removeprefix('train_')}={m[k]:.4f}" for k in m if k.startswith("train_"))
    partial = " (train means of the steps after the resume)" if m.get("resumed") else ""
    print(f"[{recipe.run.name}] epoch {epoch + 1}/{recipe.run.epochs} {parts} "
          f"top1={m['test_top1']:.2f} top5={m['test_top5']:.2f} lr={m['lr']:.4g} "
          f"{m['images_per_s']:.0f} img/s{partial}", flush=True)


def print_resumed(recipe: Recipe, folder: Path, state: checkpoint.TrainState) -> None:
    """The resume line; and a warning when the checkpoint lacks the epoch's running sums (written
    before they were kept), so the epoch's logged means cannot be the whole epoch's."""
    print(f"[{recipe.run.name}] resumed from {folder} (epoch {state.epoch + 1}, "
          f"step {state.step_in_epoch} of the epoch, global step {state.global_step})", flush=True)
    if state.partial_epoch:
        warn(f"{folder} does not carry epoch {state.epoch + 1}'s running metrics (written by an older nt-dist): "
             "that epoch's train_* and lr in metrics.jsonl cover only the steps after the resume and are marked "
             '"resumed": true')


def print_done(recipe: Recipe, final: dict[str, float], run_id: str, experiment_id: str) -> None:
    """The closing line: the score, where the model went, which MLflow run holds it."""
    model = Path(recipe.run.output_dir) / checkpoint.MODEL_FILE
    print(f"[{recipe.run.name}] done: test_top1={final.get('test_top1', float('nan')):.2f}, model {model}; "
          f"{mlflow_where(recipe, run_id, experiment_id)}", flush=True)


def print_finished(recipe: Recipe, results: dict[str, Any]) -> None:
    """The line of a run asked for again after it finished."""
    folder = Path(recipe.run.output_dir)
    top1 = results["final"].get("test_top1")
    score = f"test_top1={top1:.2f}, " if isinstance(top1, (int, float)) else ""
    extend = "; a larger run.epochs extends it" if recipe.optim.schedule in rundir.EXTENSIBLE_SCHEDULES else ""
    print(f"[{recipe.run.name}] already finished: {score}results in {folder / rundir.RESULTS_FILE}, model in "
          f"{folder / checkpoint.MODEL_FILE} (run.resume=never starts over{extend})", flush=True)


def mlflow_where(recipe: Recipe, run_id: str, experiment_id: str) -> str:
    """Where a run is in MLflow, as a user would open it."""
    if not recipe.tracking.enabled:
        return "MLflow off (tracking.enabled: false)"
    if not run_id:
        return f"MLflow did not answer (events kept in {Path(recipe.run.output_dir) / 'mlflow_undelivered.jsonl'})"
    uri = tracking_uri(recipe.tracking)
    page = run_page(experiment_id, run_id)
    if uri.startswith(("http://", "https://")):
        return f"MLflow run {run_id}: {uri.rstrip('/')}/{page}"
    database = Path(uri.removeprefix("sqlite:///"))
    # the port `nt-dist ui` last served this store on (its record beside the store), else its default
    host, port = recorded_ui(database.parent) or ("127.0.0.1", DEFAULT_UI_PORT)
    command = "nt-dist ui" if database.resolve() == (Path.cwd() / "mlflow.db").resolve() else f"nt-dist ui --db {database}"
    command += f" --port {port}" if port != DEFAULT_UI_PORT else ""
    return f"MLflow run {run_id} in {experiment_of(recipe.tracking)} ({command}, then http://{host}:{port}/{page})"
