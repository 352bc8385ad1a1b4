"""MLflow: params, per-epoch metrics, lineage tags and artifacts; FAILED runs; a real server."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from conftest import ON_CUDA, REPO, MlflowServer, free_port, tiny_overrides
from mlflow.tracking import MlflowClient

from nt_dist import train as train_module
from nt_dist.config import load_recipe
from nt_dist.train import train

RECIPES = REPO / "recipes"


def recipe(name: str, out: Path, role: str, **extra: str):
    return load_recipe(RECIPES / name, tiny_overrides(out, role, **{"run.epochs": "1", **extra}))


def run_of(out: Path) -> tuple[MlflowClient, object]:
    run_id = json.loads((out / "metrics.json").read_text())["mlflow_run_id"]
    client = MlflowClient()
    return client, client.get_run(run_id)


def test_run_logs_metrics_and_artifacts_to_the_local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import os

    out = tmp_path / "teacher"
    train(recipe("digits_teacher.yaml", out, "teacher"))
    # artifact locations are relative to the store's folder: MLflow's client reads them from there
    monkeypatch.chdir(Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent)
    client, run = run_of(out)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "train_ce", "test_top1", "test_top5", "lr", "images_per_s", "epoch_time_s"):
        assert key in run.data.metrics, key
    assert ("peak_memory_mb" in run.data.metrics) == ON_CUDA  # device memory: logged on a GPU only
    assert run.data.tags["top1"] == f"{run.data.metrics['test_top1']:.2f}"  # the runs table shows it whole
    assert run.data.tags["role"] == "normal" and run.info.run_name == "test_teacher"  # the user's run.name
    assert list(run.data.params)[:3] == ["Network", "Role", "Teacher"]
    assert (run.data.params["Role"], run.data.params["Teacher"]) == ("normal", "-")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"resolved_recipe.yaml", "model.safetensors",
                                                                       "metrics.json"}
    history = client.get_metric_history(run.info.run_id, "test_top1")
    assert [m.step for m in history] == [8]


def test_failed_run_ends_failed_not_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def broken_evaluate(run):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(train_module, "evaluate_run", broken_evaluate)
    out = tmp_path / "failing"
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(recipe("digits_teacher.yaml", out, "teacher", **{"run.name": "failing_run"}))
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id], "tags.`mlflow.runName` = 'failing_run'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (out / "metrics.json").exists()  # not marked complete


def test_unreachable_server_does_not_stop_training_and_loses_nothing(tmp_path: Path, capsys, monkeypatch):
    """Nothing listens at the tracking URI: the run trains to the end, every event is in
    metrics.jsonl, and what MLflow never accepted is in mlflow_undelivered.jsonl."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    out = tmp_path / "offline"
    final = train(recipe("digits_teacher.yaml", out, "teacher",
                         **{"tracking.uri": f"http://127.0.0.1:{free_port()}", "tracking.timeout_s": "2"}))
    assert final["test_top1"] >= 0 and (out / "model.safetensors").is_file()
    undelivered = [json.loads(line) for line in (out / "mlflow_undelivered.jsonl").read_text().splitlines()]
    kinds = [u["kind"] for u in undelivered]
    assert kinds[0] == "create" and kinds[-1] == "status" and "metrics" in kinds and "artifact" in kinds
    logged = [u["payload"]["values"] for u in undelivered if u["kind"] == "metrics"]
    local = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["test_top1"] == pytest.approx(local[-1]["test_top1"])
    err = capsys.readouterr().err
    assert "nt-dist: warning: MLflow" in err and "mlflow_undelivered.jsonl" in err


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    yield server.url
    server.stop()


