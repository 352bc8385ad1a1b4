"""A researcher's first day with the flagship: the README's Tiny-ImageNet commands as written, on
a fixture in the archive's own layout; what a first launch on a laptop meets (emulated bf16,
too many loader workers, a stopped launcher)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

BIN = Path(sys.executable).parent


def readme_commands(prefix: str) -> list[str]:
    """The README's shell lines that start with ``prefix`` (continuations joined)."""
    text = (REPO / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [" ".join(line.split()) for line in lines if line.startswith(prefix)]


def tiny_imagenet(root: Path) -> Path:
    """Two classes of the Tiny-ImageNet-200 layout at the recipe's 64 px: 64 training images each
    (one batch of the recipe's 128), 20 validation images."""
    from nt_dist.data.synthetic import write_tinyimagenet

    wnids, rng = ["n01443537", "n01629819"], np.random.default_rng(0)
    write_tinyimagenet(root, wnids, {w: rng.integers(0, 256, (64, 64, 64, 3), dtype=np.uint8) for w in wnids},
                       [(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), wnids[i % 2]) for i in range(20)])
    return root


def as_run_here(command: str, data_root: Path) -> list[str]:
    words = shlex.split(command.replace("/data/tiny-imagenet-200", str(data_root)))
    words = [str(REPO / w) if w.startswith("recipes/") else w for w in words]
    return [str(BIN / words[0]), *words[1:]] if words[0] in ("nt-dist", "accelerate") else words


def test_the_readme_flagship_finishes_a_nasty_teacher_on_the_first_launch(tmp_path: Path):
    """The quick try of the README, as written (the data root aside): the whole chain runs in one
    command (normal teacher, nasty teacher against it, the student alone and from each) and
    leaves a finished nasty ResNet-18; then the README's single-stage `accelerate launch` of the
    nasty recipe, whose adversary this folder lacks, stops before any data is decoded with the one
    line that says what to train first, as the last line printed (~4 min on 2 cores)."""
    data_root = tiny_imagenet(tmp_path / "tiny-imagenet-200")
    tries = [c for c in readme_commands("nt-dist pipeline recipes/tinyimagenet.yaml") if "run.max_steps" in c]
    assert len(tries) == 1, readme_commands("nt-dist pipeline")
    proc = subprocess.run(as_run_here(tries[0], data_root), capture_output=True, text=True, timeout=1500,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "tinyimagenet-try" / "seed0"
    nasty = out / "nasty" / "resnet-18-nasty"
    assert json.loads((nasty / "metrics.json").read_text())["global_step"] == 1
    from safetensors import safe_open

    with safe_open(str(nasty / "model.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["architecture"] == "cifar_resnet18" and meta["role"] == "nasty", meta
    assert meta["tau_a"] == "20"  # plot-logits' default τ
    for stage in ("teacher/resnet-18-normal", "baseline/shufflenetv2", "student/shufflenetv2/resnet-18-nasty"):
        assert (out / stage / "model.safetensors").is_file(), stage
    assert "5 stages: 5 ran" in proc.stderr + proc.stdout
    assert "| ResNet-18 nasty |" in proc.stdout  # the paper-layout table at the end

    (launch,) = readme_commands("accelerate launch -q -m nt_dist.train recipes/tinyimagenet_nasty.yaml")
    single = subprocess.run(as_run_here(launch, data_root), capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert single.returncode != 0
    last = single.stderr.strip().splitlines()[-1]
    assert last.startswith("nt-dist: error: ") and "nasty.adversary_checkpoint" in last, single.stderr
    assert "runs/tinyimagenet/seed0/teacher/resnet-18-normal/model.safetensors not found" in last
    assert "train the adversary first" in last and "nt-dist pipeline" in last
    assert "decoding" not in single.stderr and "Traceback" not in single.stderr


def test_the_nasty_recipe_points_at_the_pipelines_teacher():
    """After the flagship pipeline, the single-stage nasty recipe finds its adversary."""
    from nt_dist.config import load_recipe

    nasty = load_recipe(REPO / "recipes" / "tinyimagenet_nasty.yaml")
    assert nasty.nasty.adversary_checkpoint == "runs/tinyimagenet/seed0/teacher/resnet-18-normal"
    assert "output_dir: runs/tinyimagenet" in (REPO / "recipes" / "tinyimagenet.yaml").read_text()


def test_emulated_bf16_is_said_in_one_line_with_the_fix(tmp_path: Path):
    """bf16 where the device only emulates it (most CPUs) trains, but many times slower: one
    warning line with the fix; where bf16 is native, no such line."""
    import torch

    from nt_dist.frozen_network import native_bf16

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    proc = subprocess.run([str(BIN / "nt-dist"), "train", str(REPO / "recipes" / "digits_teacher.yaml"),
                           "--set", "run.precision=bf16", "--set", "run.max_steps=1", "--set", "run.progress=false",
                           "--set", "tracking.enabled=false", "--set", f"run.output_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "bf16 is emulated" in line]
    if native_bf16(device):
        assert not warned, proc.stderr
    else:
        assert len(warned) == 1, proc.stderr
        assert warned[0].startswith("nt-dist: warning: ") and "--set run.precision=no" in warned[0]
        assert "digits_teacher.yaml: run.precision" in warned[0]


def test_loader_workers_are_capped_at_this_processs_share_of_the_cores(monkeypatch: pytest.MonkeyPatch):
    from nt_dist.data import usable_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [usable_workers(n) for n in (0, 1, 2, 8)] == [0, 1, 2, 2]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert usable_workers(8) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert usable_workers(8) == 1  # never 0 when workers were asked for: 0 would change the input path


def test_a_step_that_outlasts_the_launchers_grace_still_ends_the_run():
    """A stop signal while one step runs long: ``on_stall`` fires once, from a thread, ~stall_s
    after the signal (before the launcher's SIGKILL), and never without a signal."""
    from nt_dist.ranks import Preemption

    calls: list[float] = []
    quiet = Preemption(on_stall=lambda: calls.append(time.monotonic()), stall_s=0.3)
    quiet.install()
    try:
        time.sleep(0.8)
    finally:
        quiet.uninstall()
    assert calls == []
    preempt = Preemption(on_stall=lambda: calls.append(time.monotonic()), stall_s=0.3)
    preempt.install()
    try:
        sent = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = sent + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.05)  # the "long step": no boundary reached
        time.sleep(0.5)
    finally:
        preempt.uninstall()
    assert preempt.requested and len(calls) == 1
    assert 0.3 <= calls[0] - sent < 2.0
