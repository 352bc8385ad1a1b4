"""Handing the graph to SLURM: :func:`submit_slurm` submits every unfinished stage with
``sbatch`` (resources from the stage's launcher config and the pipeline's ``slurm:`` block),
chained to its inputs' jobs with ``--dependency=afterok``, so the cluster's scheduler runs (and
requeues) the graph. The job ids go to ``<output_dir>/slurm_jobs.json``; a second submit asks
the scheduler about them and submits again only the stages whose job ended without success.

:func:`signal_job_workers` is the job script's preemption hand-off: USR1 to this job's training
processes on one node, and to nothing else.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from nt_dist.errors import UserError, one_line, say
from nt_dist.pipeline.graph import Stage, output_root
from nt_dist.pipeline.runners import stage_state, validate_stages
from nt_dist.pipeline.schema import Pipeline

CPUS_PER_GPU = 8  # --cpus-per-task per process of a node (data loading + the host side of the step)
DEFAULT_TIME = "24:00:00"  # sbatch --time when the slurm: block gives none
JOB_ID = re.compile(r"^\d+(_\d+)?$")  # what `sbatch --parsable` prints before an optional ";cluster"
JOBS_FILE = "slurm_jobs.json"
# scheduler states of a job that is queued, running or will run again: its stage is not submitted twice
LIVE = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                  "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "SPECIAL_EXIT", "RESV_DEL_HOLD"})
UNASKED = "?"  # neither squeue nor sacct on PATH: a recorded job is taken as live


def default_sbatch_script() -> Path:
    return Path(__file__).resolve().parents[2] / "cluster" / "slurm" / "train.sbatch"


# ----------------------------------------------------------------------------- resources


class Resources(NamedTuple):
    """One stage's job: its launcher config and what sbatch is asked for."""

    launcher: Path
    nodes: int
    processes_per_node: int  # accelerate processes on each node ($NT_GPUS_PER_NODE of the job script)
    gpus_per_node: int
    cpus_per_task: int
    time: str
    partition: str | None
    account: str | None

    def sbatch_options(self) -> list[str]:
        options = [f"--nodes={self.nodes}", "--ntasks-per-node=1"]
        if self.gpus_per_node:
            options.append(f"--gpus-per-node={self.gpus_per_node}")
        options += [f"--cpus-per-task={self.cpus_per_task}", f"--time={self.time}"]
        return options + [f"--{key}={value}" for key, value in (("partition", self.partition),
                                                               ("account", self.account)) if value]


def launcher_layout(path: Path) -> tuple[int, int, int]:
    """``(nodes, processes per node, GPUs per node)`` of an accelerate config: ``num_machines``,
    ``num_processes`` (else the count of ``gpu_ids``) spread over them; no GPU under ``use_cpu``."""
    from nt_dist.yamlio import read_yaml_file

    tree, _ = read_yaml_file(path, "accelerate config")
    if not isinstance(tree, dict):
        raise UserError(f"{path}: not an accelerate config (expected a mapping with num_processes)")
    ids = tree.get("gpu_ids")
    counted = len(str(ids).split(",")) if ids not in (None, "", "all") else 1
    numbers = {}
    for key, default in (("num_machines", 1), ("num_processes", counted)):
        value = tree.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{path}: {key}: expected a positive integer, got {value!r}")
        numbers[key] = value
    nodes = numbers["num_machines"]
    per_node = math.ceil(numbers["num_processes"] / nodes)
    cpu = tree.get("use_cpu") is True or tree.get("distributed_type") == "MULTI_CPU"
    return nodes, per_node, 0 if cpu else per_node


def stage_resources(p: Pipeline, stage: Stage, launcher: str) -> Resources:
    """The pipeline's ``slurm:`` keys, then its ``slurm.stages`` entry for the stage's kind, then
    the one for its entry (``teachers.<label>``, ``students.<label>``...); what none gives comes
    from the launcher config (``slurm.stages.*.launcher``, else ``launcher``)."""
    slurm = p.spec.slurm
    entry = {"teacher": f"teachers.{stage.row}", "nasty": f"nasty.{stage.row}"}.get(stage.kind,
                                                                                    f"students.{stage.column}")
    chosen: dict[str, Any] = slurm.model_dump(exclude_none=True, exclude={"stages"})
    key = "launcher"
    for name in (stage.kind, entry):
        if name in slurm.stages:
            given = slurm.stages[name].model_dump(exclude_none=True)
            chosen.update(given)
            key = f"slurm.stages.{name}.launcher" if "launcher" in given else key
    launcher = chosen.get("launcher", launcher)
    if launcher == "local":
        raise UserError(f"{p.path}: launcher: --submit slurm needs an accelerate config for each job, e.g. "
                        "--launcher cluster/single_gpu.yaml (or cluster/multi_node.yaml)")
    if not Path(launcher).is_file():
        raise UserError(f"{p.path}: {key}: {launcher} not found")
    nodes, per_node, gpus = launcher_layout(Path(launcher))
    gpus = chosen.get("gpus_per_node", gpus)
    per_node = gpus or per_node  # the GPUs asked for set the processes a node runs
    return Resources(Path(launcher).resolve(), chosen.get("nodes", nodes), per_node, gpus,
                     chosen.get("cpus_per_task", CPUS_PER_GPU * per_node), chosen.get("time", DEFAULT_TIME),
                     chosen.get("partition"), chosen.get("account"))


