"""Kill a run at any point, start it again with the same command: the same final weights."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides
from safetensors.torch import load_file

NT_DIST = str(Path(sys.executable).with_name("nt-dist"))


def command(out: Path) -> list[str]:
    overrides = tiny_overrides(out, "teacher", **{"run.checkpoint_every_steps": "3", "run.keep_last": "3",
                                                   "tracking.enabled": "false"})
    return [NT_DIST, "train", str(REPO / "recipes" / "digits_teacher.yaml"), *sum((["--set", o] for o in overrides), [])]


def wait_for(path_glob: tuple[Path, str], proc: subprocess.Popen, timeout: float = 120) -> None:
    folder, pattern = path_glob
    deadline = time.time() + timeout
    while time.time() < deadline:
        if folder.is_dir() and list(folder.glob(pattern)):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before {pattern} appeared")
        time.sleep(0.02)
    pytest.fail(f"{pattern} did not appear")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(command(out), check=True, capture_output=True, timeout=300)
    return load_file(str(out / "model.safetensors"))


def assert_identical(out: Path, reference: dict) -> None:
    resumed = load_file(str(out / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    different = [k for k in reference if not (resumed[k] == reference[k]).all()]
    assert not different, f"weights differ after resume: {different[:5]}"


@pytest.mark.parametrize("after", ["step_000000003", "step_000000008"])
def test_sigkill_then_same_command_gives_identical_weights(tmp_path: Path, reference: dict, after: str):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for((out / "checkpoints", after), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    again = subprocess.run(command(out), check=True, capture_output=True, text=True, timeout=300)
    # did not start over: resumed from that checkpoint or a later one (the run may write the next
    # before the kill lands: with data on the device, a step takes milliseconds)
    resumed = re.search(rf"resumed from {re.escape(str(out / 'checkpoints'))}/step_(\d+) ", again.stdout)
    assert resumed and int(resumed.group(1)) >= int(after.split("_")[1]), again.stdout
    assert_identical(out, reference)


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 75, "preempted"), (signal.SIGINT, 130, "interrupted")])
def test_sigterm_or_ctrl_c_checkpoints_at_the_next_step_and_exits(tmp_path: Path, reference: dict, sig: int,
                                                                  code: int, word: str):
    """SIGTERM (a scheduler's warning) exits 75 for a requeue; Ctrl-C exits 130; both keep the
    steps since the last checkpoint."""
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for((out / "checkpoints", "step_000000003"), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert [line for line in err.splitlines() if line.startswith("nt-dist:")] == [
        f"nt-dist: {word}: checkpoint saved in {out}; run the same command again to resume"]
    assert "Traceback" not in err
    latest = sorted((out / "checkpoints").glob("step_*"))[-1]
    state = json.loads(latest.joinpath("trainer_state.json").read_text())
    assert state["global_step"] >= 3
    again = subprocess.run(command(out), check=True, capture_output=True, text=True, timeout=300)
    assert f"resumed from {latest}" in again.stdout
    assert_identical(out, reference)


@pytest.mark.parametrize("damage", ["truncated optimizer", "counters of the wrong type"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, reference: dict, damage: str):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for((out / "checkpoints", "step_000000008"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = sorted((out / "checkpoints").glob("step_*"))[-1]
    if damage == "truncated optimizer":
        optimizer = latest / "optimizer.bin"
        optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated by a crash of the file system
    else:
        counters = json.loads((latest / "trainer_state.json").read_text())
        (latest / "trainer_state.json").write_text(json.dumps({**counters, "global_step": str(counters["global_step"])}))
    done = subprocess.run(command(out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "nt-dist: warning: skipping unusable checkpoint" in done.stderr and latest.name in done.stderr
    assert "resumed from" in done.stdout and latest.name not in done.stdout
    assert_identical(out, reference)
