"""`nt-dist report`: the paper's layout, mean ± std over seeds, deltas, the paper beside, plots."""

from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient
from test_array_cache import needs_user
from test_faults import DROP_ROOT_RIGHTS, one_error

from nt_dist import report
from nt_dist.errors import UserError
from nt_dist.report import Result

NT_DIST = str(Path(sys.executable).with_name("nt-dist"))


def table1_results(sweep: tuple = ()) -> list[Result]:
    """Two seeds of one Table-1 column (CNN), numbers chosen to check by hand."""
    rows = [("baseline", "student baseline", "CNN", (80.0, 82.0), ""),
            ("teacher", "ResNet-18 normal", "teacher", (95.0, 97.0), ""),
            ("nasty", "ResNet-18 nasty", "teacher", (94.0, 95.0), "ResNet-18 normal"),
            ("student", "ResNet-18 normal", "CNN", (84.0, 86.0), ""),
            ("student", "ResNet-18 nasty", "CNN", (70.0, 71.0), "")]
    return [Result(kind, row, column, seed, sweep, value, ref)
            for kind, row, column, values, ref in rows for seed, value in enumerate(values)]


def test_cells_are_mean_and_sample_std_over_seeds_with_deltas():
    table = report.build_table(table1_results(), "T")
    assert table.rows == ["student baseline", "ResNet-18 normal", "ResNet-18 nasty"]
    assert table.columns == ["teacher", "CNN"] and table.seeds == 2
    cell = table.cells["ResNet-18 nasty", "CNN"]
    assert (cell.mean, cell.std, cell.delta) == (70.5, pytest.approx(0.5 ** 0.5), -10.5)  # 70.5 - 81
    assert table.cells["ResNet-18 normal", "CNN"].delta == 4.0
    assert table.cells["ResNet-18 nasty", "teacher"].delta == -1.5  # 94.5 - 96
    assert table.cells["ResNet-18 normal", "teacher"].delta is None
    assert table.cells["student baseline", "CNN"].text() == "81.00 ± 1.41"


def test_markdown_puts_the_papers_figure_beside_each_cell():
    text = report.markdown(report.build_table(table1_results(), "Table 1: CIFAR-10"), paper="table1")
    lines = text.splitlines()
    assert lines[0] == "### Table 1: CIFAR-10"
    assert lines[2] == "| Teacher | Teacher top-1 | Student CNN |"
    assert lines[4] == "| student baseline | – | 81.00 ± 1.41 · paper 86.64 |"
    assert lines[5] == "| ResNet-18 normal | 96.00 ± 1.41 · paper 95.13 | 85.00 ± 1.41 (+4.00) · paper 87.75 (+1.11) |"
    assert lines[6] == ("| ResNet-18 nasty | 94.50 ± 0.71 (−1.50) · paper 94.56 (−0.57) | "
                        "70.50 ± 0.71 (−10.50) · paper 82.46 (−4.18) |")
    assert "over 2 seed(s)" in lines[-1] and "best test epoch" in lines[-1] and "final-epoch" in lines[-1]


def test_a_self_column_compares_with_the_rows_normal_teacher():
    results = [Result("teacher", "R50 normal", "teacher", 0, (), 78.0),
               Result("nasty", "R50 nasty", "teacher", 0, (), 77.0, "R50 normal"),
               Result("student", "R50 normal", "self", 0, (), 80.0, "R50 normal"),
               Result("student", "R50 nasty", "self", 0, (), 75.0, "R50 normal")]
    table = report.build_table(results, "T")
    assert table.cells["R50 nasty", "self"].delta == -3.0 and table.cells["R50 normal", "self"].delta == 2.0
    assert ("student baseline", "self") not in table.cells


