"""The end of a run: the model-only export (``model.safetensors``, the plain network with its
lineage in the metadata) and ``metrics.json``, whose presence marks the run complete.

Written in that order, each atomically, so a run killed in between is resumed and exported
again; then both are logged to MLflow as artifacts.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from nt_dist import __version__, checkpoint, rundir
from nt_dist.data.resolution import eval_size
from nt_dist.engine import model_state
from nt_dist.errors import RunError
from nt_dist.fileio import atomic_write_text
from nt_dist.models import recipe_options
from nt_dist.tracking import experiment_of

if TYPE_CHECKING:
    from nt_dist.train import Run


def export_run(run: Run, metrics: dict[str, float]) -> None:
    """Model-only export, final metrics, artifacts (a collective: every rank calls it)."""
    acc, recipe = run.accelerator, run.recipe
    state_dict = model_state(acc, run.model)
    run.state.mlflow_run_id = run.tracker.run_id or run.state.mlflow_run_id
    if acc.is_main_process:
        assert state_dict is not None
        meta = {"architecture": recipe.model.name, "num_classes": run.data.num_classes,
                "role": recipe.run.role, "dataset": recipe.data.name, "image_size": recipe.data.image_size,
                "mlflow_run_id": run.state.mlflow_run_id, "nt_dist_version": __version__,
                # lineage by name: a run trained from this model names this run and its experiment
                "mlflow_run_name": recipe.tracking.run_name or recipe.run.name,
                "mlflow_experiment": experiment_of(recipe.tracking) if recipe.tracking.enabled else "",
                "mlflow_experiment_id": run.tracker.experiment_id,
                "test_top1": f"{metrics.get('test_top1', float('nan')):.4f}"}
        options = recipe_options(recipe.model)
        if options:  # a frozen network built from this file is built as it was trained
            meta["model_options"] = json.dumps(options, sort_keys=True)
        if recipe.data.eval_image_size or recipe.data.augment == "rrc_flip":  # how plot-logits evaluates it
            meta["eval_image_size"] = eval_size(recipe.data)
            meta["eval_crop_ratio"] = f"{recipe.data.eval_crop_ratio:g}"
        if recipe.run.role == "nasty":  # plot-logits shows a nasty teacher at the τ_A it was trained with
            meta["tau_a"] = f"{recipe.nasty.tau:g}"
        summary = {"final": {k: metrics[k] for k in ("test_top1", "test_top5", "test_ce") if k in metrics},
                   "global_step": run.state.global_step, "mlflow_run_id": run.state.mlflow_run_id,
                   "role": recipe.run.role, "name": recipe.run.name,
                   # what the run was asked for: the same command again finds it finished
                   "epochs": recipe.run.epochs, "max_steps": recipe.run.max_steps}
        try:
            checkpoint.export_model(run.objective.export_state(state_dict), run.output_dir / checkpoint.MODEL_FILE,
                                    meta)
            atomic_write_text(run.output_dir / rundir.RESULTS_FILE, json.dumps(summary, indent=1))
        except OSError as exc:
            raise RunError(f"run.output_dir: {exc.strerror or exc} while exporting the model to {run.output_dir}; "
                           "the training checkpoints are kept: run the same command again") from None
        run.tracker.log_artifact(run.output_dir / checkpoint.MODEL_FILE)
        run.tracker.log_artifact(run.output_dir / rundir.RESULTS_FILE)
    acc.wait_for_everyone()
