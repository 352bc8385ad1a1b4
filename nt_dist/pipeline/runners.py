"""Running the graph on this machine: in this process, or ``--parallel N`` stages at once as
subprocesses, or each through ``accelerate launch --config_file LAUNCHER``.

:func:`run` skips a stage whose folder already holds the finished run of the same recipe
(:func:`stage_state`); a failed stage stops its dependants, not its siblings. :func:`summary`,
:func:`exit_code` and :func:`describe_plan` (``--dry-run``) say what ran or would run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nt_dist.errors import EXIT_RUN_ERROR, UserError, one_line, say
from nt_dist.pipeline.graph import Stage, output_root
from nt_dist.pipeline.schema import Pipeline


@dataclass
class Outcome:
    stage: Stage
    status: str = "pending"  # ran | skipped | failed | blocked
    message: str = ""
    seconds: float = 0.0
    results: dict[str, Any] = field(default_factory=dict)


def stage_state(stage: Stage) -> tuple[str, dict[str, Any]]:
    """``finished`` (with its final metrics) when the stage's folder holds the exported run of
    the same recipe; ``todo`` otherwise. A folder holding another recipe is a UserError."""
    from nt_dist.checkpoint import MODEL_FILE
    from nt_dist.config import load_recipe
    from nt_dist.rundir import folder_state

    recipe = load_recipe(stage.recipe, list(stage.overrides))
    state = folder_state(recipe, str(stage.recipe))
    if state.kind == "finished" and state.results and (stage.output_dir / MODEL_FILE).is_file():
        return "finished", dict(state.results.get("final", {}))
    return "todo", {}


def stage_command(stage: Stage, launcher: str) -> list[str]:
    """The command that trains ``stage`` in a fresh process (``python -m nt_dist.train`` or
    ``accelerate launch --config_file LAUNCHER -m nt_dist.train``)."""
    args = ["-m", "nt_dist.train", str(stage.recipe), *sum((["--set", o] for o in stage.overrides), [])]
    if launcher == "local":
        return [sys.executable, *args]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    return [accelerate, "launch", "--config_file", str(Path(launcher).resolve()), *args]


def _train_here(stage: Stage) -> dict[str, Any]:
    from nt_dist.config import load_recipe
    from nt_dist.train import train

    return dict(train(load_recipe(stage.recipe, list(stage.overrides)), source=str(stage.recipe)))


def stage_env(parallel: int, environ: dict[str, str] | None = None, cpus: int | None = None) -> dict[str, str]:
    """The environment of a stage's process: with ``parallel`` stages at once, each gets
    ``cpus // parallel`` intra-op threads (``OMP_NUM_THREADS``, unless set already). Left to
    torch's default every process takes every core: on a 2-core machine two ResNet-8 stages
    then took 65 s each instead of 10-18 s."""
    env = dict(os.environ if environ is None else environ)
    env["PYTHONUNBUFFERED"] = "1"
    if parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (cpus or os.cpu_count() or 1) // parallel))
    return env


def _train_subprocess(stage: Stage, launcher: str, log: Path, parallel: int = 1) -> dict[str, Any]:
    from nt_dist.errors import RunError

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as sink:
        code = subprocess.call(stage_command(stage, launcher), stdout=sink, stderr=subprocess.STDOUT,
                               env=stage_env(parallel))
    if code != 0:
        lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "error:" in line] or lines[-1:]
        raise RunError(f"exit {code}: {errors[-1] if errors else '(no output)'} (log: {log})")
    state, results = stage_state(stage)
    if state != "finished":
        raise RunError(f"exit 0 but {stage.output_dir} holds no finished run (log: {log})")
    return results


def run(p: Pipeline, stages: list[Stage], *, launcher: str | None = None, parallel: int = 1,
        echo: Callable[[str], None] = say) -> list[Outcome]:
    """Run the graph on this machine. ``parallel`` > 1 (or a launcher config) trains each stage
    in its own process, its output in ``<output_dir>/logs/<stage>.log``; otherwise stages run
    in this process, in order, their output on the terminal."""
    from nt_dist.errors import Preempted, RunError

    launcher = launcher or p.spec.launcher
    if launcher != "local" and not Path(launcher).is_file():
        raise UserError(f"{p.path}: launcher: {launcher} not found (local, or an accelerate config such as "
                        "cluster/single_gpu.yaml)")
    outcomes = {s.name: Outcome(s) for s in stages}
    logs = output_root(stages) / "logs"
    separate = parallel > 1 or launcher != "local"

    def one(stage: Stage) -> None:
        outcome = outcomes[stage.name]
        started = time.perf_counter()
        try:
            state, results = stage_state(stage)
            if state == "finished":
                outcome.status, outcome.results = "skipped", results
                return
            echo(f"nt-dist pipeline: start {stage.name}")
            if separate:
                results = _train_subprocess(stage, launcher, logs / f"{stage.log_name}.log", parallel)
            else:
                results = _train_here(stage)
            outcome.status, outcome.results = "ran", results
        except (UserError, RunError) as exc:
            outcome.status, outcome.message = "failed", str(exc)
        except Preempted as exc:  # Ctrl-C or the scheduler: the stage checkpointed; stop the pipeline
            exc.where = str(stage.output_dir)  # type: ignore[attr-defined]
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bug in one stage must not end its siblings
            outcome.status, outcome.message = "failed", one_line(f"{type(exc).__name__}: {exc}")
        finally:
            outcome.seconds = time.perf_counter() - started
        if outcome.status == "failed":
            echo(f"nt-dist pipeline: FAILED {stage.name}: {outcome.message}")
        else:
            echo(f"nt-dist pipeline: done {stage.name}: top-1 {outcome.results.get('test_top1', float('nan')):.2f} "
                 f"({outcome.seconds:.0f} s)")

    def ready(stage: Stage) -> str:
        """``go``, ``wait`` or ``blocked`` (an input failed or was blocked)."""
        inputs = [outcomes[n].status for n in stage.needs]
        if any(s in ("failed", "blocked") for s in inputs):
            return "blocked"
        return "go" if all(s in ("ran", "skipped") for s in inputs) else "wait"

    pending = list(stages)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        running: dict[Future[None], Stage] = {}
        while pending or running:
            for stage in list(pending):
                verdict = ready(stage)
                if verdict == "blocked":
                    failed = next(n for n in stage.needs if outcomes[n].status in ("failed", "blocked"))
                    outcomes[stage.name].status, outcomes[stage.name].message = "blocked", f"needs {failed}"
                    pending.remove(stage)
                elif verdict == "go" and len(running) < max(1, parallel):
                    pending.remove(stage)
                    if parallel <= 1:
                        one(stage)
                    else:
                        running[pool.submit(one, stage)] = stage
            if running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    running.pop(future)
                    future.result()
            elif pending and all(ready(s) == "wait" for s in pending):
                raise RuntimeError("pipeline graph has a cycle or a missing stage")  # expand() makes neither
    return [outcomes[s.name] for s in stages]


def summary(outcomes: list[Outcome]) -> str:
    """What ran, what was skipped, what failed and what could not run, one line each for the last two."""
    counts = {k: sum(o.status == k for o in outcomes) for k in ("ran", "skipped", "failed", "blocked")}
    lines = [f"{len(outcomes)} stages: {counts['ran']} ran, {counts['skipped']} skipped (already finished), "
             f"{counts['failed']} failed, {counts['blocked']} not run (an input failed)"]
    for o in outcomes:
        if o.status == "failed":
            lines.append(f"  failed   {o.stage.name}: {o.message}")
        elif o.status == "blocked":
            lines.append(f"  not run  {o.stage.name}: {o.message}")
    return "\n".join(lines)


def exit_code(outcomes: list[Outcome]) -> int:
    return EXIT_RUN_ERROR if any(o.status in ("failed", "blocked") for o in outcomes) else 0


def describe_plan(stages: list[Stage], launcher: str) -> str:
    """``--dry-run``: each stage, its inputs and the command that would train it."""
    lines = []
    for stage in stages:
        needs = f"  (after {', '.join(stage.needs)})" if stage.needs else ""
        lines.append(f"{stage.name}{needs}\n    {shlex.join(stage_command(stage, launcher))}")
    return "\n".join(lines)