def test_csv_is_one_line_per_cell_with_the_seeds_values():
    tables = [report.build_table(table1_results((("nasty.omega", "0.004"),)), "T", (("nasty.omega", "0.004"),))]
    rows = list(csv.DictReader(io.StringIO(report.csv_text(tables, "table1"))))
    assert len(rows) == 5
    nasty = next(r for r in rows if r["row"] == "ResNet-18 nasty" and r["column"] == "CNN")
    assert nasty == {"table": "T", "sweep": "nasty.omega=0.004", "row": "ResNet-18 nasty", "column": "CNN", "n": "2",
                     "mean": "70.5000", "std": "0.7071", "delta": "-10.5000", "delta_n": "2", "paper": "82.46",
                     "paper_delta": "-4.18", "values": "70.00 71.00", "shrunk": "0"}


def test_a_change_is_over_the_seeds_both_cells_have():
    """Seed 1 of the nasty teacher (and of its student) is missing: its change compares its
    seed 0 with the normal teacher's seed 0 (94 - 95), not with the two-seed mean (94 - 96);
    the cell says it is over one seed. A cell over every seed whose reference misses one says
    its change is over one."""
    results = [r for r in table1_results() if not (r.row == "ResNet-18 nasty" and r.seed == 1)]
    results.append(Result("student", "ResNet-18 nasty", "CNN", 1, (), 71.0))
    results = [r for r in results if not (r.kind == "baseline" and r.seed == 1)]
    table = report.build_table(results, "T")
    teacher, student = table.cells["ResNet-18 nasty", "teacher"], table.cells["ResNet-18 nasty", "CNN"]
    assert (teacher.values, teacher.delta, teacher.paired) == ((94.0,), -1.0, 1)
    assert (student.values, student.delta, student.paired) == ((70.0, 71.0), -10.0, 1)  # 70 - 80, seed 0 only
    assert table.cells["ResNet-18 normal", "CNN"].delta == 4.0  # 84 - 80: seed 1 has no baseline
    lines = report.markdown(table).splitlines()
    assert lines[4] == "| student baseline | – | 80.00 · n=1 |"
    assert lines[6] == "| ResNet-18 nasty | 94.00 (−1.00) · n=1 | 70.50 ± 0.71 (−10.00, n=1) |"
    assert "n=k: a cell over k seeds, or (in brackets) a change over the k seeds" in lines[-1]
    assert "n=k" not in report.markdown(report.build_table(table1_results(), "T")).splitlines()[-1]
    rows = {(r["row"], r["column"]): r for r in csv.DictReader(io.StringIO(report.csv_text([table])))}
    assert (rows["ResNet-18 nasty", "CNN"]["delta"], rows["ResNet-18 nasty", "CNN"]["delta_n"]) == ("-10.0000", "1")


def test_no_change_when_the_cells_share_no_seed():
    results = [Result("teacher", "A normal", "teacher", 0, (), 95.0),
               Result("nasty", "A nasty", "teacher", 1, (), 94.0, "A normal")]
    cell = report.build_table(results, "T").cells["A nasty", "teacher"]
    assert cell.delta is None and cell.text(2) == "94.00 · n=1"


def test_csv_leaves_the_std_of_one_seed_empty():
    results = [r for r in table1_results() if r.seed == 0]
    rows = list(csv.DictReader(io.StringIO(report.csv_text([report.build_table(results, "T")]))))
    assert len(rows) == 5 and {r["std"] for r in rows} == {""} and {r["n"] for r in rows} == {"1"}


