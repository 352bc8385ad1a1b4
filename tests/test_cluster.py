"""The launcher configs in cluster/, run for real on CPU: DeepSpeed ZeRO through accelerate,
and the SLURM script's preemption chain (USR1 -> checkpoint -> exit 75 -> requeue -> resume)."""

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
from conftest import REPO, free_port, processes_env, tiny_overrides

pytestmark = pytest.mark.distributed
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
CLUSTER = REPO / "cluster"


def args(overrides: list[str]) -> list[str]:
    return sum((["--set", o] for o in overrides), [])


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_are_complete(path: Path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED")
    assert config["num_processes"] >= 1 and config["num_machines"] >= 1
    if config["distributed_type"] == "DEEPSPEED":
        ds = json.loads((REPO / config["deepspeed_config"]["deepspeed_config_file"]).read_text())
        assert ds["zero_allow_untested_optimizer"] is True  # torch SGD/AdamW under ZeRO
        assert ds["bf16"]["enabled"] is True and ds["data_types"]["buffer_dtype"] == "bf16"  # BatchNorm in bf16
        assert str(ds["zero_optimization"]["stage"]) in path.name
        if ds["zero_optimization"]["stage"] == 2:
            # one bucket holds every gradient of the flagship's ResNet-18 (11.2M < reduce_bucket_size):
            # nothing to overlap, and overlap_comm would add a device synchronize and a second bucket per step
            assert ds["zero_optimization"]["overlap_comm"] is False
    if config["num_machines"] > 1:
        # what cluster/slurm/train.sbatch launches (it passes these on the command line), and
        # 8 GPUs a node; DeepSpeed through torchrun on each node (srun started it), not pdsh
        assert (config["rdzv_backend"], config["same_network"]) == ("c10d", False)
        assert config["num_processes"] == 8 * config["num_machines"]
        if config["distributed_type"] == "DEEPSPEED":
            assert config["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"


def launch_deepspeed(stage: int, recipe: str, overrides: list[str]) -> None:
    cmd = [ACCELERATE, "launch", "--config_file", str(CLUSTER / f"deepspeed_zero{stage}.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()),
           "-m", "nt_dist.train", str(REPO / "recipes" / recipe), *args(overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **processes_env(2)})
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_deepspeed_zero2_and_zero3_train_a_nasty_teacher_in_bf16(tmp_path: Path):
    """BatchNorm network in bf16 under ZeRO-3 (teacher), then a nasty teacher under ZeRO-2
    whose frozen adversary stays outside the engine; both on 2 CPU processes over gloo."""
    common = {"run.precision": "bf16", "tracking.enabled": "false", "run.epochs": "1"}
    teacher, nasty = tmp_path / "teacher", tmp_path / "nasty"
    launch_deepspeed(3, "digits_teacher.yaml", tiny_overrides(teacher, "teacher", **common))
    launch_deepspeed(2, "digits_nasty.yaml", tiny_overrides(
        nasty, "nasty", **common, **{"nasty.adversary_checkpoint": str(teacher)}))
    from safetensors.torch import load_file

    for out in (teacher, nasty):
        summary = json.loads((out / "metrics.json").read_text())
        assert summary["global_step"] == 256 // (32 * 2)
        weights = load_file(str(out / "model.safetensors"))
        assert {v.dtype for v in weights.values() if v.is_floating_point()} == {__import__("torch").float32}
    events = [json.loads(line) for line in (nasty / "metrics.jsonl").read_text().splitlines()]
    assert "train_kl" in events[-1] and events[-1]["train_kl"] > 0


FLAGSHIP = "tinyimagenet_nasty.yaml"


def tiny_flagship_inputs(root: Path) -> tuple[Path, Path]:
    """A 2-class Tiny-ImageNet layout (16 px JPEGs) and an untrained cifar_resnet18 adversary
    exported the way a teacher run exports it: all the flagship recipe needs besides size."""
    import numpy as np

    from nt_dist.checkpoint import export_model
    from nt_dist.data.synthetic import write_tinyimagenet
    from nt_dist.models import create_model

    wnids, rng = ["n01443537", "n01629819"], np.random.default_rng(0)
    write_tinyimagenet(root / "tiny", wnids, {w: rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8) for w in wnids},
                       [(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), wnids[i % 2]) for i in range(4)])
    adversary = root / "adversary"
    export_model(create_model("cifar_resnet18", num_classes=2).state_dict(), adversary / "model.safetensors",
                 {"architecture": "cifar_resnet18", "num_classes": "2"})
    return root / "tiny", adversary


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_zero_stage_runs_the_flagship_recipe_channels_last(tmp_path: Path, stage: int):
    """recipes/tinyimagenet_nasty.yaml as written (bf16, model.channels_last: true, ResNet-18,
    rotate_flip) under each cluster/deepspeed_zero*.yaml on 2 processes; only sizes, epochs, the
    milestone, the data root and the adversary are overridden (~20 s per stage on 2 cores).
    Channels-last parameters crashed DeepSpeed's _broadcast_model (`p.data.view(torch.uint8)`:
    "self.stride(-1) must be 1 to view BFloat16 as Byte"; fp32 alike, "Float as Byte")."""
    data_root, adversary = tiny_flagship_inputs(tmp_path)
    recipe = yaml.safe_load((REPO / "recipes" / FLAGSHIP).read_text())
    assert recipe["model"]["channels_last"] is True and recipe["run"]["precision"] == "bf16"
    out = tmp_path / "nasty"
    launch_deepspeed(stage, FLAGSHIP, [
        f"run.output_dir={out}", "run.epochs=1", "run.progress=false", "tracking.enabled=false",
        f"data.root={data_root}", "data.image_size=16", "data.batch_size=4", "data.eval_batch_size=4",
        "data.num_workers=0", "optim.milestones=[1]", f"nasty.adversary_checkpoint={adversary}"])
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["global_step"] == 16 // (4 * 2)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "train_kl" in events[-1] and events[-1]["train_kl"] > 0


FAKE_SRUN = """#!/bin/bash
# srun here: one task per node of the job, all on this machine, each with its SLURM_NODEID
# (0 .. SLURM_NNODES-1); options dropped. As --kill-on-bad-exit, a task that fails stops the others.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
status=0
for ((left = ${#pids[@]}; left > 0; left--)); do
    wait -n; rc=$?
    if (( rc != 0 && status == 0 )); then status=$rc; kill "${pids[@]}" 2>/dev/null; fi
done
exit "$status"
"""


# what the job scripts read besides SLURM_*: a test's job starts without the caller's
JOB_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NT_ACCELERATE_CONFIG", "NT_GPUS_PER_NODE", "NT_RDZV_BACKEND",
                 "NT_TRAIN_SBATCH", "NT_PYTHON", "PET_RDZV_ID", "SRUN_CPUS_PER_TASK", "OMP_NUM_THREADS")


