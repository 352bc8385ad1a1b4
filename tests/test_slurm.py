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
    assert launcher_layout(REPO / "cluster/deepspeed_zero2_multi_node.yaml") == (2, 8, 8)
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


# ----------------------------------------------------------------------------- 2 nodes x 8 GPUs

SLURM_DIR = REPO / "cluster" / "slurm"
TEMPLATE = SLURM_DIR / "multinode_2x8.sbatch"
PREEMPTION = ("signal", "requeue", "open-mode", "output")  # train.sbatch's directives for the requeue chain
NCCL = ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_IB_DISABLE", "NCCL_NET_GDR_LEVEL", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def directives(path: Path, prefix: str = "#SBATCH") -> dict[str, str | None]:
    """The ``prefix --key[=value]`` lines of a job script before its first command (sbatch
    stops reading directives there), as key -> value (None for a flag); a directive after it fails."""
    found: dict[str, str | None] = {}
    body = False
    for line in path.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            body = True
        elif line.startswith(prefix + " "):
            assert not body, f"{path.name}: {line!r} comes after the first command: sbatch ignores it"
            option = line.removeprefix(prefix + " ").strip()
            assert option.startswith("--") and option not in found, line
            key, _, value = option[2:].partition("=")
            found[key] = value or None
    return found


def exports(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``export NAME=VALUE`` lines of a script: (those it runs, those left commented out)."""
    active, commented = {}, {}
    for line in path.read_text().splitlines():
        text = line.strip()
        target = commented if text.startswith("#") else active
        text = text.lstrip("#").strip()
        if text.startswith("export ") and "=" in text:
            name, value = text.removeprefix("export ").split("=", 1)
            target.setdefault(name, value.split()[0])
    return active, commented


@pytest.mark.parametrize("script", ["train.sbatch", "multinode_2x8.sbatch"])
def test_the_job_scripts_are_valid_bash(script: str):
    proc = subprocess.run(["bash", "-n", str(SLURM_DIR / script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_the_2x8_template_asks_for_two_whole_nodes_of_8_gpus():
    assert directives(TEMPLATE) == {
        "job-name": "nt-dist-2x8", "nodes": "2", "ntasks-per-node": "1", "gpus-per-node": "8",
        "cpus-per-task": "64", "mem": "0", "exclusive": None, "time": "24:00:00",
        "signal": "B:USR1@300", "requeue": None, "open-mode": "append", "output": "nt-dist-%x-%j.out"}
    # sbatch reads the submitted file's directives only: train.sbatch's preemption chain needs its own here
    train = directives(SLURM_DIR / "train.sbatch")
    assert {k: train[k] for k in PREEMPTION} == {k: directives(TEMPLATE)[k] for k in PREEMPTION}
    # the cluster's own, for the user to fill in (## is not a directive)
    assert directives(TEMPLATE, "##SBATCH") == {"partition": "PARTITION", "account": "ACCOUNT"}
    # 8 CPUs per GPU, what `nt-dist pipeline --submit slurm` asks for
    from nt_dist.pipeline.slurm import CPUS_PER_GPU

    assert int(directives(TEMPLATE)["cpus-per-task"]) == CPUS_PER_GPU * int(directives(TEMPLATE)["gpus-per-node"])


def test_the_2x8_template_leaves_nccl_to_the_cluster_but_its_log_level():
    active, commented = exports(TEMPLATE)
    assert active == {"NCCL_DEBUG": "${NCCL_DEBUG:-WARN}"}
    assert set(NCCL) <= set(commented)
    # each, once uncommented, still gives way to what the user's shell or the cluster set
    assert all(value.startswith(f"${{{name}:-") for name, value in commented.items()), commented
    assert commented["NCCL_IB_DISABLE"] == "${NCCL_IB_DISABLE:-1}"
    # the launch line lives in train.sbatch alone: the template runs it
    text = TEMPLATE.read_text()
    assert "accelerate.commands.launch" not in text and text.rstrip().endswith('exec bash "$train" "$@"')


FAKE_PYTHON = """#!/bin/bash
# $NT_PYTHON here. `-c CODE JOB USR1` (the preemption hand-off, once per node) leaves a mark; the
# launch line records its node's arguments and environment, waits for the mark as a training
# process waits for USR1, and exits 75 as a checkpointed one does.
dir={records}
if [ "$1" = -c ]; then touch "$dir/preempted"; exit 0; fi
env -0 > "$dir/node$SLURM_NODEID.env"
printf '%s\\0' "$@" > "$dir/tmp$SLURM_NODEID" && mv "$dir/tmp$SLURM_NODEID" "$dir/node$SLURM_NODEID.argv"
for ((i = 0; i < 600; i++)); do [ -e "$dir/preempted" ] && exit 75; sleep 0.1; done
exit 1
"""


def run_job(tmp_path: Path, script: Path, nodes: int, **env: str) -> tuple[str, list[dict], list[dict]]:
    """``script RECIPE --set run.epochs=3`` as SLURM runs it on ``nodes`` nodes of 8 GPUs and 64
    CPUs (stand-in srun, scontrol and interpreter), sent USR1 once every node has launched:
    its stderr, and per node the launcher's options and environment. The job must requeue itself."""
    from test_cluster import JOB_VARIABLES, fake_slurm

    records = tmp_path / "records"
    records.mkdir()
    fake_slurm(tmp_path / "bin", tmp_path / "scontrol.log", hosts=("gpu017", "gpu018"))
    executable(tmp_path / "bin" / "python", FAKE_PYTHON.format(records=records))
    job_id = str(6_000_000 + os.getpid())
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_")) and k not in JOB_VARIABLES}
    base.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)
    base.update({"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "NT_PYTHON": str(tmp_path / "bin" / "python"),
                 "SLURM_NNODES": str(nodes), "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "gpu[017-018]",
                 "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64", **env})
    job = subprocess.Popen(["bash", str(script), "recipes/digits_teacher.yaml", "--set", "run.epochs=3"], cwd=REPO,
                           env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while len(list(records.glob("node*.argv"))) < nodes:
            if job.poll() is not None or time.time() > deadline:
                job.kill()
                pytest.fail(f"not every node launched:\n{job.communicate()[1]}")
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)  # `#SBATCH --signal=B:USR1@300`: to the batch script's process
        _, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, stderr
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", job_id]
    launches, environments = [], []
    for node in range(nodes):
        argv = (records / f"node{node}.argv").read_text().split("\0")[:-1]
        assert argv[:2] == ["-m", "accelerate.commands.launch"], argv
        end = argv.index("-m", 2)
        assert argv[end:] == ["-m", "nt_dist.train", "recipes/digits_teacher.yaml", "--set", "run.epochs=3"], argv
        options = argv[2:end]
        names = options[::2]
        assert all(o.startswith("--") for o in names) and len(set(names)) == len(names), options
        launches.append(dict(zip(names, options[1::2], strict=True)))
        pairs = (records / f"node{node}.env").read_text().split("\0")[:-1]
        environments.append(dict(pair.split("=", 1) for pair in pairs))
    return stderr, launches, environments