# ----------------------------------------------------------------------------- the record and the scheduler


def read_jobs(root: Path) -> dict[str, str]:
    """The stage -> job id record of earlier submits ({} when there is none)."""
    path = root / JOBS_FILE
    if not path.exists():
        return {}
    try:
        jobs = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({one_line(str(exc))}); it records the jobs of earlier submits: "
                        "fix it, or remove it to submit every unfinished stage again") from None
    if not isinstance(jobs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in jobs.items()):
        raise UserError(f"{path}: expected a JSON mapping of stage name to job id; fix it, or remove it to "
                        "submit every unfinished stage again")
    return jobs


def _write_jobs(root: Path, jobs: dict[str, str]) -> None:
    from nt_dist.fileio import atomic_write_text

    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / JOBS_FILE, json.dumps(jobs, indent=1) + "\n")


def job_state(job: str) -> str:
    """The scheduler's state of a job (``PENDING``, ``FAILED``...): ``squeue`` while the controller
    knows it, else ``sacct``; ``""`` when neither knows it, :data:`UNASKED` when neither is on PATH."""
    squeue, sacct = shutil.which("squeue"), shutil.which("sacct")
    if squeue is None and sacct is None:
        return UNASKED
    for tool, command in ((squeue, ["-h", "-j", job, "-o", "%T"]), (sacct, ["-n", "-X", "-j", job, "-o", "State%30"])):
        if tool is None:
            continue
        try:
            proc = subprocess.run([tool, *command], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        words = proc.stdout.split() if proc.returncode == 0 else []
        if words:  # sacct: "CANCELLED by 1000"; a state cut to its column ends in "+"
            return words[0].rstrip("+").upper()
    return ""


# ----------------------------------------------------------------------------- submitting


def submit_slurm(p: Pipeline, stages: list[Stage], *, launcher: str | None = None,
                 script: Path | None = None, echo: Callable[[str], None] = say) -> dict[str, str]:
    """Submit every stage that is neither finished nor already queued, each chained to its inputs'
    jobs with ``--dependency=afterok`` (and ``--kill-on-invalid-dep=yes``, so a failed input
    cancels its dependants instead of leaving them pending). Returns stage name -> job id of the
    jobs submitted now; ``<output_dir>/slurm_jobs.json`` keeps those of earlier submits too. A
    recorded job the scheduler shows queued, running or completed is not submitted again (its
    dependants wait on it); one that failed, was cancelled or timed out is. One line per stage."""
    launcher = launcher or p.spec.launcher
    script = script or default_sbatch_script()
    resources = {stage.name: stage_resources(p, stage, launcher) for stage in stages}
    if not script.is_file():
        raise UserError(f"{script}: the SLURM job script is missing (pass --sbatch-script)")
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("sbatch: not found on PATH (--submit slurm runs on a SLURM login node)")
    validate_stages(stages)
    warn_shared_store(stages, echo)
    root = output_root(stages)
    record = read_jobs(root)
    states = {s.name: job_state(record[s.name]) for s in stages if s.name in record}
    if UNASKED in states.values():
        echo(f"nt-dist pipeline: neither squeue nor sacct is on PATH: the {len(states)} jobs recorded in "
             f"{root / JOBS_FILE} are taken as still queued or running (not submitted again)")
    submitted: dict[str, str] = {}
    live: dict[str, str] = {}  # recorded jobs still queued or running: dependants wait on them
    for stage in stages:
        old, state = record.get(stage.name), states.get(stage.name, "")
        renewed = any(n in submitted for n in stage.needs)  # an input is trained again: so is this stage
        if old and not renewed and (state in LIVE or state in (UNASKED, "COMPLETED")):
            if state != "COMPLETED":
                live[stage.name] = old
            echo(f"nt-dist pipeline: skip {stage.name} (job {old} "
                 f"{'recorded, its state not asked' if state == UNASKED else state})")
            continue
        # a finished stage whose input is trained again is submitted too: its job (run.stale:
        # replace) trains it again if the new model differs, and ends at once if it does not
        if stage_state(stage)[0] == "finished" and not any(n in submitted or n in live for n in stage.needs):
            echo(f"nt-dist pipeline: skip {stage.name} (already finished)")
            continue
        after = [submitted.get(n) or live[n] for n in stage.needs if n in submitted or n in live]
        job = _sbatch(sbatch, p, stage, resources[stage.name], script, after, root, {**record, **submitted})
        submitted[stage.name] = job
        again = f" (job {old} {state or 'unknown to squeue and sacct'}: submitted again)" if old else ""
        echo(f"nt-dist pipeline: job {job} {stage.name}" + (f" after {','.join(after)}" if after else "") + again)
        _write_jobs(root, {**record, **submitted})
    _write_jobs(root, {**record, **submitted})
    return submitted


def _sbatch(sbatch: str, p: Pipeline, stage: Stage, res: Resources, script: Path, after: list[str], root: Path,
            jobs: dict[str, str]) -> str:
    """Submit one stage; its job id, or a UserError (after writing the record so far)."""
    command = [sbatch, "--parsable", "--export=ALL", f"--job-name={p.name}/{stage.name}",
               f"--output={(root / 'logs').resolve()}/{stage.log_name}-%j.out", *res.sbatch_options()]
    if after:
        command += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
    command += [str(script), str(stage.recipe), *sum((["--set", o] for o in stage.overrides), [])]
    (root / "logs").mkdir(parents=True, exist_ok=True)
    # the job runs the interpreter (and so the nt_dist and accelerate) that submitted it
    env = {**os.environ, "NT_ACCELERATE_CONFIG": str(res.launcher), "NT_PYTHON": sys.executable,
           "NT_GPUS_PER_NODE": str(res.processes_per_node)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    so_far = f"submitted so far: {len(jobs)}, listed in {root / JOBS_FILE}"
    if proc.returncode != 0:
        _write_jobs(root, jobs)  # what was submitted before the refusal, even if nothing
        raise UserError(f"sbatch refused {stage.name}: {one_line(proc.stderr or proc.stdout)} ({so_far})")
    job = proc.stdout.strip().split(";")[0]
    if not JOB_ID.match(job):
        _write_jobs(root, jobs)
        raise UserError(f"sbatch answered {stage.name} with {one_line(proc.stdout)!r}, not a job id (expected "
                        f"e.g. 1001 or 1001;cluster from --parsable) ({so_far})")
    return job


def warn_shared_store(stages: list[Stage], echo: Callable[[str], None] = say) -> None:
    """One warning when a stage would track to a SQLite or file store: the jobs of many nodes
    writing one such file at once lock it or lose runs; a tracking server takes them in turn."""
    from nt_dist.config import load_recipe
    from nt_dist.tracking import tracking_uri

    for stage in stages:
        cfg = load_recipe(stage.recipe, list(stage.overrides)).tracking
        uri = tracking_uri(cfg)
        scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
        if cfg.enabled and (scheme in ("sqlite", "file", "") or len(scheme) == 1):
            echo(f"nt-dist: warning: --submit slurm: tracking goes to {uri}, one SQLite/file store that the jobs "
                 "of many nodes would write at once (locked or lost runs); run `mlflow server --backend-store-uri "
                 "sqlite:///mlflow.db --host 0.0.0.0 --port 5000` on the login node and set tracking.uri (or "
                 "MLFLOW_TRACKING_URI) to http://<login node>:5000")
            return


# ----------------------------------------------------------------------------- preemption, in the job


def _runs_training(argv: list[str]) -> bool:
    """Whether a command line is an interpreter running ``-m nt_dist.train`` (a worker), not one
    that only passes it on (``python -m accelerate.commands.launch ... -m nt_dist.train``)."""
    words = iter(argv[1:])
    for word in words:
        if word == "-m":
            return next(words, "") == "nt_dist.train"
        if word in ("-X", "-W"):  # interpreter options with a value
            next(words, "")
        elif not word.startswith("-") or word == "-c":
            return False
    return False


def job_workers(job_id: str, proc: Path = Path("/proc")) -> list[int]:
    """The pids on this node that run ``-m nt_dist.train`` with ``SLURM_JOB_ID=<job_id>`` in their
    environment (inherited from the job step that launched them; another user's are unreadable)."""
    tag = f"SLURM_JOB_ID={job_id}".encode()
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if tag not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            argv = [w.decode(errors="replace") for w in (entry / "cmdline").read_bytes().split(b"\0")[:-1]]
        except OSError:  # gone, or not ours
            continue
        if _runs_training(argv):
            pids.append(int(entry.name))
    return pids


def signal_job_workers(args: list[str]) -> int:
    """``JOB_ID SIGNAL``: send SIGNAL (e.g. USR1) to :func:`job_workers`; what the job script's
    preemption trap runs on each node. Exit 0, also when no worker is there (it has ended)."""
    job_id, name = args
    signum = signal.Signals[f"SIG{name.upper().removeprefix('SIG')}"]
    for pid in job_workers(job_id):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            continue
        say(f"nt-dist: {signum.name} -> training process {pid} of job {job_id}")
    return 0