def fake_slurm(bin_dir: Path, log: Path, hosts: tuple[str, ...] = ("localhost",)) -> None:
    """`srun` starts one task per node here (:data:`FAKE_SRUN`); `scontrol show hostnames LIST`
    prints ``hosts``, one a line, as scontrol expands a node list; other scontrol calls
    (requeue) are recorded in ``log``."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\nif [ "$1 $2" = "show hostnames" ]; then printf "%s\\n" {" ".join(hosts)}; '
        f'else echo "$@" >> {log}; fi\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR)


FSDP2 = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_machines": 1, "num_processes": 2,
         "machine_rank": 0, "mixed_precision": "no", "use_cpu": False, "rdzv_backend": "static", "same_network": True,
         "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "SIZE_BASED_WRAP", "fsdp_min_num_params": 100000,
                         "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": False}}


def test_an_fsdp_launch_is_refused_in_one_line(tmp_path: Path):
    """Without the check, accelerate silently trains plain DDP (or unconnected processes)
    under an FSDP config on CPU; on GPUs FSDP would desynchronise BatchNorm statistics."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(FSDP2))
    cmd = [ACCELERATE, "launch", "--config_file", str(config), "--main_process_port", str(free_port()),
           "-m", "nt_dist.train", str(REPO / "recipes" / "digits_teacher.yaml"),
           *args(tiny_overrides(tmp_path / "out", **{"tracking.enabled": "false"}))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **processes_env(2)})
    assert proc.returncode != 0
    # once for the job: every rank meets the error, rank 0 reports it (the launcher stops the
    # others as soon as one exits, so a line from each rank was a race under load)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nt-dist: error:")]
    assert errors == ["nt-dist: error: accelerate config: distributed_type FSDP is not supported: under FSDP "
                      "each rank keeps its own BatchNorm running statistics (DDP and ZeRO broadcast them) and "
                      "accelerate runs FSDP on GPUs only; shard with cluster/deepspeed_zero3.yaml instead"]
    assert not (tmp_path / "out").exists()