def test_a_sweep_gives_a_table_per_value_and_flat_lines_for_stages_it_does_not_reach():
    base = [r for r in table1_results() if r.kind in ("teacher", "baseline")]
    swept = []
    for omega, shift in (("0.01", 0.0), ("0.1", -5.0)):
        swept += [Result(r.kind, r.row, r.column, r.seed, (("nasty.omega", omega),), r.top1 + shift, r.reference_row)
                  for r in table1_results() if r.kind in ("nasty", "student") and r.row == "ResNet-18 nasty"]
    normal_kd = [r for r in table1_results() if r.kind == "student" and r.row == "ResNet-18 normal"]
    results = base + swept + normal_kd
    assert report.sweep_points(results) == [(("nasty.omega", "0.01"),), (("nasty.omega", "0.1"),)]
    high = report.build_table(results, "T", (("nasty.omega", "0.1"),))
    assert high.cells["ResNet-18 nasty", "CNN"].mean == 65.5 and high.cells["student baseline", "CNN"].mean == 81.0
    students, teachers = report.sweep_series(results, "nasty.omega")
    assert students["CNN alone"] == [(0.01, 81.0, pytest.approx(2 ** 0.5)), (0.1, 81.0, pytest.approx(2 ** 0.5))]
    assert [p[1] for p in students["CNN ← ResNet-18 nasty"]] == [70.5, 65.5]
    assert [p[1] for p in teachers["ResNet-18 nasty"]] == [94.5, 89.5]


def test_the_paper_tables_ship_in_the_package():
    tables = report.paper_tables()
    assert report.paper_cell("table1", "ResNet-18 nasty", "CNN") == (82.46, -4.18)
    assert report.paper_cell("table2", "ResNeXt-29 nasty", "MobileNetV2") == (1.55, -67.57)
    assert {"table1", "table2", "table3", "table4", "table5_cifar10", "table5_cifar100"} <= set(tables)


