"""Kill a run at any point, start it again with the same command: the same final weights."""

from __future__ import annotations

import json
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides
from safetensors.torch import load_file

NT_DIST = str(Path(sys.executable).with_name("nt-dist"))


def command(out: Path, **extra: str) -> list[str]:
    overrides = tiny_overrides(out, "teacher", **{"run.checkpoint_every_steps": "3", "run.keep_last": "3",
                                                   "tracking.enabled": "false", **extra})
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
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run (umask 022: the file modes are checked on it too)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(command(out), check=True, capture_output=True, timeout=300, umask=0o022)
    return out


@pytest.fixture(scope="module")
def reference(reference_run: Path) -> dict:
    return load_file(str(reference_run / "model.safetensors"))


def epoch_records(out: Path) -> dict[int, dict]:
    """The last ``metrics.jsonl`` record of each epoch (a run stopped by run.max_steps logs its
    partial epoch; the run that continues it logs the whole epoch after it)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["epoch"]: r for r in records if "epoch" in r}


def stopped_at_step_5(out: Path) -> None:
    """Train 5 of the first epoch's 8 steps (a checkpoint at step 3 and at 5, mid-epoch) and stop."""
    subprocess.run(command(out, **{"run.max_steps": "5"}), check=True, capture_output=True, timeout=300)
    assert (out / "checkpoints" / "step_000000005").is_dir()


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


def test_stray_folders_in_checkpoints_are_skipped_with_a_warning_naming_each(tmp_path: Path, reference: dict):
    """A backup copy (step_5.bak), a misnamed folder (step_x), a user's notes/: none is a
    checkpoint, none ends the resume in a traceback, and each is named once."""
    out = tmp_path / "run"
    stopped_at_step_5(out)
    root = out / "checkpoints"
    shutil.copytree(root / "step_000000005", root / "step_5.bak")
    (root / "step_x").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "why.txt").write_text("kept by hand")
    again = subprocess.run(command(out), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    warned = [line for line in again.stderr.splitlines() if line.startswith("nt-dist: warning:")]
    assert warned == [f"nt-dist: warning: ignoring {root / name}: not a checkpoint folder (those are named "
                      "step_<number>)" for name in ("notes", "step_5.bak", "step_x")]
    assert f"resumed from {root / 'step_000000005'} " in again.stdout
    assert_identical(out, reference)
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step_000000012", "step_000000015", "step_000000016",
                                                      "step_5.bak", "step_x"]  # pruning leaves them alone


def test_an_epoch_resumed_mid_way_logs_the_same_train_loss_and_lr_as_the_uninterrupted_run(
        tmp_path: Path, reference_run: Path):
    out = tmp_path / "run"
    stopped_at_step_5(out)
    subprocess.run(command(out), check=True, capture_output=True, timeout=300)
    whole, resumed = epoch_records(reference_run), epoch_records(out)
    assert sorted(resumed) == sorted(whole) == [1, 2]
    for epoch in (1, 2):
        train = sorted(k for k in whole[epoch] if k.startswith("train_"))
        assert train and sorted(k for k in resumed[epoch] if k.startswith("train_")) == train
        # bit-identical: the running sums are restored exactly, and the resume is
        assert {k: resumed[epoch][k] for k in [*train, "lr"]} == {k: whole[epoch][k] for k in [*train, "lr"]}
        assert "resumed" not in resumed[epoch]


def test_a_checkpoint_without_the_epoch_sums_resumes_and_marks_that_epoch_resumed(
        tmp_path: Path, reference_run: Path, reference: dict):
    """A checkpoint written before the state file carried the epoch's running sums."""
    out = tmp_path / "run"
    stopped_at_step_5(out)
    state_file = out / "checkpoints" / "step_000000005" / "trainer_state.json"
    counters = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: counters[k] for k in ("epoch", "step_in_epoch", "global_step",
                                                                  "mlflow_run_id")}))
    again = subprocess.run(command(out), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [line for line in again.stderr.splitlines() if line.startswith("nt-dist:")] == [
        f"nt-dist: warning: {state_file.parent} does not carry epoch 1's running metrics (written by an older "
        "nt-dist): that epoch's train_* and lr in metrics.jsonl cover only the steps after the resume and are "
        'marked "resumed": true']
    records = epoch_records(out)
    assert records[1]["resumed"] is True and "resumed" not in records[2]
    assert records[1]["train_loss"] != epoch_records(reference_run)[1]["train_loss"]  # 3 steps of 8
    assert records[2]["train_loss"] == epoch_records(reference_run)[2]["train_loss"]
    assert_identical(out, reference)


def test_exported_and_checkpoint_files_get_the_umask_mode(reference_run: Path):
    """Under umask 022 every file of the run folder is 0644, as a plain open() makes it (the
    exported model was 0600: safetensors' own writer); folders 0755."""
    modes = {str(p.relative_to(reference_run)): stat.S_IMODE(p.stat().st_mode)
             for p in [reference_run, *reference_run.rglob("*")]}
    assert modes["model.safetensors"] == modes["metrics.json"] == 0o644
    assert modes["checkpoints/step_000000016/model.safetensors"] == 0o644
    assert modes["checkpoints/step_000000016/trainer_state.json"] == 0o644
    wrong = {name: oct(m) for name, m in modes.items()
             if m != (0o755 if (reference_run / name).is_dir() else 0o644)}
    assert wrong == {}