def test_slurm_script_checkpoints_requeues_and_resumes_on_usr1(tmp_path: Path):
    log = tmp_path / "scontrol.log"
    fake_slurm(tmp_path / "bin", log)
    out = tmp_path / "run"
    overrides = tiny_overrides(out, "teacher", **{"run.epochs": "40", "tracking.enabled": "false",
                                                  "run.checkpoint_every_steps": "2"})
    # a job id of this test alone: USR1 goes to the processes of that job, and to no other test's
    job_id = str(4_000_000 + os.getpid())
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "NT_PYTHON": sys.executable,
           "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "localhost",
           "NT_GPUS_PER_NODE": "2", "NT_ACCELERATE_CONFIG": str(CLUSTER / "cpu_2proc.yaml"),
           "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", **processes_env(2)}
    job = [str(CLUSTER / "slurm" / "train.sbatch"), str(REPO / "recipes" / "digits_teacher.yaml"), *args(overrides)]
    first = subprocess.Popen(job, cwd=REPO, env={**env, "MASTER_PORT": str(free_port())},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list((out / "checkpoints").glob("step_*")) and time.time() < deadline:
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.2)
    first.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does
    stdout, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr[-3000:]
    assert log.read_text().split() == ["requeue", job_id]
    # the two workers, found by their job id, not the accelerate launcher between them and srun
    assert stderr.count("nt-dist: SIGUSR1 -> training process ") == 2, stderr[-3000:]
    assert "preempted: checkpoint saved" in stderr
    assert not (out / "metrics.json").exists()
    stopped_at = max(int(p.name.removeprefix("step_")) for p in (out / "checkpoints").glob("step_*"))
    # the requeued job: same command, continues from the checkpoint
    second = subprocess.run(job, cwd=REPO, env={**env, "MASTER_PORT": str(free_port())},
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"step_{stopped_at:09d}" in second.stdout and "resumed from" in second.stdout
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 40 * (256 // 64)


@pytest.mark.parametrize("config, precision", [("multi_node.yaml", "no"), ("deepspeed_zero2_multi_node.yaml", "bf16")],
                         ids=["ddp", "zero2"])
def test_the_2x8_template_trains_as_two_nodes_of_one_world(tmp_path: Path, config: str, precision: str):
    """cluster/slurm/multinode_2x8.sbatch run the way SLURM runs it (a copy in a spool folder,
    from the repository root) on 2 "nodes" of this machine, one CPU process each: the two
    launchers meet at the first host `scontrol show hostnames` prints (c10d, node 0 hosting the
    store) and train one run of world size 2 (~10 s for DDP; ZeRO-2 ~15 s, plus ~40 s the first
    time DeepSpeed builds its CPU comm op)."""
    fake_slurm(tmp_path / "bin", tmp_path / "scontrol.log", hosts=("127.0.0.1", "localhost"))
    spool = tmp_path / "spool" / "slurm_script"
    spool.parent.mkdir()
    spool.write_text((CLUSTER / "slurm" / "multinode_2x8.sbatch").read_text())
    out, port = tmp_path / "run", free_port()
    overrides = tiny_overrides(out, "teacher", **{"tracking.enabled": "false", "run.precision": precision,
                                                  **({"run.epochs": "1"} if precision == "bf16" else {})})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in JOB_VARIABLES}
    env.update({"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "NT_PYTHON": sys.executable,
                "SLURM_NNODES": "2", "SLURM_JOB_ID": str(3_000_000 + os.getpid()), "SLURM_JOB_NODELIST": "node[1-2]",
                "SLURM_SUBMIT_DIR": str(REPO), "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                **({"NT_ACCELERATE_CONFIG": f"cluster/{config}"} if config != "multi_node.yaml" else {}),
                **processes_env(2)})
    proc = subprocess.run(["bash", str(spool), "recipes/digits_teacher.yaml", *args(overrides)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    starts = sorted(line for line in proc.stderr.splitlines() if line.startswith("nt-dist: node "))
    assert [line.split(" (")[0] for line in starts] == ["nt-dist: node 0 of 2", "nt-dist: node 1 of 2"]
    for line in starts:  # the default config unless NT_ACCELERATE_CONFIG names one; the first host only
        assert line.endswith(f"starts 1 of 2 processes (world size), c10d rendezvous at 127.0.0.1:{port}, "
                             f"config cluster/{config}"), line
    # one run of 2 processes: half the steps of one process, one final line (from rank 0)
    epochs = 1 if precision == "bf16" else 2
    assert json.loads((out / "metrics.json").read_text())["global_step"] == epochs * 256 // (32 * 2)
    assert proc.stdout.count("[test_teacher] done: ") == 1 and (out / "model.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= epochs
