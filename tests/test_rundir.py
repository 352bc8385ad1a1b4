"""One folder, one run: the run folder knows its recipe, refuses another, and admits one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides
from safetensors.torch import load_file

from nt_dist import rundir
from nt_dist.config import load_recipe
from nt_dist.errors import UserError
from nt_dist.train import train

NT_DIST = str(Path(sys.executable).with_name("nt-dist"))
TEACHER = REPO / "recipes" / "digits_teacher.yaml"


def recipe(out: Path, **extra: str):
    return load_recipe(TEACHER, tiny_overrides(out, "teacher", **{"tracking.enabled": "false", **extra}))


def nt_train(out: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    sets = sum((["--set", o] for o in tiny_overrides(out, "teacher", **{"tracking.enabled": "false"})), [])
    return subprocess.run([NT_DIST, "train", str(TEACHER), *sets, *sum((["--set", e] for e in extra), [])],
                          capture_output=True, text=True, timeout=timeout)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("nt-dist: error:")]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != rundir.LOCK_FILE}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run (cosine schedule, as the recipe has it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = nt_train(out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_the_same_command_on_a_finished_run_says_so_and_trains_nothing(finished: Path):
    before = snapshot(finished)
    proc = nt_train(finished)
    assert proc.returncode == 0, proc.stderr
    top1 = json.loads((finished / "metrics.json").read_text())["final"]["test_top1"]
    assert proc.stdout.strip() == (f"[test_teacher] already finished: test_top1={top1:.2f}, results in "
                                   f"{finished / 'metrics.json'}, model in {finished / 'model.safetensors'} "
                                   "(run.resume=never starts over)")
    assert snapshot(finished) == before


def test_another_recipe_on_a_finished_run_is_refused_naming_the_keys(finished: Path):
    before = snapshot(finished)
    proc = nt_train(finished, "run.epochs=3", "model.name=mlp")
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"nt-dist: error: run.output_dir: {finished} holds a run of another recipe (model.name: 'cifar_cnn' -> "
        "'mlp', run.epochs: 2 -> 3, run.epochs changes only with a constant or multistep optim.schedule); use "
        "another run.output_dir, or run.resume=never to move the old run aside and start over"]
    assert "Traceback" not in proc.stderr
    assert snapshot(finished) == before


def test_keys_that_may_change_on_resume_do_not_count(tmp_path: Path):
    old = recipe(tmp_path)
    new = recipe(tmp_path / "moved", **{"run.progress": "true", "run.keep_last": "5", "data.num_workers": "1",
                                        "tracking.experiment": "other", "run.name": "renamed"})
    assert rundir.differing_keys(old, new) == []
    assert [k for k, _, _ in rundir.differing_keys(old, recipe(tmp_path, **{"optim.lr": "0.1"}))] == ["optim.lr"]
    # run.epochs may change only where the schedule does not span it
    assert [k for k, _, _ in rundir.differing_keys(old, recipe(tmp_path, **{"run.epochs": "3"}))] == ["run.epochs"]
    constant = recipe(tmp_path, **{"optim.schedule": "constant"})
    assert rundir.differing_keys(constant, recipe(tmp_path, **{"optim.schedule": "constant", "run.epochs": "9"})) == []


def test_a_half_finished_run_resumed_with_another_lr_is_refused(tmp_path: Path):
    out = tmp_path / "run"
    train(recipe(out, **{"run.max_steps": "8"}))  # one epoch, then it stops
    (out / "metrics.json").unlink()  # now it looks like a run killed after its first epoch
    with pytest.raises(UserError, match=r"holds a run of another recipe \(optim.lr: 0.05 -> 0.1\)"):
        train(recipe(out, **{"optim.lr": "0.1"}))
    assert not (out / "metrics.json").exists()


def test_resume_never_moves_the_old_run_aside_and_starts_over(finished: Path, tmp_path: Path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished), str(out)], check=True)
    before = snapshot(out)
    proc = nt_train(out, "run.resume=never", "model.name=mlp")
    assert proc.returncode == 0, proc.stderr
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and f"the previous run in {out} was moved to {moved[0]}" in proc.stderr
    assert snapshot(moved[0]) == before  # never deleted, never changed
    assert load_file(str(out / "model.safetensors")).keys() != load_file(str(moved[0] / "model.safetensors")).keys()
    assert "mlp" in (out / "resolved_recipe.yaml").read_text()


def test_a_larger_run_epochs_extends_a_finished_run_exactly(tmp_path: Path):
    """With a constant schedule, 2 epochs then 'run.epochs=3' end bit-identical to 3 epochs."""
    constant = {"optim.schedule": "constant"}
    straight = train(recipe(tmp_path / "straight", **constant, **{"run.epochs": "3"}))
    out = tmp_path / "extended"
    train(recipe(out, **constant))
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
    extended = train(recipe(out, **constant, **{"run.epochs": "3"}))
    for key in ("test_top1", "test_ce", "train_loss"):
        assert extended[key] == straight[key]
    summary = json.loads((out / "metrics.json").read_text())
    assert (summary["epochs"], summary["global_step"]) == (3, 3 * 8)
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [8, 16, 24]  # one line per epoch
    with pytest.raises(UserError, match="run.epochs: 1, but .* has already trained 3 epochs"):
        train(recipe(out, **constant, **{"run.epochs": "1"}))


def test_a_second_run_on_a_busy_folder_is_refused_naming_the_holder(tmp_path: Path):
    out = tmp_path / "run"
    first = subprocess.Popen([NT_DIST, "train", str(TEACHER), *sum((["--set", o] for o in tiny_overrides(
        out, "teacher", **{"tracking.enabled": "false", "run.epochs": "200"})), [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints").is_dir() and time.time() < deadline:
            assert first.poll() is None, first.communicate()[1]
            time.sleep(0.1)
        second = nt_train(out, "run.epochs=200")
        assert second.returncode == 2
        assert error_lines(second) == [f"nt-dist: error: run.output_dir: {out} is in use by another nt-dist run "
                                       f"(pid {first.pid}); wait for it to end, or use another run.output_dir"]
        assert first.poll() is None  # the first run is undisturbed
    finally:
        first.kill()
        first.wait()
    # the kernel released the dead holder's lock: the same command resumes
    again = nt_train(out, "run.epochs=200", "run.max_steps=" + str(first_step(out) + 1))
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout


def first_step(out: Path) -> int:
    return max(int(p.name.removeprefix("step_")) for p in (out / "checkpoints").glob("step_*"))


def test_the_lock_is_exclusive_between_processes_and_released_on_release(tmp_path: Path):
    lock = rundir.RunLock(tmp_path / "run")
    lock.acquire()
    probe = [sys.executable, "-c", "import sys; from pathlib import Path; from nt_dist.rundir import RunLock\n"
             "try:\n  RunLock(Path(sys.argv[1])).acquire(); print('got it')\nexcept Exception as e: print(e)",
             str(tmp_path / "run")]
    held = subprocess.run(probe, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert f"in use by another nt-dist run (pid {os.getpid()})" in held.stdout
    lock.release()
    assert subprocess.run(probe, capture_output=True, text=True, timeout=60, cwd=REPO).stdout.strip() == "got it"


def test_stale_temporaries_of_a_dead_writer_are_cleared_and_the_log_trimmed(tmp_path: Path):
    out = tmp_path / "run"
    train(recipe(out, **{"optim.schedule": "constant"}))
    (out / "metrics.json").unlink()
    (out / "model.safetensors").unlink()
    stale = out / "checkpoints" / ".tmp-step_000000099-12345"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (out / ".metrics.json.abc.tmp").write_text("{")
    with (out / "metrics.jsonl").open("a") as log:  # an epoch logged after the last checkpoint
        log.write(json.dumps({"step": 99, "test_top1": 1.0}) + "\n")
    train(recipe(out, **{"optim.schedule": "constant"}))
    assert not stale.exists() and not (out / ".metrics.json.abc.tmp").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [8, 16]


def test_a_folder_with_checkpoints_but_no_recipe_is_refused(tmp_path: Path):
    out = tmp_path / "run"
    train(recipe(out))
    (out / "resolved_recipe.yaml").unlink()
    (out / "metrics.json").unlink()
    with pytest.raises(UserError, match="no readable resolved_recipe.yaml, so its recipe is unknown"):
        train(recipe(out))


# ----------------------------------------------------------------------------- a frozen network that changed

STUDENT = REPO / "recipes" / "digits_student.yaml"


def nt_student(out: Path, teacher: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = tiny_overrides(out, "student", **{"tracking.enabled": "false", "distill.teacher_checkpoint": str(teacher)})
    return subprocess.run([NT_DIST, "train", str(STUDENT), *sum((["--set", o] for o in [*sets, *extra]), [])],
                          capture_output=True, text=True, timeout=300)


def test_a_student_whose_teacher_changed_is_refused_then_replaced_on_request(finished: Path, tmp_path: Path):
    """inputs.json records the teacher's sha256; a teacher retrained in place makes the student
    stale: the same command is one line naming the file and both digests, never "finished"."""
    from nt_dist.fileio import file_sha256
    from nt_dist.run_inputs import INPUTS_FILE

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.safetensors").write_bytes((finished / "model.safetensors").read_bytes())
    student = tmp_path / "student"
    assert nt_student(student, teacher).returncode == 0
    old_sha = file_sha256(teacher / "model.safetensors")
    recorded = json.loads((student / INPUTS_FILE).read_text())
    assert recorded == {"distill.teacher_checkpoint": {"path": str((teacher / "model.safetensors").resolve()),
                                                       "sha256": old_sha}}
    assert "already finished" in nt_student(student, teacher).stdout  # the same teacher: nothing to do

    retrained = nt_train(tmp_path / "other", "run.seed=1")  # another teacher, copied over the first
    assert retrained.returncode == 0, retrained.stderr
    (teacher / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    new_sha = file_sha256(teacher / "model.safetensors")
    assert new_sha != old_sha
    before = snapshot(student)
    proc = nt_student(student, teacher)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"nt-dist: error: run.output_dir: {student} is stale: distill.teacher_checkpoint "
        f"{(teacher / 'model.safetensors').resolve()} changed since it was trained (sha256 {old_sha[:12]} then, "
        f"{new_sha[:12]} now), so resuming or keeping it would mix two models; run.stale=replace (or "
        "run.resume=never) moves it aside and starts over"]
    assert snapshot(student) == before  # refused before anything was written

    proc = nt_student(student, teacher, "run.stale=replace")
    assert proc.returncode == 0, proc.stderr
    assert "moved to" in proc.stderr and "(stale: distill.teacher_checkpoint" in proc.stderr
    assert json.loads((student / INPUTS_FILE).read_text())["distill.teacher_checkpoint"]["sha256"] == new_sha
    assert len(list(tmp_path.glob("student.old-*"))) == 1
