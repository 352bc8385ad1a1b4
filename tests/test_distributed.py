"""Real multi-process runs: `accelerate launch` with 2 processes (2 GPUs over NCCL where there are
two, else 2 CPU processes over gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, processes_env, tiny_overrides
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
LAUNCH_2 = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
LAUNCH_1 = [ACCELERATE, "launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch(launcher: list[str], recipe: str, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [*launcher, "-m", "nt_dist.train", str(REPO / "recipes" / recipe)]
    for item in overrides:
        cmd += ["--set", item]
    processes = 2 if launcher is LAUNCH_2 else 1
    env = {**os.environ, "OMP_NUM_THREADS": "1", **processes_env(processes)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_train_evaluate_and_log_once(tmp_path: Path):
    out = tmp_path / "ddp"
    launch(LAUNCH_2, "digits_teacher.yaml", tiny_overrides(out, "teacher", **{"run.name": "ddp_teacher"}))
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["global_step"] == 2 * (256 // (32 * 2))  # global batch 64: 4 steps per epoch
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if "test_top1" in e] == [1, 2]  # rank 0 writes, once
    # RNG state of both ranks is in every checkpoint
    last = sorted((out / "checkpoints").iterdir())[-1]
    assert {p.name for p in last.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id], "tags.`mlflow.runName` = 'ddp_teacher'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # every one of the 360 test images was scored exactly once (the loop checks the count)
    assert runs[0].data.metrics["test_top1"] == pytest.approx(summary["final"]["test_top1"])
    assert (360 * summary["final"]["test_top1"] / 100) == pytest.approx(round(360 * summary["final"]["test_top1"] / 100))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=key)


def test_two_processes_of_half_batch_equal_one_process_of_full_batch(tmp_path: Path):
    """Data parallelism changes nothing but speed: same global batches, averaged gradients.
    (mlp: no BatchNorm, whose per-process statistics would differ without SyncBatchNorm.)"""
    common = {"model.name": "mlp", "tracking.enabled": "false", "run.epochs": "2"}
    one, two = tmp_path / "one", tmp_path / "two"
    launch(LAUNCH_1, "digits_student.yaml", tiny_overrides(one, "baseline", **common, **{"data.batch_size": "64"}))
    launch(LAUNCH_2, "digits_student.yaml", tiny_overrides(two, "baseline", **common, **{"data.batch_size": "32"}))
    assert_same_weights(one, two)
    # and the same for a nasty teacher, whose adversary is the network just trained
    nasty = {**common, "nasty.adversary_checkpoint": str(one)}
    n1, n2 = tmp_path / "nasty1", tmp_path / "nasty2"
    launch(LAUNCH_1, "digits_nasty.yaml", tiny_overrides(n1, "nasty", **nasty, **{"data.batch_size": "64"}))
    launch(LAUNCH_2, "digits_nasty.yaml", tiny_overrides(n2, "nasty", **nasty, **{"data.batch_size": "32"}))
    assert_same_weights(n1, n2)
    adversary, nasty_weights = weights(one), weights(n1)
    assert any(not torch.equal(adversary[k], nasty_weights[k]) for k in adversary)  # it did train


def test_two_processes_share_the_logit_cache_and_save_it_whole(tmp_path: Path):
    """Each rank computes the adversary's logits of its own half of every batch; the all-gather
    gives both ranks every sample, so epoch 2 is served from memory and the saved cache is full."""
    teacher, out = tmp_path / "teacher", tmp_path / "nasty"
    off = {"tracking.enabled": "false"}
    launch(LAUNCH_1, "digits_teacher.yaml", tiny_overrides(teacher, "teacher", **off))
    launch(LAUNCH_2, "digits_nasty.yaml", tiny_overrides(out, "nasty", **off, **{
        "nasty.adversary_checkpoint": str(teacher), "data.augment_views": "1", "nasty.cache_logits": "true"}))
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["cache_hit_rate"] for e in epochs] == [0.0, 1.0]
    cache = load_file(str(out / "logit_cache.safetensors"))
    assert cache["filled"].shape == (256, 1) and bool(cache["filled"].all())


def test_two_processes_train_the_skeptical_student_through_its_kd_delay(tmp_path: Path):
    """Under DDP every parameter must get a gradient each step: before distill.kd_delay the
    auxiliary heads join the loss with weight 0 (the authors train under DataParallel, which does
    not ask)."""
    teacher, out = tmp_path / "teacher", tmp_path / "skeptical"
    off = {"tracking.enabled": "false"}
    launch(LAUNCH_1, "digits_teacher.yaml", tiny_overrides(teacher, "teacher", **off))
    launch(LAUNCH_2, "digits_attack.yaml", tiny_overrides(out, "student", **off, **{
        "distill.teacher_checkpoint": str(teacher), "distill.method": "skeptical", "distill.kd_delay": "1"}))
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(e["train_loss"], e["train_ce"]) for e in epochs if "train_loss" in e]
    assert len(losses) == 2
    assert losses[0][0] == pytest.approx(losses[0][1], rel=1e-5)  # epoch 1: the final head's CE alone
    assert losses[1][0] > losses[1][1]  # epoch 2: the KD and self-distillation terms join
    assert not any(k.startswith(("heads.", "backbone.")) for k in weights(out))  # the plain student is exported