def test_the_2x8_template_launches_each_node_s_share_around_the_first_host(tmp_path: Path):
    stderr, launches, environments = run_job(tmp_path, TEMPLATE, nodes=2)
    for node, launch in enumerate(launches):
        assert launch == {
            "--config_file": "cluster/multi_node.yaml", "--num_machines": "2", "--machine_rank": str(node),
            "--num_processes": "16", "--main_process_ip": "gpu017", "--main_process_port": "29500",
            "--rdzv_backend": "c10d", "--rdzv_conf": f"is_host={int(node == 0)}"}
        assert f"nt-dist: node {node} of 2 (" in stderr
    assert stderr.count("starts 8 of 16 processes (world size), c10d rendezvous at gpu017:29500, "
                        "config cluster/multi_node.yaml") == 2
    for env in environments:
        assert env["NCCL_DEBUG"] == "WARN" and not set(NCCL) & set(env)  # the cluster's NCCL defaults
        assert (env["SRUN_CPUS_PER_TASK"], env["OMP_NUM_THREADS"], env["NT_GPUS_PER_NODE"]) == ("64", "8", "8")
        assert env["PET_RDZV_ID"] == f"nt-dist-{env['SLURM_JOB_ID']}"  # this job's rendezvous, no other's
    assert "preemption warning: asking the training processes to checkpoint" in stderr


def test_the_2x8_template_keeps_what_the_user_sets(tmp_path: Path):
    """The port, the accelerate config and NCCL's variables from the submitting shell (sbatch
    exports it) win over the template's defaults."""
    _, launches, environments = run_job(
        tmp_path, TEMPLATE, nodes=2, MASTER_PORT="29612", NCCL_DEBUG="INFO", NCCL_SOCKET_IFNAME="ib0",
        NCCL_IB_HCA="mlx5", NT_ACCELERATE_CONFIG="cluster/deepspeed_zero2_multi_node.yaml")
    assert [launch["--main_process_port"] for launch in launches] == ["29612", "29612"]
    assert {launch["--config_file"] for launch in launches} == {"cluster/deepspeed_zero2_multi_node.yaml"}
    for env in environments:
        assert (env["NCCL_DEBUG"], env["NCCL_SOCKET_IFNAME"], env["NCCL_IB_HCA"]) == ("INFO", "ib0", "mlx5")


def test_one_node_takes_the_static_rendezvous_on_its_port(tmp_path: Path):
    """`nt-dist pipeline --submit slurm`'s 1-node jobs: accelerate gives torchrun no endpoint
    on one machine, so c10d would listen on torch's default 29400 for every job of the node."""
    _, (launch,), _ = run_job(tmp_path, SLURM_DIR / "train.sbatch", nodes=1, MASTER_PORT="29613")
    assert (launch["--num_machines"], launch["--machine_rank"], launch["--num_processes"]) == ("1", "0", "8")
    assert (launch["--rdzv_backend"], launch["--main_process_port"]) == ("static", "29613")


def test_a_spool_copy_of_the_template_finds_train_sbatch_from_the_submit_dir(tmp_path: Path):
    spool = tmp_path / "slurm_script"
    spool.write_text(TEMPLATE.read_text())
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(tmp_path)}
    env.pop("NT_TRAIN_SBATCH", None)
    proc = subprocess.run(["bash", str(spool), "RECIPE"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"nt-dist: error: cluster/slurm/train.sbatch not found from {tmp_path}: run sbatch "
                                   "from the repository root, or set NT_TRAIN_SBATCH=/path/to/train.sbatch")
