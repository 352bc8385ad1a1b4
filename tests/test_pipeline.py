"""`nt-dist pipeline`: the graph a pipeline file describes, run as a user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import processes_env
from mlflow.tracking import MlflowClient

from nt_dist import pipeline
from nt_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
NT_DIST = str(Path(sys.executable).with_name("nt-dist"))
TINY = {"run.epochs": 1, "run.progress": False, "data.train_subset": 128, "data.batch_size": 32}


def write_pipeline(folder: Path, **changes) -> Path:
    """A digits grid: one normal teacher, one nasty teacher against it, one student column."""
    tree = {
        "pipeline": "tiny", "experiment": "tests-pipeline", "output_dir": str(folder / "runs"), "seeds": [0],
        "set": dict(TINY),
        "teachers": {"CNN normal": {"recipe": str(RECIPES / "digits_teacher.yaml")}},
        "nasty": {"CNN nasty": {"recipe": str(RECIPES / "digits_nasty.yaml"), "adversary": "CNN normal"}},
        "students": {"MLP": {"recipe": str(RECIPES / "digits_student.yaml")}},
    }
    tree.update(changes)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def by_name(stages):
    return {s.name: s for s in stages}


# ----------------------------------------------------------------------------- the graph


def test_expand_builds_the_table_graph_with_seeds_and_dependencies(tmp_path: Path):
    spec = pipeline.load_pipeline(write_pipeline(tmp_path, seeds=[0, 1]))
    stages = by_name(pipeline.expand(spec))
    names = [f"seed{s}/{n}" for s in (0, 1) for n in ("teacher/cnn-normal", "nasty/cnn-nasty", "baseline/mlp",
                                                       "student/mlp/cnn-normal", "student/mlp/cnn-nasty")]
    assert list(stages) == names
    nasty = stages["seed1/nasty/cnn-nasty"]
    assert nasty.needs == ("seed1/teacher/cnn-normal",)
    assert f"nasty.adversary_checkpoint={tmp_path / 'runs/seed1/teacher/cnn-normal'}" in nasty.overrides
    assert "run.seed=1" in nasty.overrides and (nasty.row, nasty.column, nasty.reference_row) == \
        ("CNN nasty", "teacher", "CNN normal")
    student = stages["seed0/student/mlp/cnn-nasty"]
    assert student.needs == ("seed0/nasty/cnn-nasty",)
    assert f"distill.teacher_checkpoint={tmp_path / 'runs/seed0/nasty/cnn-nasty'}" in student.overrides
    assert student.tags == {"table": "tiny", "row": "CNN nasty", "column": "MLP", "seed": "0", "stage": "student"}
    baseline = stages["seed0/baseline/mlp"]
    assert "run.role=baseline" in baseline.overrides and baseline.needs == () and baseline.row == "student baseline"
    # every stage's recipe resolves, with the pipeline's settings and the managed keys last
    from nt_dist.config import load_recipe

    recipe = load_recipe(student.recipe, list(student.overrides))
    assert (recipe.run.epochs, recipe.data.train_subset, recipe.run.seed) == (1, 128, 0)
    assert recipe.run.output_dir == str(tmp_path / "runs/seed0/student/mlp/cnn-nasty")
    assert recipe.tracking.experiment == "tests-pipeline" and recipe.tracking.tags["row"] == "CNN nasty"


def test_a_sweep_retrains_only_the_stages_it_reaches(tmp_path: Path):
    path = write_pipeline(tmp_path, sweep={"nasty.omega": [0.01, 0.1],
                                           "data.train_subset": {"values": [64, 128], "stages": ["student", "baseline"]}})
    stages = by_name(pipeline.expand(pipeline.load_pipeline(path)))
    # the normal teacher once; a nasty teacher per ω; a baseline per subset; a normal-KD student per
    # subset; a nasty-KD student per (ω, subset): 1 + 2 + 2 + 2 + 4
    kinds = [s.kind for s in stages.values()]
    assert (kinds.count("teacher"), kinds.count("nasty"), kinds.count("baseline"), kinds.count("student")) == (1, 2, 2, 6)
    assert "seed0/nasty/cnn-nasty/nasty.omega-0.01" in stages
    student = stages["seed0/student/mlp/cnn-nasty/nasty.omega-0.1_data.train-subset-64"]
    assert dict(student.sweep) == {"nasty.omega": 0.1, "data.train_subset": 64}
    assert student.needs == ("seed0/nasty/cnn-nasty/nasty.omega-0.1",)
    assert "nasty.omega=0.1" in student.overrides and "data.train_subset=64" in student.overrides
    assert student.tags["sweep.nasty.omega"] == "0.1"


def test_a_self_student_takes_its_teachers_architecture_and_has_no_baseline(tmp_path: Path):
    path = write_pipeline(tmp_path, students={"self": {"recipe": str(RECIPES / "digits_student.yaml"), "self": True}})
    stages = pipeline.expand(pipeline.load_pipeline(path))
    students = [s for s in stages if s.kind == "student"]
    assert [s.kind for s in stages].count("baseline") == 0
    assert all("model.name=cifar_cnn" in s.overrides for s in students)
    assert {s.row: s.reference_row for s in students} == {"CNN normal": "CNN normal", "CNN nasty": "CNN normal"}


@pytest.mark.parametrize("change, expected", [
    ({"nasty": {"X": {"recipe": str(RECIPES / "digits_nasty.yaml"), "adversary": "nobody"}}},
     "nasty.X.adversary: 'nobody' is not a key of teachers (CNN normal)"),
    ({"students": {"MLP": {"recipe": "missing.yaml"}}}, "students.MLP.recipe: "),
    ({"seeds": "zero"}, "seeds: input should be a valid list"),
    ({"students": {"MLP": {"recipe": str(RECIPES / "digits_student.yaml"), "colour": 1}}},
     "students.MLP.colour: unknown key; expected one of: recipe, set, baseline, self, teachers"),
    ({"sweep": {"omega": [1, 2]}}, "sweep.omega: expected a recipe key section.key"),
])
def test_mistakes_in_a_pipeline_file_are_one_line_naming_the_key(tmp_path: Path, change, expected):
    path = write_pipeline(tmp_path, **change)
    proc = subprocess.run([NT_DIST, "pipeline", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nt-dist: error: {path}: ") and expected in lines[0], lines


def test_a_recipe_is_not_a_pipeline(tmp_path: Path):
    with pytest.raises(UserError, match="not a pipeline file"):
        pipeline.load_pipeline(RECIPES / "digits_teacher.yaml")


# ----------------------------------------------------------------------------- running


def test_run_skips_finished_stages_and_a_failure_stops_only_its_dependants(tmp_path: Path, capsys):
    path = write_pipeline(tmp_path)
    spec = pipeline.load_pipeline(path)
    # the nasty teacher cannot start (its adversary's file is missing: only training finds that
    # out, the recipe is valid), so its student must not run; the rest must
    broken = pipeline.expand(spec, extra=[])
    missing = f"nasty.adversary_checkpoint={tmp_path / 'gone'}"
    broken = [pipeline.Stage(**{**s.__dict__, "overrides": (*s.overrides, missing)})
              if s.kind == "nasty" else s for s in broken]
    outcomes = {o.stage.name: o for o in pipeline.run(spec, broken)}
    status = {n: o.status for n, o in outcomes.items()}
    assert status == {"seed0/teacher/cnn-normal": "ran", "seed0/nasty/cnn-nasty": "failed",
                      "seed0/baseline/mlp": "ran", "seed0/student/mlp/cnn-normal": "ran",
                      "seed0/student/mlp/cnn-nasty": "blocked"}
    assert "nasty.adversary_checkpoint" in outcomes["seed0/nasty/cnn-nasty"].message
    text = pipeline.summary(list(outcomes.values()))
    assert text.splitlines()[0] == "5 stages: 3 ran, 0 skipped (already finished), 1 failed, 1 not run (an input failed)"
    assert "not run  seed0/student/mlp/cnn-nasty: needs seed0/nasty/cnn-nasty" in text
    assert pipeline.exit_code(list(outcomes.values())) == 1

    # the fixed pipeline, again: the three finished stages are skipped, the other two run
    outcomes = pipeline.run(spec, pipeline.expand(spec))
    assert [o.status for o in outcomes] == ["skipped", "ran", "skipped", "skipped", "ran"]
    top1 = json.loads((tmp_path / "runs/seed0/teacher/cnn-normal/metrics.json").read_text())["final"]["test_top1"]
    assert outcomes[0].results["test_top1"] == pytest.approx(top1)
    assert pipeline.exit_code(outcomes) == 0

    # tags line the cells up in MLflow's compare view
    client = MlflowClient()
    summary = json.loads((tmp_path / "runs/seed0/student/mlp/cnn-nasty/metrics.json").read_text())
    run = client.get_run(summary["mlflow_run_id"])
    assert {k: run.data.tags[k] for k in ("table", "row", "column", "seed", "stage")} == \
        {"table": "tiny", "row": "CNN nasty", "column": "MLP", "seed": "0", "stage": "student"}
    assert run.data.tags["mlflow.runName"] == "s0 mlp ← nasty cnn"  # seed, student arch, its teacher

    # the paper's qualitative figure from the two teachers just trained
    png = tmp_path / "logits.png"
    proc = subprocess.run([NT_DIST, "plot-logits", str(tmp_path / "runs/seed0/teacher/cnn-normal"),
                           str(tmp_path / "runs/seed0/nasty/cnn-nasty"), "--out", str(png), "--count", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.distributed
def test_a_launcher_config_runs_each_stage_through_accelerate_launch(tmp_path: Path):
    path = write_pipeline(tmp_path, nasty={}, students={}, launcher=str(REPO / "cluster/cpu_2proc.yaml"))
    proc = subprocess.run([NT_DIST, "pipeline", str(path), "--no-report"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", **processes_env(2)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 stages: 1 ran" in proc.stdout
    log = (tmp_path / "runs/logs/seed0__teacher__cnn-normal.log").read_text()
    assert "epoch 1/1" in log
    assert json.loads((tmp_path / "runs/seed0/teacher/cnn-normal/metrics.json").read_text())["final"]["test_top1"] > 0


@pytest.mark.slow
def test_the_command_runs_stages_in_parallel_processes_and_reports(tmp_path: Path):
    path = write_pipeline(tmp_path, sweep={"nasty.omega": [0.01, 0.1]})
    proc = subprocess.run([NT_DIST, "pipeline", str(path), "--parallel", "2"], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "7 stages: 7 ran, 0 skipped" in proc.stdout
    logs = sorted(p.name for p in (tmp_path / "runs/logs").iterdir())
    assert "seed0__teacher__cnn-normal.log" in logs and len(logs) == 7
    report = (tmp_path / "runs/report/report.md").read_text()
    assert report.count("### tiny — nasty.omega = ") == 2
    assert (tmp_path / "runs/report/tiny_nasty.omega_students.png").is_file()
    assert (tmp_path / "runs/report/tiny_nasty.omega_teachers.png").is_file()
    # the same command again trains nothing
    again = subprocess.run([NT_DIST, "pipeline", str(path), "--no-report"], capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
    assert again.returncode == 0 and "7 stages: 0 ran, 7 skipped" in again.stdout


def test_parallel_stages_share_the_cores_instead_of_each_taking_all():
    from nt_dist.pipeline.runners import stage_env

    assert stage_env(2, {}, cpus=2)["OMP_NUM_THREADS"] == "1"
    assert stage_env(3, {}, cpus=16)["OMP_NUM_THREADS"] == "5"
    assert stage_env(4, {}, cpus=2)["OMP_NUM_THREADS"] == "1"  # never 0
    assert stage_env(2, {"OMP_NUM_THREADS": "8"}, cpus=2)["OMP_NUM_THREADS"] == "8"  # the user's choice stands
    assert "OMP_NUM_THREADS" not in stage_env(1, {}, cpus=2)  # one stage at a time: torch's default
    assert stage_env(1, {"A": "b"}, cpus=2) == {"A": "b", "PYTHONUNBUFFERED": "1"}


def test_dry_run_prints_each_stage_through_the_launcher(tmp_path: Path):
    path = write_pipeline(tmp_path)
    proc = subprocess.run([NT_DIST, "pipeline", str(path), "--dry-run", "--launcher",
                           str(REPO / "cluster/cpu_2proc.yaml")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "seed0/teacher/cnn-normal" and "(after seed0/teacher/cnn-normal)" in lines[2]
    assert f"launch -q --config_file {REPO / 'cluster/cpu_2proc.yaml'} -m nt_dist.train" in lines[1]
    assert not (tmp_path / "runs").exists()


def fake_sbatch(bin_dir: Path, log: Path) -> None:
    """Records each call (one line of arguments and NT_ACCELERATE_CONFIG) and answers a job id."""
    bin_dir.mkdir()
    script = bin_dir / "sbatch"
    script.write_text(f'#!/bin/bash\nn=$(( $(wc -l < {log} 2>/dev/null || echo 0) + 100 ))\n'
                      f'echo "$NT_ACCELERATE_CONFIG|$*" >> {log}\necho "$n;cluster"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_submit_slurm_chains_each_stage_to_its_inputs(tmp_path: Path):
    path = write_pipeline(tmp_path, slurm={"time": "01:00:00", "nodes": 1})
    log = tmp_path / "sbatch.log"
    fake_sbatch(tmp_path / "bin", log)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    launcher = REPO / "cluster/single_gpu.yaml"
    proc = subprocess.run([NT_DIST, "pipeline", str(path), "--submit", "slurm", "--launcher", str(launcher)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 5 and all(c.startswith(f"{launcher}|--parsable ") for c in calls)
    # the block's nodes and time; a GPU and its share of CPUs from cluster/single_gpu.yaml
    assert "--nodes=1 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=8 --time=01:00:00" in calls[0]
    assert "--dependency" not in calls[0]
    assert "--dependency=afterok:100 --kill-on-invalid-dep=yes" in calls[1]  # nasty after its adversary
    assert "--dependency=afterok:101 " in calls[4]  # the nasty teacher's student after the nasty teacher
    assert f"cluster/slurm/train.sbatch {RECIPES / 'digits_nasty.yaml'} --set " in calls[1]
    jobs = json.loads((tmp_path / "runs/slurm_jobs.json").read_text())
    assert jobs == {"seed0/teacher/cnn-normal": "100", "seed0/nasty/cnn-nasty": "101", "seed0/baseline/mlp": "102",
                    "seed0/student/mlp/cnn-normal": "103", "seed0/student/mlp/cnn-nasty": "104"}
    # a local launcher has nothing to hand to the job script
    proc = subprocess.run([NT_DIST, "pipeline", str(path), "--submit", "slurm"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "--submit slurm needs an accelerate config" in proc.stderr


# ----------------------------------------------------------------------------- the paper's Table 1, shrunk

SHRINK = ["data.name=digits", "data.root=", "data.image_size=16", "data.batch_size=32", "data.num_workers=0",
          "data.train_subset=64", "run.epochs=1", "run.precision=no", "run.progress=false", "optim.schedule=constant",
          "optim.milestones=[]"]


@pytest.mark.slow
def test_table1_shrunk_to_digits_runs_the_paper_pipeline_and_reports_every_cell(tmp_path: Path):
    """The same pipeline file and report code a user runs on CIFAR-10, on the embedded digits
    with one tiny epoch: 14 runs, and a report with a figure in every cell of the paper's table."""
    command = [NT_DIST, "pipeline", str(RECIPES / "paper/table1.yaml"), "--seeds", "0", "--out", str(tmp_path / "t1"),
               *sum((["--set", s] for s in SHRINK), [])]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "14 stages: 14 ran, 0 skipped (already finished), 0 failed, 0 not run" in proc.stdout
    lines = (tmp_path / "t1/report/report.md").read_text().splitlines()
    assert lines[0] == "### Table 1: CIFAR-10"
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["Teacher", "Teacher top-1", "Student CNN", "Student ResNetC-20", "Student ResNetC-32",
                      "Student ResNet-18"]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[4:7])}
    assert list(rows) == ["student baseline", "ResNet-18 normal", "ResNet-18 nasty"]
    assert rows["student baseline"][0] == "–"
    number = r"\d+\.\d\d"
    for row, cells in rows.items():
        for cell in cells[1:] if row == "student baseline" else cells:
            assert re.fullmatch(rf"{number}( \([+−]{number}\))?†? · paper {number}( \([+−]{number}\))?", cell), (row, cell)
    csv_rows = (tmp_path / "t1/report/report.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 4 + 2 * 5  # header, baselines, two teacher rows of five cells


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 75, "preempted"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_stops_the_pipeline_at_the_running_stage_and_the_same_command_resumes(tmp_path: Path, sig, code,
                                                                                        word):
    # the teacher runs long enough (30 epochs) that the signal lands in it on any machine
    path = write_pipeline(tmp_path, set={**TINY, "run.checkpoint_every_steps": 3, "tracking.enabled": False},
                          teachers={"CNN normal": {"recipe": str(RECIPES / "digits_teacher.yaml"),
                                                   "set": {"run.epochs": 30}}})
    command = [NT_DIST, "pipeline", str(path), "--no-report"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    teacher = tmp_path / "runs/seed0/teacher/cnn-normal"
    deadline = time.time() + 300
    while not list((teacher / "checkpoints").glob("step_*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    assert [line for line in err.splitlines() if line.startswith(f"nt-dist: {word}")] == [
        f"nt-dist: {word}: checkpoint saved in {teacher}; run the same command again to resume"]
    assert "Traceback" not in err
    assert not (tmp_path / "runs/seed0/nasty").exists() and not (teacher / "metrics.json").exists()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "5 stages: 5 ran, 0 skipped" in again.stdout and "resumed from" in again.stdout


def test_given_models_and_defence_rows_train_no_teacher(tmp_path: Path):
    model = tmp_path / "given" / "model.safetensors"
    model.parent.mkdir()
    model.write_bytes(b"")  # existence is all expand() needs
    path = write_pipeline(
        tmp_path, teachers={"given": {"recipe": str(RECIPES / "digits_teacher.yaml"), "checkpoint": str(model)}},
        nasty={}, defences={"given + stingy": {"teacher": "given", "set": {"defence.name": "stingy"}}},
        students={"MLP": {"recipe": str(RECIPES / "digits_student.yaml"), "baseline": False},
                  "alone": {"recipe": str(RECIPES / "digits_student.yaml"), "teachers": []}})
    stages = by_name(pipeline.expand(pipeline.load_pipeline(path)))
    assert list(stages) == ["seed0/student/mlp/given", "seed0/student/mlp/given-stingy", "seed0/baseline/alone"]
    defended = stages["seed0/student/mlp/given-stingy"]
    assert defended.needs == () and defended.row == "given + stingy"
    assert f"distill.teacher_checkpoint={model}" in defended.overrides and "defence.name=stingy" in defended.overrides
    assert not any(o.startswith("defence.") for o in stages["seed0/student/mlp/given"].overrides)


@pytest.mark.parametrize(("changes", "message"), [
    ({"teachers": {"T": {"recipe": str(RECIPES / "digits_teacher.yaml"), "checkpoint": "/nope/model.safetensors"}},
      "nasty": {}}, "teachers.T.checkpoint: /nope/model.safetensors not found"),
    ({"defences": {"D": {"teacher": "nobody", "set": {}}}}, "defences.D.teacher: 'nobody' is not a key of teachers or nasty"),
    ({"nasty": {"N": {"recipe": str(RECIPES / "digits_nasty.yaml"), "adversary": "CNN normal", "checkpoint": "/x"}}},
     "nasty.N.checkpoint: a given model is a teachers entry"),
])
def test_bad_given_models_and_defence_rows_are_one_line(tmp_path: Path, changes: dict, message: str):
    with pytest.raises(UserError, match=re.escape(message)):
        pipeline.load_pipeline(write_pipeline(tmp_path, **changes))


# ----------------------------------------------------------------------------- nothing mixed, nothing orphaned


def test_a_retrained_teacher_makes_its_dependants_stale_and_they_train_again(tmp_path: Path):
    """The probe: change the teacher's recipe (refused), move its folder away, rerun. The new
    teacher has new weights, so the nasty teacher and the students that learned from the old one
    are trained again (old runs moved aside), and only the baseline is kept."""
    path = write_pipeline(tmp_path, set={**TINY, "tracking.enabled": False})
    command = [NT_DIST, "pipeline", str(path), "--no-report"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0 and "5 stages: 5 ran" in first.stdout, first.stderr[-2000:]

    tree = yaml.safe_load(path.read_text())
    tree["teachers"]["CNN normal"]["set"] = {"optim.lr": 0.1}
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    refused = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert refused.returncode == 1 and "holds a run of another recipe (optim.lr: 0.05 -> 0.1)" in refused.stdout

    runs = tmp_path / "runs/seed0"
    (runs / "teacher/cnn-normal").rename(tmp_path / "old-teacher")
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "5 stages: 4 ran, 1 skipped" in again.stdout
    stale = sorted(line.split()[3].rstrip(":") for line in again.stderr.splitlines() + again.stdout.splitlines()
                   if line.startswith("nt-dist pipeline: stale "))
    assert stale == ["seed0/nasty/cnn-nasty", "seed0/student/mlp/cnn-nasty", "seed0/student/mlp/cnn-normal"]
    for folder in ("nasty/cnn-nasty", "student/mlp/cnn-normal", "student/mlp/cnn-nasty"):
        assert len(list((runs / folder).parent.glob(f"{Path(folder).name}.old-*"))) == 1, folder
    assert not list((runs / "baseline").glob("mlp.old-*"))
    # each dependant now records the model its input stage holds now
    from nt_dist.fileio import file_sha256

    inputs = json.loads((runs / "nasty/cnn-nasty/inputs.json").read_text())
    assert inputs["nasty.adversary_checkpoint"]["sha256"] == file_sha256(runs / "teacher/cnn-normal/model.safetensors")
    final = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert "5 stages: 0 ran, 5 skipped" in final.stdout


@pytest.mark.parametrize("args, changes, expected", [
    (["--set", "optim.lrr=0.1"], {}, "optim.lrr: unknown key"),
    ([], {"sweep": {"nasty.omega": [0.01, -1]}}, "stage seed0/nasty/cnn-nasty/nasty.omega-1: "),
])
def test_every_stage_is_validated_before_anything_trains(tmp_path: Path, args, changes, expected):
    path = write_pipeline(tmp_path, **changes)
    proc = subprocess.run([NT_DIST, "pipeline", str(path), *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nt-dist: error: ") and expected in lines[0], lines
    assert not (tmp_path / "runs/seed0").exists()  # nothing trained, not even the stages that were valid


def test_sigterm_to_a_parallel_pipeline_reaches_every_stage_and_leaves_no_orphan(tmp_path: Path):
    """The probe: kill -TERM the pipeline's own pid during --parallel 2. Both stages checkpoint
    and exit 75, the pipeline prints one line and exits 75, no stage process outlives it, and the
    same command again resumes both (their logs kept, appended to)."""
    import fcntl

    long = {"recipe": str(RECIPES / "digits_teacher.yaml"), "set": {"run.epochs": 40}}
    path = write_pipeline(tmp_path, set={**TINY, "run.checkpoint_every_steps": 2, "tracking.enabled": False},
                          teachers={"A": long, "B": long}, nasty={}, students={})
    command = [NT_DIST, "pipeline", str(path), "--no-report", "--parallel", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    folders = [tmp_path / "runs/seed0/teacher" / name for name in ("a", "b")]
    deadline = time.time() + 600
    while (not all(list((f / "checkpoints").glob("step_*")) for f in folders) and proc.poll() is None
           and time.time() < deadline):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert [line for line in err.splitlines() if line.startswith("nt-dist: preempted")] == [
        f"nt-dist: preempted: checkpoint saved in {folders[0]}, {folders[1]}; run the same command again to resume"]
    assert "Traceback" not in err
    for folder in folders:  # the lock is free: the stage's process has ended
        with open(folder / ".nt-dist.lock") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not (folder / "metrics.json").exists()
    logs = [tmp_path / f"runs/logs/seed0__teacher__{name}.log" for name in ("a", "b")]
    assert all("nt-dist: preempted: checkpoint saved in" in log.read_text() for log in logs)
    again = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 stages: 2 ran, 0 skipped" in again.stdout
    for log in logs:  # the first attempt's lines are still there, then the resumed run's
        text = log.read_text()
        assert text.count("=== nt-dist pipeline:") == 2 and text.index("preempted") < text.index("resumed from")
