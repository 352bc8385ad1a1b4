"""`nt-dist pipeline --submit slurm` against stand-in `sbatch`/`squeue`/`sacct`, and the job
script's preemption hand-off (USR1 to this job's training processes only) on real processes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from nt_dist import pipeline
from nt_dist.errors import UserError
from nt_dist.pipeline.slurm import job_workers, signal_job_workers

CIFAR10 = REPO / "recipes" / "paper" / "cifar10"
TEACHER, STUDENT = "seed0/teacher/resnet-18-normal", "seed0/student/cnn/resnet-18-normal"


def executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `sbatch` that records one JSON line per call (its arguments and the variables the job
    script reads) and answers `--parsable` ids 100, 101, ... (or the text in `answer`, if any)."""
    folder = tmp_path / "bin"
    executable(folder / "sbatch", f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
log, answer = Path({str(tmp_path / 'sbatch.jsonl')!r}), Path({str(folder / 'answer')!r})
calls = log.read_text().splitlines() if log.exists() else []
env = {{k: os.environ.get(k) for k in ("NT_PYTHON", "NT_ACCELERATE_CONFIG", "NT_GPUS_PER_NODE")}}
with log.open("a") as f:
    f.write(json.dumps({{"args": sys.argv[1:], **env}}) + "\\n")
print(answer.read_text() if answer.exists() else f"{{100 + len(calls)}};cluster")
""")
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    return folder


def fake_squeue(bin_dir: Path, states: dict[str, str]) -> None:
    """A `squeue -h -j ID -o %T` that knows the given jobs (and errors for others, as squeue does)."""
    table = " ".join(f"[{job}]={state}" for job, state in states.items())
    executable(bin_dir / "squeue", f"""#!/bin/bash
declare -A states=({table})
while [ $# -gt 0 ]; do [ "$1" = -j ] && job=$2; shift; done
[ -n "${{states[$job]:-}}" ] || {{ echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; }}
echo "${{states[$job]}}"
""")


def calls(tmp_path: Path) -> list[dict]:
    log = tmp_path / "sbatch.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def mixed_pipeline(tmp_path: Path, **changes) -> Path:
    """A ResNet-18 teacher on the 8 GPUs of cluster/multi_gpu.yaml (the file's launcher) and a
    CNN student on cluster/single_gpu.yaml (its slurm.stages entry)."""
    tree = {
        "pipeline": "mixed", "output_dir": str(tmp_path / "runs"), "launcher": str(REPO / "cluster/multi_gpu.yaml"),
        "teachers": {"ResNet-18 normal": {"recipe": str(CIFAR10 / "teacher.yaml")}},
        "students": {"CNN": {"recipe": str(CIFAR10 / "student_cnn.yaml"), "baseline": False}},
        "slurm": {"partition": "gpu", "stages": {"student": {"launcher": str(REPO / "cluster/single_gpu.yaml")},
                                                 "students.CNN": {"time": "02:00:00"}}},
    }
    tree.update(changes)
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def submit(path: Path, lines: list[str] | None = None) -> dict[str, str]:
    p = pipeline.load_pipeline(path)
    return pipeline.submit_slurm(p, pipeline.expand(p), echo=(lines if lines is not None else []).append)


def test_each_stage_asks_for_what_its_launcher_runs_and_the_job_runs_this_interpreter(tmp_path: Path,
                                                                                         bin_dir: Path):
    lines: list[str] = []
    assert submit(mixed_pipeline(tmp_path), lines) == {TEACHER: "100", STUDENT: "101"}
    teacher, student = calls(tmp_path)
    assert "--nodes=1 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64 --time=24:00:00 --partition=gpu" \
        in " ".join(teacher["args"])
    # the student's entry gives the time, its kind's entry the launcher, the pipeline the partition
    assert "--nodes=1 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=8 --time=02:00:00 --partition=gpu" \
        in " ".join(student["args"])
    assert "--dependency=afterok:100" in student["args"]
    assert (teacher["NT_ACCELERATE_CONFIG"], student["NT_ACCELERATE_CONFIG"]) == \
        (str(REPO / "cluster/multi_gpu.yaml"), str(REPO / "cluster/single_gpu.yaml"))
    assert (teacher["NT_GPUS_PER_NODE"], student["NT_GPUS_PER_NODE"]) == ("8", "1")
    assert teacher["NT_PYTHON"] == student["NT_PYTHON"] == sys.executable
    assert lines[-2:] == [f"nt-dist pipeline: job 100 {TEACHER}", f"nt-dist pipeline: job 101 {STUDENT} after 100"]
    # the tests' SQLite store (MLFLOW_TRACKING_URI): one warning, naming the server to run instead
    warnings = [line for line in lines if line.startswith("nt-dist: warning:")]
    assert len(warnings) == 1 and "mlflow server --backend-store-uri sqlite:///mlflow.db --host 0.0.0.0" in warnings[0]
    assert "tracking.uri (or MLFLOW_TRACKING_URI)" in warnings[0]


def test_the_job_script_runs_the_submitting_interpreter_and_signals_no_stranger():
    text = (REPO / "cluster/slurm/train.sbatch").read_text()
    assert "pkill" not in text and "killall" not in text
    assert 'exec "$NT_PYTHON" -m accelerate.commands.launch' in text and "NT_PYTHON=${NT_PYTHON:-python3}" in text
    # resources come from the command line: a CPU or 1-GPU stage is not given 2 nodes x 8 GPUs
    assert not [line for line in text.splitlines() if line.startswith(("#SBATCH --nodes", "#SBATCH --gpus",
                                                                        "#SBATCH --cpus", "#SBATCH --time"))]
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--config_file" in proc.stdout


def test_a_second_submit_leaves_queued_jobs_alone(tmp_path: Path, bin_dir: Path):
    path = mixed_pipeline(tmp_path)
    submit(path)
    fake_squeue(bin_dir, {"100": "RUNNING", "101": "PENDING"})
    lines: list[str] = []
    assert submit(path, lines) == {}
    assert len(calls(tmp_path)) == 2
    assert lines[-2:] == [f"nt-dist pipeline: skip {TEACHER} (job 100 RUNNING)",
                          f"nt-dist pipeline: skip {STUDENT} (job 101 PENDING)"]


def test_a_failed_job_is_submitted_again_and_its_dependant_after_it(tmp_path: Path, bin_dir: Path):
    path = mixed_pipeline(tmp_path)
    submit(path)
    fake_squeue(bin_dir, {"100": "FAILED", "101": "CANCELLED"})
    lines: list[str] = []
    assert submit(path, lines) == {TEACHER: "102", STUDENT: "103"}
    assert "--dependency=afterok:102" in calls(tmp_path)[3]["args"]
    assert lines[-2:] == [f"nt-dist pipeline: job 102 {TEACHER} (job 100 FAILED: submitted again)",
                          f"nt-dist pipeline: job 103 {STUDENT} after 102 (job 101 CANCELLED: submitted again)"]
    assert json.loads((tmp_path / "runs/slurm_jobs.json").read_text()) == {TEACHER: "102", STUDENT: "103"}


def test_a_live_input_is_waited_on_and_earlier_records_are_kept(tmp_path: Path, bin_dir: Path):
    path = mixed_pipeline(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/slurm_jobs.json").write_text(json.dumps({TEACHER: "7", "seed1/teacher/other": "8"}))
    fake_squeue(bin_dir, {"7": "PENDING"})
    lines: list[str] = []
    assert submit(path, lines) == {STUDENT: "100"}
    assert "--dependency=afterok:7" in calls(tmp_path)[0]["args"]
    assert lines[-1] == f"nt-dist pipeline: job 100 {STUDENT} after 7"
    assert json.loads((tmp_path / "runs/slurm_jobs.json").read_text()) == {
        TEACHER: "7", "seed1/teacher/other": "8", STUDENT: "100"}


def test_sacct_answers_for_jobs_the_controller_forgot(tmp_path: Path, bin_dir: Path):
    path = mixed_pipeline(tmp_path)
    submit(path)
    fake_squeue(bin_dir, {})
    executable(bin_dir / "sacct", '#!/bin/bash\n[ "$4" = 100 ] && echo "  COMPLETED " || echo "OUT_OF_ME+"\n')
    lines: list[str] = []
    assert submit(path, lines) == {STUDENT: "102"}
    assert lines[-2:] == [f"nt-dist pipeline: skip {TEACHER} (job 100 COMPLETED)",
                          f"nt-dist pipeline: job 102 {STUDENT} (job 101 OUT_OF_ME: submitted again)"]


def test_without_squeue_and_sacct_recorded_jobs_count_as_live(tmp_path: Path, bin_dir: Path):
    path = mixed_pipeline(tmp_path)
    submit(path)
    lines: list[str] = []
    assert submit(path, lines) == {}
    assert sum("neither squeue nor sacct is on PATH" in line for line in lines) == 1
    assert lines[-1] == f"nt-dist pipeline: skip {STUDENT} (job 101 recorded, its state not asked)"


def test_a_tracking_server_gets_no_warning(tmp_path: Path, bin_dir: Path):
    lines: list[str] = []
    submit(mixed_pipeline(tmp_path, set={"tracking.uri": "http://login-node:5000"}), lines)
    assert not [line for line in lines if "warning" in line]


@pytest.mark.parametrize("answer", ["Submitted batch job 100", "", "100\n101", "12a;cluster"])
def test_a_reply_that_is_no_job_id_is_refused(tmp_path: Path, bin_dir: Path, answer: str):
    (bin_dir / "answer").write_text(answer)
    with pytest.raises(UserError, match=f"^sbatch answered {TEACHER} with .*, not a job id"):
        submit(mixed_pipeline(tmp_path))
    assert json.loads((tmp_path / "runs/slurm_jobs.json").read_text()) == {}


def test_array_ids_and_cluster_suffixes_are_job_ids(tmp_path: Path, bin_dir: Path):
    (bin_dir / "answer").write_text("1001_3;cluster")
    assert submit(mixed_pipeline(tmp_path))[TEACHER] == "1001_3"


def test_the_slurm_block_is_checked_in_one_line(tmp_path: Path):
    def refused(slurm: dict, match: str) -> None:
        with pytest.raises(UserError, match=match):
            pipeline.load_pipeline(mixed_pipeline(tmp_path, slurm=slurm))

    refused({"qos": "high"}, r"mixed\.yaml: slurm\.qos: unknown key; expected one of: nodes, gpus_per_node, ")
    refused({"stages": {"teacher": {"mem": "4G"}}}, r"slurm\.stages\.teacher\.mem: unknown key; expected one of: ")
    refused({"stages": {"students.MLP": {}}}, r"slurm\.stages\.students\.MLP: not a stage kind")
    refused({"stages": {"teacher": {"launcher": "local"}}}, r"slurm\.stages\.teacher\.launcher: .* not local")
    refused({"time": 43200}, r"slurm\.time: 43200 is a number; write sbatch's time as quoted text")
    refused({"time": "soon"}, r"slurm\.time: 'soon': expected sbatch's")
    refused({"nodes": 0}, r"slurm\.nodes: input should be greater than or equal to 1")
    # sbatch's own spelling is accepted
    spec = pipeline.load_pipeline(mixed_pipeline(tmp_path, slurm={"gpus-per-node": 2, "cpus-per-task": 4}))
    assert (spec.spec.slurm.gpus_per_node, spec.spec.slurm.cpus_per_task) == (2, 4)


def test_a_missing_stage_launcher_is_named(tmp_path: Path, bin_dir: Path):
    path = mixed_pipeline(tmp_path, slurm={"stages": {"teacher": {"launcher": "cluster/none.yaml"}}})
    with pytest.raises(UserError, match=r"mixed\.yaml: slurm\.stages\.teacher\.launcher: cluster/none\.yaml not found"):
        submit(path)
    assert not calls(tmp_path)


def test_launcher_layouts(tmp_path: Path):
    from nt_dist.pipeline.slurm import launcher_layout

    assert launcher_layout(REPO / "cluster/single_gpu.yaml") == (1, 1, 1)
    assert launcher_layout(REPO / "cluster/multi_node.yaml") == (2, 8, 8)
    assert launcher_layout(REPO / "cluster/deepspeed_zero2.yaml") == (1, 8, 8)
    config = tmp_path / "cpu.yaml"
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 4\n")
    assert launcher_layout(config) == (1, 4, 0)
    config.write_text("num_machines: two\n")
    with pytest.raises(UserError, match=r"cpu\.yaml: num_machines: expected a positive integer, got 'two'"):
        launcher_layout(config)


# ----------------------------------------------------------------------------- preemption on one node

DECOY_TRAIN = """import signal, sys, time
from pathlib import Path
mark = Path(sys.argv[1])
signal.signal(signal.SIGUSR1, lambda *_: (mark.write_text("USR1"), sys.exit(0)))
mark.with_suffix(".ready").touch()
time.sleep(120)
"""


def test_usr1_reaches_this_jobs_workers_only(tmp_path: Path):
    """Real processes: a stand-in `nt_dist.train` (first on PYTHONPATH) run as a worker of this
    job, as one of another job and as one outside SLURM; and a launcher-like process of this job
    whose command line passes `-m nt_dist.train` on. Only the first gets USR1."""
    (tmp_path / "shadow/nt_dist").mkdir(parents=True)
    (tmp_path / "shadow/nt_dist/__init__.py").write_text("")
    (tmp_path / "shadow/nt_dist/train.py").write_text(DECOY_TRAIN)
    job = str(5_000_000 + os.getpid())
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    env["PYTHONPATH"] = str(tmp_path / "shadow")
    started = {}
    for name, job_env in (("ours", job), ("other", "1"), ("outside", None)):
        started[name] = subprocess.Popen([sys.executable, "-u", "-m", "nt_dist.train", str(tmp_path / name)],
                                         cwd=tmp_path, env={**env, **({"SLURM_JOB_ID": job_env} if job_env else {})})
    started["launcher"] = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "-m", "nt_dist.train"], env={**env, "SLURM_JOB_ID": job})
    try:
        deadline = time.time() + 60
        while not all((tmp_path / f"{n}.ready").exists() for n in ("ours", "other", "outside")):
            assert time.time() < deadline, "the stand-in workers did not start"
            time.sleep(0.05)
        assert job_workers(job) == [started["ours"].pid]
        assert signal_job_workers([job, "USR1"]) == 0
        assert started["ours"].wait(timeout=30) == 0 and (tmp_path / "ours").read_text() == "USR1"
        time.sleep(0.5)
        assert all(started[n].poll() is None for n in ("other", "outside", "launcher"))
        assert not (tmp_path / "other").exists() and not (tmp_path / "outside").exists()
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
