"""Handing the graph to SLURM: :func:`submit_slurm` submits every unfinished stage with
``sbatch``, chained to its inputs' jobs with ``--dependency=afterok``, so the cluster's
scheduler runs (and requeues) the graph; the job ids go to ``<output_dir>/slurm_jobs.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from nt_dist.errors import UserError, one_line, say
from nt_dist.pipeline.graph import Stage, output_root
from nt_dist.pipeline.runners import stage_state, validate_stages
from nt_dist.pipeline.schema import Pipeline


def default_sbatch_script() -> Path:
    return Path(__file__).resolve().parents[2] / "cluster" / "slurm" / "train.sbatch"


def submit_slurm(p: Pipeline, stages: list[Stage], *, launcher: str | None = None,
                 script: Path | None = None, echo: Callable[[str], None] = say) -> dict[str, str]:
    """Submit every unfinished stage with ``sbatch``, each chained to its inputs' jobs with
    ``--dependency=afterok`` (and ``--kill-on-invalid-dep=yes``, so a failed input cancels its
    dependants instead of leaving them pending). Returns stage name -> job id, also written to
    ``<output_dir>/slurm_jobs.json``. The cluster runs, requeues and shows the graph."""
    launcher = launcher or p.spec.launcher
    script = script or default_sbatch_script()
    if launcher == "local":
        raise UserError(f"{p.path}: launcher: --submit slurm needs an accelerate config for each job, e.g. "
                        "--launcher cluster/single_gpu.yaml (or cluster/multi_node.yaml)")
    if not Path(launcher).is_file():
        raise UserError(f"{p.path}: launcher: {launcher} not found")
    if not script.is_file():
        raise UserError(f"{script}: the SLURM job script is missing (pass --sbatch-script)")
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("sbatch: not found on PATH (--submit slurm runs on a SLURM login node)")
    validate_stages(stages)
    root = output_root(stages)
    jobs: dict[str, str] = {}
    for stage in stages:
        # a finished stage whose input is trained again is submitted too: its job (run.stale:
        # replace) trains it again if the new model differs, and ends at once if it does not
        if stage_state(stage)[0] == "finished" and not any(n in jobs for n in stage.needs):
            echo(f"nt-dist pipeline: skip {stage.name} (already finished)")
            continue
        after = [jobs[n] for n in stage.needs if n in jobs]
        options = [f"--{k}={v}" for k, v in p.spec.slurm.items()]
        command = [sbatch, "--parsable", f"--job-name={p.name}/{stage.name}",
                   f"--output={(root / 'logs').resolve()}/{stage.log_name}-%j.out", *options]
        if after:
            command += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
        command += [str(script), str(stage.recipe), *sum((["--set", o] for o in stage.overrides), [])]
        (root / "logs").mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "NT_ACCELERATE_CONFIG": str(Path(launcher).resolve())})
        job = proc.stdout.strip().split(";")[0]
        if proc.returncode != 0 or not job:
            _write_jobs(root, jobs)  # what was submitted before the refusal, even if nothing
            raise UserError(f"sbatch refused {stage.name}: {one_line(proc.stderr or proc.stdout)} "
                            f"(submitted so far: {len(jobs)}, listed in {root / 'slurm_jobs.json'})")
        jobs[stage.name] = job
        echo(f"nt-dist pipeline: job {job} {stage.name}" + (f" after {','.join(after)}" if after else ""))
        _write_jobs(root, jobs)
    _write_jobs(root, jobs)
    return jobs


def _write_jobs(root: Path, jobs: dict[str, str]) -> None:
    from nt_dist.fileio import atomic_write_text

    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "slurm_jobs.json", json.dumps(jobs, indent=1) + "\n")
