"""Running the graph on this machine: in this process, or ``--parallel N`` stages at once as
subprocesses, or each through ``accelerate launch --config_file LAUNCHER``.

:func:`run` skips a stage whose folder already holds the finished run of the same recipe
(:func:`stage_state`); a failed stage stops its dependants, not its siblings. :func:`summary`,
:func:`exit_code` and :func:`describe_plan` (``--dry-run``) say what ran or would run.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nt_dist.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_RUN_ERROR, UserError, one_line, say
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
    the same recipe, trained against the model its input stage holds now; ``stale`` (with
    ``why``) when the folder's run learned against a model that has changed since
    (:mod:`nt_dist.run_inputs`); ``todo`` otherwise. A folder holding another recipe is a UserError."""
    from nt_dist.checkpoint import MODEL_FILE
    from nt_dist.config import load_recipe
    from nt_dist.rundir import folder_state

    recipe = load_recipe(stage.recipe, list(stage.overrides))
    state = folder_state(recipe, str(stage.recipe))
    if state.stale:
        return "stale", {"why": state.stale}
    if state.kind == "finished" and state.results and (stage.output_dir / MODEL_FILE).is_file():
        return "finished", dict(state.results.get("final", {}))
    return "todo", {}


def is_stale(stage: Stage) -> bool:
    """Whether the stage's folder holds a run trained against a model that has changed since
    (a folder of another recipe, or unreadable, is not called stale here: training says why)."""
    try:
        return stage_state(stage)[0] == "stale"
    except UserError:
        return False


def validate_stages(stages: list[Stage]) -> None:
    """Every stage's resolved recipe, checked before anything trains (the checks ``nt-dist
    check`` runs, less the frozen models that earlier stages will write): the first problem is
    one line naming the stage."""
    from nt_dist.config import load_recipe
    from nt_dist.preflight import check_networks, check_output_dir, check_tracking_uri

    checked: set[tuple[Any, ...]] = set()
    for stage in stages:
        try:
            recipe = load_recipe(stage.recipe, list(stage.overrides))
            networks = (recipe.model.name, recipe.distill.teacher, recipe.nasty.adversary, recipe.run.role,
                        recipe.distill.method, recipe.model.num_classes, recipe.data.image_size)
            if networks not in checked:  # a meta-device forward per distinct set of networks
                check_networks(recipe, str(stage.recipe))
                checked.add(networks)
            check_output_dir(Path(recipe.run.output_dir))
            if recipe.tracking.enabled and ("tracking", recipe.tracking.uri) not in checked:
                check_tracking_uri(recipe)
                checked.add(("tracking", recipe.tracking.uri))
        except UserError as exc:
            raise UserError(f"stage {stage.name}: {exc}") from None


def stage_command(stage: Stage, launcher: str) -> list[str]:
    """The command that trains ``stage`` in a fresh process (``python -m nt_dist.train`` or
    ``accelerate launch --config_file LAUNCHER -m nt_dist.train``)."""
    args = ["-m", "nt_dist.train", str(stage.recipe), *sum((["--set", o] for o in stage.overrides), [])]
    if launcher == "local":
        return [sys.executable, *args]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    # -q: a failed stage ends its log with the nt-dist: error: line, not the launcher's traceback
    return [accelerate, "launch", "-q", "--config_file", str(Path(launcher).resolve()), *args]


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


