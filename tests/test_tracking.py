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


def test_run_logs_params_metrics_tags_artifacts_and_lineage(tmp_path: Path):
    teacher, nasty = tmp_path / "teacher", tmp_path / "nasty"
    train(recipe("digits_teacher.yaml", teacher, "teacher"))
    train(recipe("digits_nasty.yaml", nasty, "nasty", **{"nasty.adversary_checkpoint": str(teacher)}))
    client, t_run = run_of(teacher)
    _, n_run = run_of(nasty)
    for run, role in ((t_run, "teacher"), (n_run, "nasty")):
        assert run.info.status == "FINISHED"
        assert run.data.tags["role"] == role and run.data.tags["dataset"] == "digits"
        assert run.data.tags["architecture"] == "cifar_cnn"
        assert run.data.params["run.role"] == role and run.data.params["data.name"] == "digits"
        for key in ("train_loss", "train_ce", "test_top1", "test_top5", "lr", "images_per_s",
                    "epoch_time_s", "peak_memory_mb"):
            assert key in run.data.metrics, key
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"resolved_recipe.yaml", "model.safetensors", "metrics.json"} <= artifacts
    assert n_run.data.params["nasty.omega"] == "0.05"
    assert "train_kl" in n_run.data.metrics
    # lineage: the nasty teacher's run names the run that produced its adversary
    assert n_run.data.tags["adversary_run_id"] == t_run.info.run_id
    assert n_run.data.tags["adversary_checkpoint"] == str(teacher.resolve())
    history = client.get_metric_history(t_run.info.run_id, "test_top1")
    assert [m.step for m in history] == [8]


def test_failed_run_ends_failed_not_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def broken_evaluate(run):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(train_module, "evaluate", broken_evaluate)
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
