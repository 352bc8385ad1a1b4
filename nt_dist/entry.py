"""The process entry of a training run: ``python -m nt_dist.train RECIPE [--set k=v ...]``
(under ``accelerate launch``, torchrun, or alone) and ``nt-dist train``.

Every error a user can cause ends here in one line (``nt-dist: error: ...``) and an exit code
(:mod:`nt_dist.errors`): printed once for the whole job, by rank 0.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from nt_dist.config import Recipe, load_recipe
from nt_dist.errors import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_RUN_ERROR,
    EXIT_USER_ERROR,
    Preempted,
    RunError,
    UserError,
)
from nt_dist.ranks import last_line, launched


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nt_dist.train",
                                     description="Train what a recipe describes (under accelerate launch).")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe field (repeatable), e.g. --set optim.lr=0.1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from nt_dist.train import train

    args = parse_args(argv)
    recipe: Recipe | None = None
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        train(recipe, source=args.recipe)
    except UserError as exc:
        return last_line(f"nt-dist: error: {exc}", EXIT_USER_ERROR)
    except RunError as exc:
        return last_line(f"nt-dist: error: {args.recipe}: {exc}", EXIT_RUN_ERROR)
    except Preempted as exc:
        where = recipe.run.output_dir if recipe is not None else "the run folder"
        kind = "interrupted" if exc.interrupted else "preempted"
        return last_line(f"nt-dist: {kind}: checkpoint saved in {where}; run the same command again to resume",
                         EXIT_INTERRUPTED if exc.interrupted else EXIT_PREEMPTED)
    except KeyboardInterrupt:
        where = f"{recipe.run.output_dir} keeps its newest checkpoint" if recipe is not None else "nothing was trained"
        return last_line(f"nt-dist: interrupted: {where}", EXIT_INTERRUPTED)
    finally:
        destroy_process_group()
    return 0


def destroy_process_group() -> None:
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
