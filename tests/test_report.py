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
                     "paper_delta": "-4.18", "values": "70.00 71.00"}


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
