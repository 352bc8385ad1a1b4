"""MLflow: params, per-epoch metrics, lineage tags and artifacts; FAILED runs; a real server."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, MlflowServer, free_port, tiny_overrides
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
    assert "peak_memory_mb" not in run.data.metrics  # device memory: logged on a GPU only
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
                 **{"nasty.adversary_checkpoint": str(folders["teacher"])}))
    train(recipe("digits_student.yaml", folders["baseline"], "baseline", **common))
    train(recipe("digits_student.yaml", folders["student"], "student", **common,
                 **{"distill.teacher_checkpoint": str(folders["nasty"])}))
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = {role: client.get_run(json.loads((folder / "metrics.json").read_text())["mlflow_run_id"])
            for role, folder in folders.items()}
    experiment = client.get_experiment_by_name("lineage")

    sections = {role: {key.split(".")[0] for key in run.data.params} for role, run in runs.items()}
    assert sections == {"teacher": {"run", "data", "model", "optim"}, "baseline": {"run", "data", "model", "optim"},
                        "nasty": {"run", "data", "model", "optim", "nasty"},
                        "student": {"run", "data", "model", "optim", "distill"}}
    assert runs["nasty"].data.params["nasty.omega"] == "0.05" and runs["student"].data.params["distill.tau"] == "8.0"
    assert "run.description" not in runs["teacher"].data.params

    nasty_tags, student_tags = runs["nasty"].data.tags, runs["student"].data.tags
    teacher_id = runs["teacher"].info.run_id
    assert (nasty_tags["adversary_run_name"], nasty_tags["adversary_run_id"]) == ("test_teacher", teacher_id)
    assert nasty_tags["adversary_experiment"] == "lineage"
    assert (student_tags["teacher_run_name"], student_tags["teacher_experiment"]) == ("test_nasty", "lineage")
    assert "teacher_run_name" not in runs["baseline"].data.tags
    note = nasty_tags["mlflow.note.content"]
    assert note.startswith("Nasty teacher")  # recipes/digits_nasty.yaml's header comment
    assert f"[test_teacher](#/experiments/{experiment.experiment_id}/runs/{teacher_id}) in experiment lineage" in note
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

    view = json.loads(experiment.tags["mlflow.sharedViewState.nt-dist"])
    assert "metrics.`test_top1`" in json.loads(view["state"])["selectedColumns"]


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
        printed = log.read_text()
        assert f"MLflow UI on http://127.0.0.1:{port}" in printed
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
                           r"digits_teacher \(nt-dist ui, then http://127\.0\.0\.1:5000/#/experiments/(\d+)/runs/(\w+)\)",
                           lines[-1])
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