def test_report_from_an_mlflow_experiment_reads_the_pipelines_tags(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("paper-t1", artifact_location=(tmp_path / "art").as_uri())
    for r in table1_results():
        tags = {"table": "table1", "paper": "table1", "row": r.row, "column": r.column, "seed": str(r.seed),
                "stage": r.kind, **({"reference_row": r.reference_row} if r.reference_row else {})}
        run = client.create_run(experiment, tags=tags)
        client.log_metric(run.info.run_id, "test_top1", r.top1)
        client.set_terminated(run.info.run_id, "FINISHED")
    unfinished = client.create_run(experiment, tags={"table": "table1", "stage": "student", "row": "ResNet-18 nasty",
                                                     "column": "CNN", "seed": "9"})
    client.log_metric(unfinished.info.run_id, "test_top1", 1.0)  # still RUNNING: not a result
    older = client.create_run(experiment, start_time=1, tags={"table": "table1", "stage": "student", "seed": "0",
                                                               "row": "ResNet-18 nasty", "column": "CNN"})
    client.log_metric(older.info.run_id, "test_top1", 2.0)  # the same cell trained before: the newest run counts
    client.set_terminated(older.info.run_id, "FINISHED")
    results, name, paper = report.from_mlflow("paper-t1", uri)
    assert (name, paper) == ("table1", "table1")
    assert sorted(results, key=repr) == sorted(table1_results(), key=repr)

    out = tmp_path / "rep"
    proc = subprocess.run([NT_DIST, "report", "--experiment", "paper-t1", "--tracking-uri", uri, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| ResNet-18 nasty | 94.50 ± 0.71 (−1.50) · paper 94.56 (−0.57) |" in proc.stdout
    assert (out / "report.md").read_text().startswith("### Table 1")
    logged = client.search_runs([experiment], "tags.stage = 'report'")
    assert len(logged) == 1 and logged[0].info.status == "FINISHED"
    assert sorted(a.path for a in client.list_artifacts(logged[0].info.run_id, "report")) == \
        ["report/report.csv", "report/report.md"]


def test_report_needs_a_file_or_an_experiment():
    proc = subprocess.run([NT_DIST, "report"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "nt-dist: error: report: pass a pipeline file or --experiment NAME (one of them)"


def test_quickstart_numbers_keep_the_five_keys_as_means_and_add_each_seed():
    rows = [("teacher", "A normal", "teacher"), ("nasty", "A nasty", "teacher"), ("baseline", "student baseline", "m"),
            ("student", "A normal", "m"), ("student", "A nasty", "m")]
    results = [Result(kind, row, col, seed, (), 90.0 + i + seed) for i, (kind, row, col) in enumerate(rows)
               for seed in (0, 1)]
    from nt_dist.quickstart import quickstart_numbers

    numbers = quickstart_numbers(results)
    assert list(numbers) == ["teacher_normal", "teacher_nasty", "student_baseline", "student_kd_normal",
                             "student_kd_nasty", "seeds"]
    assert numbers["student_kd_nasty"] == 94.5 and numbers["seeds"]["1"]["teacher_nasty"] == 92.0


# ----------------------------------------------------------------------------- faults, in one line


def store_with_table1(tmp_path: Path) -> str:
    """A SQLite store holding the finished runs of table1_results() in experiment paper-t1."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("paper-t1", artifact_location=(tmp_path / "art").as_uri())
    for r in table1_results():
        run = client.create_run(experiment, tags={"table": "table1", "row": r.row, "column": r.column,
                                                  "seed": str(r.seed), "stage": r.kind})
        client.log_metric(run.info.run_id, "test_top1", r.top1)
        client.set_terminated(run.info.run_id, "FINISHED")
    return uri


def plain_env() -> dict[str, str]:
    """The environment of a user who has set none of MLflow's HTTP variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}


def test_a_report_from_an_unreachable_server_is_one_line_naming_it(tmp_path: Path):
    """Nothing listens at the address: one line naming it, exit 2, in seconds (it was 4 min 39 s
    of MLflow's retries, then a traceback)."""
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = subprocess.run([NT_DIST, "report", "--experiment", "X", "--tracking-uri", uri], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=plain_env())
    elapsed = time.monotonic() - started
    assert one_error(proc) == (f"nt-dist: error: MLflow at {uri} is not answering (connection refused); "
                               "start it, or pass --tracking-uri")
    assert elapsed < 60, elapsed  # tracking.timeout_s
    assert not (tmp_path / "report-X").exists()


def test_a_server_that_never_answers_ends_the_report_within_the_timeout(tmp_path: Path):
    """A server that takes connections and never answers (a hung process): MLflow's own timeouts
    bound each request; the report's first call is bounded as a whole."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes the handshakes; nobody reads
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(UserError, match=rf"^MLflow at {uri} is not answering \(no answer within 2 s\)"):
            report.from_mlflow("X", uri, timeout_s=2)
        assert time.monotonic() - started < 4


def test_a_report_from_a_store_of_random_bytes_is_one_line(tmp_path: Path):
    (tmp_path / "garbage.db").write_bytes(os.urandom(4096))
    proc = subprocess.run([NT_DIST, "report", "--experiment", "X", "--tracking-uri",
                           f"sqlite:///{tmp_path / 'garbage.db'}"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert one_error(proc) == (f"nt-dist: error: MLflow store: {tmp_path / 'garbage.db'}: not an SQLite database "
                               "(move it aside, and MLflow creates a new store there)")


@needs_user
def test_a_report_into_a_read_only_folder_is_one_line_naming_it(tmp_path: Path):
    uri = store_with_table1(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    prefix = DROP_ROOT_RIGHTS if os.geteuid() == 0 else []  # root ignores permission bits
    try:
        proc = subprocess.run([*prefix, NT_DIST, "report", "--experiment", "paper-t1", "--tracking-uri", uri,
                               "--out", str(locked / "rep"), "--no-mlflow"], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
    finally:
        locked.chmod(0o755)
    assert one_error(proc) == f"nt-dist: error: --out: {locked / 'rep'}: not writable (its parent {locked} is read-only)"
    assert not (locked / "rep").exists()


# ----------------------------------------------------------------------------- against the paper's recipe (issue 25)

PAPER_DIR = Path(__file__).resolve().parents[1] / "recipes" / "paper"
FIGURES = {("ResNet-18 normal", "teacher"): 95.0, ("ResNet-18 nasty", "teacher"): 94.0,
           ("student baseline", "CNN"): 81.0, ("ResNet-18 normal", "CNN"): 85.0, ("ResNet-18 nasty", "CNN"): 70.0}


def table1_folders(tmp_path: Path, extra: list[str], paper_recipe: tuple[str, ...] = (),
                   architectures: dict[str, str] | None = None) -> list:
    """The teacher and CNN stages of recipes/paper/table1.yaml as finished run folders, without
    training: each folder holds what a run writes (resolved_recipe.yaml, metrics.json) for the
    pipeline run with ``extra`` (``--set``); the stages named in ``paper_recipe`` ran the paper's
    recipe as it is; ``architectures``: stage name -> the architecture its model.safetensors records."""
    import yaml

    from nt_dist import pipeline
    from nt_dist.config import load_recipe, recipe_to_dict

    p = pipeline.load_pipeline(PAPER_DIR / "table1.yaml")
    out = str(tmp_path / "t1")
    plain = {s.name: s for s in pipeline.expand(p, seeds=[0], output_dir=out)}
    stages = [s for s in pipeline.expand(p, seeds=[0], extra=extra, output_dir=out) if s.column in ("teacher", "CNN")]
    for stage in stages:
        ran = plain[stage.name] if stage.name in paper_recipe else stage
        recipe = load_recipe(ran.recipe, list(ran.overrides))
        stage.output_dir.mkdir(parents=True)
        (stage.output_dir / "resolved_recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        (stage.output_dir / "metrics.json").write_text(f'{{"final": {{"test_top1": {FIGURES[stage.row, stage.column]}}}}}')
        if stage.name in (architectures or {}):
            import torch
            from safetensors.torch import save_file

            save_file({"w": torch.zeros(1)}, str(stage.output_dir / "model.safetensors"),
                      metadata={"architecture": architectures[stage.name]})
    return stages


def test_the_report_lists_every_override_and_marks_shrunk_cells(tmp_path: Path):
    """A run capped at 5 steps on 64 images sits beside the paper's figure with a † and a
    footnote, and every key it changed is listed; the baseline that ran the paper's recipe
    has no †."""
    stages = table1_folders(tmp_path, ["run.max_steps=5", "data.train_subset=64", "data.batch_size=32"],
                            paper_recipe=("seed0/baseline/cnn",))
    results, missing = report.from_stages(stages)
    assert missing == [] and all(r.compared for r in results)
    text, files = report.report(results, "table1", "table1", tmp_path / "rep")
    lines = text.splitlines()
    assert lines[4] == "| student baseline | – | 81.00 · paper 86.64 |"
    assert lines[5] == "| ResNet-18 normal | 95.00† · paper 95.13 | 85.00 (+4.00)† · paper 87.75 (+1.11) |"
    assert lines[6].startswith("| ResNet-18 nasty | 94.00 (−1.00)† · paper 94.56 (−0.57) | 70.00 (−11.00)† ·")
    assert report.SHRUNK_NOTE in lines and report.SHRUNK_NOTE.startswith("† trained on less than the paper's recipe")
    overrides = lines[lines.index("#### Overrides against the paper's recipe (recipes/paper/table1.yaml)"):]
    assert overrides[2:] == ["- run.max_steps: 5 (paper 0): every run but CNN alone",
                             "- data.batch_size: 32 (paper 128): every run but CNN alone",
                             "- data.train_subset: 64 (paper 0): every run but CNN alone"]
    shrunk = {(r["row"], r["column"]): r["shrunk"] for r in csv.DictReader(io.StringIO(files[1].read_text()))}
    assert shrunk == {("student baseline", "CNN"): "0", ("ResNet-18 normal", "teacher"): "1",
                      ("ResNet-18 normal", "CNN"): "1", ("ResNet-18 nasty", "teacher"): "1", ("ResNet-18 nasty", "CNN"): "1"}


def test_a_longer_run_or_a_changed_loss_is_an_override_but_not_shrunk(tmp_path: Path):
    stages = table1_folders(tmp_path, ["run.epochs=170", "distill.tau=8"])
    results, _ = report.from_stages(stages)
    text, _ = report.report(results, "table1", "table1", tmp_path / "rep")
    assert "†" not in text
    assert "- run.epochs: 170 (paper 160): ResNet-18 normal, ResNet-18 nasty" in text
    assert "- distill.tau: 8.0 (paper 4.0): CNN ← ResNet-18 normal, CNN ← ResNet-18 nasty" in text  # teachers log no distill.*


def test_a_label_shows_the_architecture_its_model_records(tmp_path: Path):
    """The nasty teacher's recipe names the paper's network, its model file another: the model
    file wins. ``--set model.name=cifar_cnn`` on every stage: every teacher label says it."""
    stages = table1_folders(tmp_path, [], architectures={"seed0/nasty/resnet-18-nasty": "cifar_resnet8"})
    table = report.build_table(report.from_stages(stages)[0], "T", row_order=["ResNet-18 normal", "ResNet-18 nasty"])
    lines = report.markdown(table).splitlines()
    assert lines[5].startswith("| ResNet-18 normal | 95.00 |")
    assert lines[6].startswith("| ResNet-18 nasty (ran: cifar_resnet8) | 94.00 (−1.00) |")

    forced = table1_folders(tmp_path / "forced", ["model.name=cifar_cnn"])
    results, _ = report.from_stages(forced)
    text, _ = report.report(results, "table1", "table1", tmp_path / "rep")
    assert "| ResNet-18 normal (ran: cifar_cnn) | 95.00 · paper 95.13 |" in text
    assert "| Teacher | Teacher top-1 | Student CNN |" in text  # the CNN column did train a CNN
    assert "- model.name: cifar_cnn (paper cifar_resnet18): ResNet-18 normal, ResNet-18 nasty" in text


def test_the_paper_order_holds_whatever_order_the_runs_come_in(tmp_path: Path):
    columns = ["CNN", "ResNetC-20", "ResNetC-32", "ResNet-18"]
    results = [Result(r.kind, r.row, column, r.seed, r.sweep, r.top1, r.reference_row)
               for column in columns for r in table1_results() if r.column != "teacher"]
    results += [r for r in table1_results() if r.column == "teacher"]
    texts = set()
    for i, order in enumerate((results, results[::-1], sorted(results, key=lambda r: (r.column, r.row)))):
        text, _ = report.report(order, "table1", "table1", tmp_path / f"rep{i}")
        texts.add(text)
        assert text.splitlines()[2] == "| Teacher | Teacher top-1 | Student CNN | Student ResNetC-20 | " \
                                       "Student ResNetC-32 | Student ResNet-18 |"
        assert [line.split(" | ")[0] for line in text.splitlines()[4:7]] == \
            ["| student baseline", "| ResNet-18 normal", "| ResNet-18 nasty"]
    assert len(texts) == 1
    # an ablation prints no table: its pipeline file's order (recipes/paper/ablation_omega.yaml)
    rows, cols = report.paper_order("ablation_omega", "")
    assert (rows, cols) == (["ResNet-18 normal", "ResNet-18 nasty"], ["CNN", "ResNetC-20"])
    flipped = [Result(r.kind, r.row, "ResNetC-20" if r.column == "CNN" else r.column, r.seed, r.sweep, r.top1,
                      r.reference_row) for r in table1_results()][::-1] + table1_results()
    assert report.build_table(flipped, "T", (), rows, cols).columns == ["teacher", "CNN", "ResNetC-20"]


def test_a_second_report_updates_the_same_mlflow_run(tmp_path: Path, mlflow_store: str):
    client = MlflowClient(tracking_uri=mlflow_store)
    experiment = client.create_experiment("reports-once", artifact_location=(tmp_path / "art").as_uri())
    files = [tmp_path / "report.md"]
    files[0].write_text("first\n")
    first = report.log_to_mlflow(files, "reports-once", mlflow_store, "table1", "table1", "first")
    files[0].write_text("second\n")
    second = report.log_to_mlflow(files, "reports-once", mlflow_store, "table1", "table1", "second")
    runs = client.search_runs([experiment], "attributes.run_name = 'table1/report'")
    assert first == second and len(runs) == 1
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["mlflow.note.content"] == "second"
    assert Path(client.download_artifacts(first, "report/report.md", str(tmp_path / "dl"))).read_text() == "second\n"
    other = report.log_to_mlflow(files, "reports-once", mlflow_store, "table2", "table2", "t2")
    assert other != first and len(client.search_runs([experiment], "tags.stage = 'report'")) == 2


def test_runs_from_mlflow_are_held_against_the_paper_by_their_params_and_tags(mlflow_store: str, tmp_path: Path):
    client = MlflowClient(tracking_uri=mlflow_store)
    experiment = client.create_experiment("paper-t1-params", artifact_location=(tmp_path / "art").as_uri())
    teacher = client.create_run(experiment, tags={
        "table": "table1", "paper": "table1", "row": "ResNet-18 normal", "column": "teacher", "seed": "0",
        "stage": "teacher", "architecture": "cifar_cnn", "mlflow.source.name": str(PAPER_DIR / "cifar10/teacher.yaml")})
    for key, value in {"run.epochs": "1", "run.seed": "0", "data.train_subset": "64", "model.name": "cifar_cnn",
                       "optim.lr": "0.1", "data.root": "/data"}.items():
        client.log_param(teacher.info.run_id, key, value)
    client.log_metric(teacher.info.run_id, "test_top1", 40.0)
    client.set_terminated(teacher.info.run_id, "FINISHED")
    (result,), name, paper = report.from_mlflow("paper-t1-params", mlflow_store)
    assert (name, paper, result.ran, result.shrunk) == ("table1", "table1", "cifar_cnn", True)
    assert result.overrides == (("run.epochs", "1", "160"), ("data.train_subset", "64", "0"),
                                ("model.name", "cifar_cnn", "cifar_resnet18"))


def test_sweep_plots_take_a_log_axis_for_log_spaced_values_and_show_the_papers_point(tmp_path: Path):
    from PIL import Image

    def swept(values: list[str]) -> list[Result]:
        return [Result(r.kind, r.row, r.column, r.seed, (("nasty.omega", v),) if r.kind in ("nasty", "student") else (),
                       r.top1 - i, r.reference_row) for i, v in enumerate(values) for r in table1_results()]

    for values, scale in ((["0.001", "0.01", "0.1"], "log"), (["0.25", "0.5", "0.75", "1.0"], "linear"),
                          (["0.0", "0.001", "0.01", "0.1"], "symlog")):
        folder = tmp_path / scale
        folder.mkdir()
        paths = report.write_plots(swept(values), folder, "t")
        assert [p.name for p in paths] == ["t_nasty.omega_students.png", "t_nasty.omega_teachers.png"]
        assert {Image.open(p).text["xscale"] for p in paths} == {scale}, values
        assert {Image.open(p).text["paper"] for p in paths} == {""}  # no published curve for a pipeline "t"
    paths = report.write_plots(swept(["0.001", "0.004", "0.04"]), tmp_path, "ablation_omega")
    assert {Image.open(p).text["paper"] for p in paths} == {"Table 1 at nasty.omega = 0.004"}
    assert report.x_scale([1, 2, 4, 8, 16]) == report.x_scale([1, 2, 5, 10, 20, 40]) == "log"
    assert report.x_scale([0.1, 0.3, 0.5, 0.7, 0.9, 1.0]) == report.x_scale([5000, 10000, 20000, 30000, 40000, 50000]) \
        == report.x_scale([1, 2]) == report.x_scale([-1, 1, 100]) == "linear"