class Stopping:
    """A stop signal to the pipeline (SIGTERM, SIGUSR1, SIGINT) reaches every stage's process.

    Stage processes run in sessions of their own, so a Ctrl-C on the terminal reaches them once,
    through here, not twice (a second SIGINT stops a run without its checkpoint). On a signal
    no new stage starts; each running one is sent the same signal, checkpoints at its next step
    and exits (75, or 130 for SIGINT); :func:`run` then raises
    :class:`~nt_dist.errors.Preempted` naming their folders.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum
        with self._lock:
            children = list(self.children.values())
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    def start(self, command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            child = subprocess.Popen(command, start_new_session=True, **kwargs)
            self.children[child.pid] = child
        if self.signum:  # the signal came while it was starting
            child.send_signal(self.signum)
        return child

    def done(self, child: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self.children.pop(child.pid, None)


def _train_subprocess(stage: Stage, launcher: str, log: Path, parallel: int = 1,
                      stopping: Stopping | None = None) -> dict[str, Any]:
    """Train ``stage`` in its own process, its output appended to ``log`` (a rerun never
    truncates the log of a stage some other process may still be writing)."""
    from nt_dist.errors import Preempted, RunError

    stopping = stopping or Stopping()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as sink:
        sink.write(f"=== nt-dist pipeline: {time.strftime('%Y-%m-%d %H:%M:%S')} start {stage.name}\n")
        sink.flush()
        start = sink.tell()
        child = stopping.start(stage_command(stage, launcher), stdout=sink, stderr=subprocess.STDOUT,
                               env=stage_env(parallel))
        try:
            code = child.wait()
        finally:
            stopping.done(child)
    if code in (EXIT_PREEMPTED, EXIT_INTERRUPTED) and stopping.signum:
        raise Preempted(interrupted=code == EXIT_INTERRUPTED)
    if code != 0:
        with open(log, encoding="utf-8", errors="replace") as handle:
            handle.seek(start)
            lines = [line for line in handle.read().splitlines() if line.strip()]
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
    in this process, in order, their output on the terminal.

    Every stage's recipe is validated first (:func:`validate_stages`). A stage whose folder
    holds a run trained against a model its input stage has since replaced is *stale*: it is
    trained again and the old run moved aside (:mod:`nt_dist.run_inputs`). A stop signal
    reaches every running stage (:class:`Stopping`) and ends in :class:`~nt_dist.errors.Preempted`."""
    from nt_dist.errors import Preempted, RunError

    launcher = launcher or p.spec.launcher
    if launcher != "local" and not Path(launcher).is_file():
        raise UserError(f"{p.path}: launcher: {launcher} not found (local, or an accelerate config such as "
                        "cluster/single_gpu.yaml)")
    validate_stages(stages)
    outcomes = {s.name: Outcome(s) for s in stages}
    logs = output_root(stages) / "logs"
    separate = parallel > 1 or launcher != "local"
    stopping = Stopping()

    def one(stage: Stage) -> None:
        outcome = outcomes[stage.name]
        started = time.perf_counter()
        try:
            state, results = stage_state(stage)
            if state == "finished":
                outcome.status, outcome.results = "skipped", results
                return
            if state == "stale":
                echo(f"nt-dist pipeline: stale {stage.name}: {results['why']}; training it again "
                     "(the old run is moved aside)")
            echo(f"nt-dist pipeline: start {stage.name}")
            if separate:
                results = _train_subprocess(stage, launcher, logs / f"{stage.log_name}.log", parallel, stopping)
            else:
                results = _train_here(stage)
            outcome.status, outcome.results = "ran", results
        except (UserError, RunError) as exc:
            outcome.status, outcome.message = "failed", str(exc)
        except Preempted as exc:  # Ctrl-C or the scheduler: the stage checkpointed
            outcome.status, outcome.message = "stopped", str(stage.output_dir)
            if not separate:
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
        elif outcome.status == "ran":
            echo(f"nt-dist pipeline: done {stage.name}: top-1 {outcome.results.get('test_top1', float('nan')):.2f} "
                 f"({outcome.seconds:.0f} s)")

    def ready(stage: Stage) -> str:
        """``go``, ``wait`` or ``blocked`` (an input failed or was blocked)."""
        inputs = [outcomes[n].status for n in stage.needs]
        if any(s in ("failed", "blocked") for s in inputs):
            return "blocked"
        return "go" if all(s in ("ran", "skipped") for s in inputs) else "wait"

    pending = list(stages)
    stopping.install()
    try:
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            running: dict[Future[None], Stage] = {}
            while (pending and not stopping.signum) or running:
                for stage in list(pending):
                    if stopping.signum:
                        break
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
                elif pending and not stopping.signum and all(ready(s) == "wait" for s in pending):
                    raise RuntimeError("pipeline graph has a cycle or a missing stage")  # expand() makes neither
    finally:
        stopping.uninstall()
    if stopping.signum:
        stopped = [o.message for o in outcomes.values() if o.status == "stopped"]
        exc = Preempted(interrupted=stopping.signum == signal.SIGINT)
        exc.where = ", ".join(stopped)  # type: ignore[attr-defined]
        raise exc
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