def rest(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_training_logs_to_a_real_server(tmp_path: Path, mlflow_server: str):
    out = tmp_path / "served"
    train(recipe("digits_teacher.yaml", out, "teacher", **{"tracking.uri": mlflow_server,
                                                          "tracking.experiment": "served"}))
    experiments = rest(mlflow_server, "/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
    exp_id = next(e["experiment_id"] for e in experiments if e["name"] == "served")
    runs = rest(mlflow_server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
    assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
    summary = json.loads((out / "metrics.json").read_text())
    assert metrics["test_top1"] == pytest.approx(summary["final"]["test_top1"])
    with urllib.request.urlopen(f"{mlflow_server}/", timeout=10) as response:  # the UI page
        assert response.status == 200


# ---------------------------------------------------------------- read back through a real server


def test_runs_read_back_through_a_server_log_what_their_role_used(tmp_path: Path, mlflow_server: str):
    """Four roles, each logged to a real server and read back over HTTP: params of the sections
    the role uses, lineage by run name with a link in the description, the data set inputs,
    MLflow's system metrics, the source commit, the experiment's runs view."""
    import subprocess

    from mlflow.tracking import MlflowClient

    common = {"tracking.uri": mlflow_server, "tracking.experiment": "lineage",
              "tracking.system_metrics_interval_s": "0.2"}
    folders = {role: tmp_path / role for role in ("teacher", "nasty", "baseline", "student")}
    train(recipe("digits_teacher.yaml", folders["teacher"], "teacher", **common))
    train(recipe("digits_nasty.yaml", folders["nasty"], "nasty", **common,
                 **{"nasty.adversary_checkpoint": str(folders["teacher"]), "run.name": "run"}))  # the default
    train(recipe("digits_student.yaml", folders["baseline"], "baseline", **common))
    train(recipe("digits_student.yaml", folders["student"], "student", **common,
                 **{"distill.teacher_checkpoint": str(folders["nasty"]), "run.name": "run", "run.seed": "3"}))
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = {role: client.get_run(json.loads((folder / "metrics.json").read_text())["mlflow_run_id"])
            for role, folder in folders.items()}
    experiment = client.get_experiment_by_name("lineage")

    sections = {role: {key.split(".")[0] for key in run.data.params if "." in key} for role, run in runs.items()}
    assert sections == {"teacher": {"run", "data", "model", "optim"}, "baseline": {"run", "data", "model", "optim"},
                        "nasty": {"run", "data", "model", "optim", "nasty"},
                        "student": {"run", "data", "model", "optim", "distill"}}
    assert runs["nasty"].data.params["nasty.omega"] == "0.05" and runs["student"].data.params["distill.tau"] == "8.0"
    assert "run.description" not in runs["teacher"].data.params

    nasty_tags, student_tags = runs["nasty"].data.tags, runs["student"].data.tags
    teacher_id = runs["teacher"].info.run_id
    assert (nasty_tags["adversary_run_name"], nasty_tags["adversary_run_id"]) == ("test_teacher", teacher_id)
    assert nasty_tags["adversary_experiment"] == "lineage"
    # run.name left at its default: the short name; the student's lineage names the nasty run by it
    names = {role: run.info.run_name for role, run in runs.items()}
    assert names == {"teacher": "test_teacher", "nasty": "s0 nasty cnn", "baseline": "test_baseline",
                     "student": "s3 mlp ← nasty cnn"}
    assert (student_tags["teacher_run_name"], student_tags["teacher_experiment"]) == ("s0 nasty cnn", "lineage")
    assert "teacher_run_name" not in runs["baseline"].data.tags
    roles = {role: run.data.tags["role"] for role, run in runs.items()}
    assert roles == {"teacher": "normal", "nasty": "nasty", "baseline": "baseline", "student": "student"}
    assert (student_tags["teacher"], nasty_tags["adversary"]) == ("nasty cifar_cnn", "normal cifar_cnn")
    # the frozen networks' paths, relative to the run folder (tmp_path/<role>)
    assert (student_tags["teacher_checkpoint"], nasty_tags["adversary_checkpoint"]) == ("../nasty", "../teacher")
    assert "`../nasty`" in student_tags["mlflow.note.content"] and str(tmp_path) not in student_tags["mlflow.note.content"]
    # the same key is the same quantity in every run: the KL is named after what it is measured against
    assert "train_kl_teacher" in runs["student"].data.metrics and "train_kl_adversary" in runs["nasty"].data.metrics
    assert not any("train_kl" in run.data.metrics for run in runs.values())
    assert {run.data.params["Teacher"] for run in runs.values()} == {"-", "nasty cifar_cnn"}
    note = nasty_tags["mlflow.note.content"]
    assert note.startswith("Nasty teacher")  # recipes/digits_nasty.yaml's header comment
    assert f"[test_teacher](#/experiments/{experiment.experiment_id}/runs/{teacher_id}) in experiment lineage" in note
    assert "[s0 nasty cnn](#/experiments/" in student_tags["mlflow.note.content"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # the suite runs from a checkout
        assert runs["teacher"].data.tags["mlflow.source.git.commit"] == head.stdout.strip()

    for role, run in runs.items():
        inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"digits-train", "digits-test"}, role
        train_input = inputs["digits-train"]
        assert json.loads(train_input.dataset.profile)["images"] == 256  # data.train_subset
        assert [(t.key, t.value) for t in train_input.tags] == [("mlflow.data.context", "train")]
        assert len(train_input.dataset.digest) == 16
        assert "system/cpu_utilization_percentage" in run.data.metrics, role
        assert "system/system_memory_usage_megabytes" in run.data.metrics, role
    digests = {run.inputs.dataset_inputs[0].dataset.digest for run in runs.values()}
    assert len(digests) == 1  # the same pixels: the same digest

    state = json.loads(json.loads(experiment.tags["mlflow.sharedViewState.nt-dist"])["state"])
    assert state["selectedColumns"][:4] == ["tags.`top1`", "tags.`role`", "tags.`architecture`", "tags.`teacher`"]
    assert state["columnOrder"] == ["attributes.`Run Name`", *state["selectedColumns"]]
    # MLflow 3.17 at 1440 px: a 1188 px table, of which the checkbox, Created and Duration take 303
    assert sum(state["columnWidths"].values()) <= 1188 - 303


def test_a_report_run_holds_the_table_as_artifact_and_description(tmp_path: Path, mlflow_server: str):
    from mlflow.tracking import MlflowClient

    from nt_dist import report

    table = tmp_path / "report.csv"
    table.write_text("row,column,mean\nnormal,mlp,97.5\nnasty,mlp,92.1\n")
    run_id = report.log_to_mlflow([table], "reports", mlflow_server, "tiny", "", "| row | mlp |\n|---|---|")
    run = MlflowClient(tracking_uri=mlflow_server).get_run(run_id)
    assert run.data.tags["mlflow.note.content"] == "| row | mlp |\n|---|---|"
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": "results_table.json", "type": "table"}]
    with urllib.request.urlopen(f"{mlflow_server}/get-artifact?path=results_table.json&run_uuid={run_id}",
                                timeout=10) as response:
        assert json.loads(response.read()) == {"columns": ["row", "column", "mean"],
                                               "data": [["normal", "mlp", "97.5"], ["nasty", "mlp", "92.1"]]}


def test_a_moved_store_keeps_its_artifacts_in_the_ui(tmp_path: Path):
    """Runs logged to ./mlflow.db, the folder moved, then `nt-dist ui` on the new place: the
    artifacts are found (their locations are relative to the store), the UI starts without
    MLflow's job runner and prints each experiment's runs view."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import psutil

    first, moved = tmp_path / "first", tmp_path / "moved"
    first.mkdir()
    out = first / "runs" / "teacher"
    train(recipe("digits_teacher.yaml", out, "teacher", **{"tracking.uri": f"sqlite:///{first / 'mlflow.db'}",
                                                          "tracking.experiment": "portable"}))
    run_id = json.loads((out / "metrics.json").read_text())["mlflow_run_id"]
    expected = (out / "metrics.json").read_bytes()
    shutil.move(first, moved)

    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("nt-dist")), "ui", "--port", str(port)],
                                cwd=moved, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, body = time.time() + 120, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/get-artifact?path=metrics.json&run_uuid={run_id}",
                                            timeout=5) as response:
                    body = response.read()
            except OSError:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.5)
        assert body == expected
        processes = psutil.Process(proc.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in processes]
        assert not any("huey" in c or "_job_runner" in c for c in commands), commands
        assert len(processes) <= 2, commands  # the mlflow CLI and its one uvicorn worker
        # The server answers before `nt-dist ui` sees /health and prints its lines (one write): wait for them.
        want = f"MLflow UI on http://127.0.0.1:{port}"
        deadline, printed = time.time() + 60, log.read_text()
        while want not in printed and time.time() < deadline:
            assert proc.poll() is None, printed
            time.sleep(0.2)
            printed = log.read_text()
        assert want in printed
        assert (f"portable: http://127.0.0.1:{port}/#/experiments/1/runs?viewStateShareKey=nt-dist"
                "&workflowType=machine_learning") in printed
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_nt_dist_train_piped_writes_epoch_lines_and_a_closing_line(tmp_path: Path):
    """What a SLURM log or `| tee` receives: no progress-bar frames, no third-party warnings,
    one line per epoch, and where the model and the MLflow run went. The experiment is named
    after the recipe file."""
    import os
    import re
    import subprocess
    import sys

    overrides = [o for o in tiny_overrides(tmp_path / "piped") if not o.startswith("tracking.experiment=")]
    overrides = [o.replace("run.progress=false", "run.progress=true") for o in overrides]
    proc = subprocess.run([str(Path(sys.executable).with_name("nt-dist")), "train", str(RECIPES / "digits_teacher.yaml"),
                           *sum((["--set", o] for o in overrides), [])], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout + proc.stderr
    assert "WARNING" not in proc.stdout + proc.stderr and "Setting accelerator" not in proc.stdout
    lines = proc.stdout.splitlines()
    assert [line.split()[2] for line in lines if " epoch " in line] == ["1/2", "2/2"]
    run_id = json.loads((tmp_path / "piped" / "metrics.json").read_text())["mlflow_run_id"]
    closing = re.fullmatch(r"\[test_teacher\] done: test_top1=\d+\.\d\d, model (\S+); MLflow run (\w+) in "
                           r"digits_teacher \(nt-dist ui, then http://127\.0\.0\.1:5000/#/experiments/(\d+)/runs/(\w+)"
                           r"\?workflowType=machine_learning\)", lines[-1])
    assert closing, lines[-1]
    assert Path(closing[1]) == tmp_path / "piped" / "model.safetensors" and closing[2] == closing[4] == run_id


def test_an_unreachable_store_reads_as_one_line_and_a_local_fault_does_not():
    """The reason comes from the socket's error under MLflow's and requests' wrappers; a missing
    local file is an OSError too, and no reason to call a server silent."""
    from nt_dist.errors import UserError
    from nt_dist.reach import network_failure, store_errors, within

    uri = f"http://127.0.0.1:{free_port()}"
    client = MlflowClient(tracking_uri=uri)
    with pytest.raises(UserError, match=rf"^MLflow at {uri} is not answering \(connection refused\); hint$"), \
            store_errors(uri, "; hint"):
        within(30, lambda: client.get_experiment_by_name("x"))
    assert network_failure(FileNotFoundError(2, "No such file or directory")) is None
    with pytest.raises(FileNotFoundError), store_errors(uri):
        raise FileNotFoundError(2, "No such file or directory")


# ---------------------------------------------------------------- how runs read in the UI


def model_file(folder: Path, role: str, architecture: str) -> Path:
    """A model.safetensors whose metadata names its role and network (what export_model records)."""
    import torch

    from nt_dist.checkpoint import export_model

    folder.mkdir(parents=True)
    export_model({"w": torch.zeros(1)}, folder / "model.safetensors", {"role": role, "architecture": architecture})
    return folder


def named(tmp_path: Path, role: str, architecture: str, seed: int = 0, run_name: str = "run",
          given: str = "", **tags: str) -> tuple[str, dict[str, str], dict]:
    from nt_dist.tracking_names import present

    params = {"run.name": run_name, "run.role": role, "run.seed": seed, "model.name": architecture}
    return present(given or run_name, params, {"role": role, "architecture": architecture, **tags},
                   tmp_path / "runs" / "this")


def test_run_names_say_seed_role_network_and_teacher(tmp_path: Path):
    nasty = model_file(tmp_path / "runs" / "nasty", "nasty", "cifar_resnet18")
    normal = model_file(tmp_path / "runs" / "normal", "teacher", "cifar_cnn")
    student = {"teacher_checkpoint": str(nasty), "teacher_architecture": "cifar_resnet18", "attack": "kd",
               "defence": "none"}
    # nt_dist's CIFAR-stem networks without their cifar_ prefix (the tags name them in full)
    assert named(tmp_path, "teacher", "cifar_resnet18")[0] == "s0 normal resnet18"
    assert named(tmp_path, "nasty", "cifar_resnet18", adversary_checkpoint=str(normal),
                 adversary_architecture="cifar_resnet18")[0] == "s0 nasty resnet18"
    assert named(tmp_path, "baseline", "cifar_shufflenetv2", seed=2)[0] == "s2 baseline shufflenetv2"
    assert named(tmp_path, "student", "cifar_shufflenetv2", **student)[0] == "s0 shufflenetv2 ← nasty resnet18"
    assert named(tmp_path, "student", "mlp", **{**student, "teacher_checkpoint": str(normal),
                                               "teacher_architecture": "cifar_cnn"})[0] == "s0 mlp ← normal cnn"
    assert named(tmp_path, "student", "mlp", **{**student, "attack": "dafl", "defence": "noise"})[0] == \
        "s0 mlp dafl ← nasty resnet18+noise"
    assert named(tmp_path, "student", "resnet18", **student)[0] == "s0 resnet18 ← nasty resnet18"  # a timm network
    # a stage of `nt-dist pipeline` is named by nt_dist, its sweep values included
    assert named(tmp_path, "nasty", "cifar_cnn", run_name="tiny/seed1/nasty/cnn-nasty/nasty.omega-0.1", seed=1,
                 table="tiny", stage="nasty", **{"sweep.nasty.omega": "0.1"})[0] == "s1 nasty cnn omega=0.1"
    audit = {"table": "audit", "stage": "student", "row": "reference + noise"}
    assert named(tmp_path, "student", "mlp", run_name="audit/seed0/student/kd-4-0.9/reference-noise",
                 **{**student, **audit, "column": "KD τ=4 α=0.9"})[0] == "s0 KD τ=4 α=0.9 ← nasty resnet18"
    assert named(tmp_path, "student", "cifar_shufflenetv2", run_name="audit/seed0/student/shufflenetv2/x",
                 **{**student, **audit, "column": "ShuffleNetV2"})[0] == "s0 shufflenetv2 ← nasty resnet18"
    # a name the user chose stays: a recipe's run.name, or tracking.run_name
    assert named(tmp_path, "student", "mlp", run_name="student_kd_nasty", **student)[0] == "student_kd_nasty"
    assert named(tmp_path, "student", "mlp", run_name="tiny/seed0/student/mlp/x", given="mine", table="tiny",
                 stage="student", **student)[0] == "mine"


def test_presented_tags_and_params_read_as_the_ui_shows_them(tmp_path: Path):
    nasty = model_file(tmp_path / "runs" / "nasty", "nasty", "cifar_cnn")
    note = f"Student.\n\nDistilled from: [tiny/seed0/nasty](#/experiments/1/runs/r1) (cifar_cnn, `{nasty}`)"
    name, tags, params = named(tmp_path, "student", "mlp", teacher_checkpoint=str(nasty),
                               teacher_architecture="cifar_cnn", **{"mlflow.note.content": note})
    assert tags["mlflow.runName"] == name and tags["teacher"] == "nasty cifar_cnn" and tags["seed"] == "0"
    assert tags["teacher_checkpoint"] == "../nasty"  # relative to tmp_path/runs/this
    assert tags["mlflow.note.content"].endswith("(cifar_cnn, `../nasty`)")
    assert list(params)[:3] == ["Network", "Role", "Teacher"] and params["Teacher"] == "nasty cifar_cnn"
    assert named(tmp_path, "teacher", "cifar_cnn")[1]["role"] == "normal"


def test_mlflow_gets_test_top1_first_a_rounded_top1_tag_and_the_kl_by_what_it_is_against():
    from nt_dist.tracking_names import mlflow_metrics, top1_tag

    epoch = {"train_loss": 1.0, "train_ce": 0.5, "train_kl": 0.1, "test_top1": 95.83333333, "lr": 0.1}
    assert list(mlflow_metrics(epoch, ["teacher"])) == ["test_top1", "train_loss", "train_ce", "train_kl_teacher", "lr"]
    assert "train_kl_adversary" in mlflow_metrics(epoch, ["adversary"]) and "train_kl" in mlflow_metrics(epoch, [])
    assert top1_tag(epoch) == {"top1": "95.83"} and top1_tag({"lr": 0.1}) == {}


def test_the_closing_line_names_the_port_nt_dist_ui_serves_the_store_on(tmp_path: Path, monkeypatch):
    from nt_dist.console import mlflow_where
    from nt_dist.tracking_ui import record_ui

    monkeypatch.chdir(tmp_path)
    run = recipe("digits_teacher.yaml", tmp_path / "t", "teacher", **{"tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"})
    page = "#/experiments/4/runs/abc?workflowType=machine_learning"
    assert mlflow_where(run, "abc", "4") == f"MLflow run abc in tests (nt-dist ui, then http://127.0.0.1:5000/{page})"
    record_ui(tmp_path, "0.0.0.0", 5077)
    assert mlflow_where(run, "abc", "4") == (f"MLflow run abc in tests (nt-dist ui --port 5077, then "
                                             f"http://127.0.0.1:5077/{page})")
    served = recipe("digits_teacher.yaml", tmp_path / "t", "teacher", **{"tracking.uri": "http://box:5001/"})
    assert mlflow_where(served, "abc", "4") == f"MLflow run abc: http://box:5001/{page}"


def test_nt_dist_ui_prints_its_address_once_mlflow_answers_and_sigterm_stops_every_process(tmp_path: Path):
    """A real `nt-dist ui` over a copy of the session's store: the address line appears only
    when /health answers; SIGTERM to nt-dist ui alone leaves nothing answering on the port and
    none of the processes it started alive."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import psutil

    shutil.copy(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"), tmp_path / "mlflow.db")
    port, log = free_port(), tmp_path / "ui.log"
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    with log.open("w") as sink:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("nt-dist")), "ui", "--port", str(port)],
                                cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while f"MLflow UI on {url}" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        assert answers(), "the address was printed before MLflow answered"
        assert "nt-dist ui: starting the MLflow server" in log.read_text()
        assert json.loads((tmp_path / ".nt-dist-ui.json").read_text()) == {"host": "127.0.0.1", "port": port}
        started = psutil.Process(proc.pid).children(recursive=True)
        assert started, "nt-dist ui runs MLflow's server as its child"
        os.kill(proc.pid, signal.SIGTERM)  # nt-dist ui alone, as `kill -TERM` does
        stopped = time.time() + 15
        while answers() and time.time() < stopped:
            time.sleep(0.2)
        assert not answers(), "MLflow still answers after nt-dist ui was stopped"
        assert proc.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(started, timeout=15)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_nt_dist_ui_refuses_a_taken_port_and_names_a_server_that_never_answers(tmp_path: Path, capsys):
    import socket

    from nt_dist.cli import main

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database, " * 64)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--db", str(db), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"nt-dist: error: --port: {port}: something already listens on 127.0.0.1:{port}; stop it or pass " \
           "another --port" in err
    port = free_port()
    assert main(["ui", "--db", str(db), "--port", str(port)]) == 1  # MLflow refuses the file and exits
    err = capsys.readouterr().err
    assert f"nt-dist: error: the MLflow UI exited (code 1) before answering on port {port}; its messages are " \
           "above" in err
    assert f"MLflow UI on http://127.0.0.1:{port}" not in err
