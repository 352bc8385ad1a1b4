"""The benchmark scripts still run and print what their readers rely on (not their speed)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from conftest import ON_CUDA, REPO


def test_train_throughput_prints_table_and_ratio_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--model", "mlp",
                           "--batch", "8", "--rounds", "1", "--steps", "1", "--bf16-frozen", "--repeat", "2"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    last = re.fullmatch(r"nasty/normal step time: (\d+\.\d\d) \(median of 2 runs, (\d+\.\d\d)-(\d+\.\d\d)\)", lines[-1])
    assert last and float(last[2]) <= float(last[1]) <= float(last[3]), lines[-1]  # the median, in its range
    for role in ("normal", "nasty (naive)", "nasty (bf16 adversary)", "nasty (cached)", "student (naive)",
                 "student (bf16 teacher)", "student (cached)"):
        assert any(line.startswith(f"| {role} |") for line in lines), role
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient().get_experiment_by_name("benchmarks")
    runs = MlflowClient().search_runs([experiment.experiment_id], "tags.benchmark = 'train_throughput'")
    assert runs and {"ratio.nasty_naive", "ratio.nasty_bf16_adversary"} <= set(runs[0].data.metrics)
    assert any(line.startswith("nasty/normal step time, bf16 adversary forward every step: ") for line in lines)


@pytest.mark.parametrize("augment", ["rotate_flip", "rrc_flip"])
def test_loader_throughput_times_each_loader(tmp_path, augment):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loader_throughput.py"), "--images", "512",
                           "--size", "16", "--batch", "64", "--workers", "1", "--augment", augment, "--quick",
                           "--no-mlflow", "--repeat", "2"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    loaders = ["device", "torch"]
    if augment != "rotate_flip" and importlib.util.find_spec("ffcv") is not None:  # ffcv has no rotation
        loaders.append("ffcv")
    rows = [line.split(" | ")[0].strip("| ") for line in lines if line.startswith("| ") and "---" not in line]
    assert rows == ["loader", *loaders], lines
    last = re.fullmatch(r"speedup device/torch: (\d+\.\d)x \(median of 2 runs, (\d+\.\d)-(\d+\.\d)x\)", lines[-1])
    assert last and 0 < float(last[2]) <= float(last[1]) <= float(last[3]), lines[-1]
    import torch  # the batches are made on the training device

    assert f"batches on {torch.cuda.get_device_name() if ON_CUDA else 'cpu ('}" in lines[0], lines[0]


@pytest.mark.slow
def test_gpu_check_runs_every_step_with_tiny_sizes(tmp_path):
    """benchmarks/gpu_check.sh on this CPU (GPU_CHECK_TINY=1): every step runs and the summary
    names each; the figures themselves mean nothing here."""
    out = tmp_path / "gpu_check"
    env = {**os.environ, "GPU_CHECK_TINY": "1", "GPU_CHECK_OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=1800, cwd=tmp_path, env=env)
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-2000:]
    assert proc.stdout.strip() == summary.strip()
    for step in ("pytest_gpu", "data", "step32", "step64", "e2e_b8", "e2e_b16", "zero2", "compile", "quickstart",
                 "tracking"):
        assert f"| {step} | " in summary and f"### {step}: " in summary, step
    rows = [line for line in summary.splitlines() if line.startswith("| ") and " | ok | " in line]
    assert len(rows) == 10, summary
    # the CUDA tests ran first: passed on a GPU, each reported skipped with its reason on a CPU
    tests = re.search(r"^(\d+) (passed|skipped)", summary.split("### pytest_gpu: ")[1], flags=re.M)
    assert tests and int(tests.group(1)) >= 10 and tests.group(2) == ("passed" if ON_CUDA else "skipped"), summary
    if not ON_CUDA:
        assert "no CUDA device on this machine" in summary
    peaks = next(line for line in summary.splitlines() if line.startswith("| peak_memory_mb per epoch | "))
    values = peaks.strip("| ").split(" | ")[1].split(", ")
    assert all(v.isdigit() and int(v) > 0 for v in values) if ON_CUDA else set(values) == {"-"}, peaks  # GPU only
    assert summary.count("end-to-end/step-only (device loader): ") == 4
    for loader, role in (("device", "teacher"), ("device", "nasty"), ("torch", "teacher"), ("torch", "nasty")):
        assert f"| {loader} | {role} | " in summary
    assert (out / "quickstart" / "results.json").is_file()


def test_quickstart_sweep_prints_each_seed_and_the_criteria(tmp_path):
    """The record of how the quickstart's settings were chosen still runs: the recipe files as
    they are, one seed, five runs, and a table with the verdict on the criteria."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quickstart_sweep.py"), "--settings", "files",
                           "--seeds", "0", "--out", str(tmp_path / "sweep")],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    row = next(line for line in lines if line.startswith("| files | 0 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    values = [float(c) for c in cells[2:7]]
    assert all(0 <= v <= 100 for v in values)
    assert float(cells[7]) == pytest.approx(values[0] - values[1], abs=0.011)  # drop
    assert float(cells[8]) == pytest.approx(values[3] - values[4], abs=0.011)  # gap
    assert any("1 seeds: (a) " in line for line in lines)


def test_loader_throughput_imagenet64_times_an_epoch_of_each_loader(tmp_path):
    """``--dataset imagenet64``: the ImageNet 64x64 pickles, device vs torch with the recipes'
    rotate_flip, seconds per epoch and the whole-epoch line labelled as computed."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loader_throughput.py"), "--dataset", "imagenet64",
                           "--images", "256", "--batch", "64", "--workers", "1", "--augment", "rotate_flip", "--quick",
                           "--no-mlflow", "--repeat", "2"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("256 images, 64 px pickled pixels, rotate_flip, batch 64"), lines[0]
    rows = [line.split(" | ")[0].strip("| ") for line in lines if line.startswith("| ") and "---" not in line]
    assert rows == ["loader", "device", "torch"], lines
    epoch = next(line for line in lines if line.startswith("seconds per epoch (device 256, torch 256 images, "))
    found = re.findall(r"(\w+) (\d+\.\d\d) s \(median of 2 runs, (\d+\.\d\d)-(\d+\.\d\d) s\)", epoch)
    assert [name for name, *_ in found] == ["device", "torch"], epoch
    for name, middle, low, high in found:
        assert float(low) <= float(middle) <= float(high), (name, epoch)
    whole = next(line for line in lines if line.startswith("a whole ImageNet 64x64 epoch (1,281,167 images)"))
    assert "computed, not measured" in whole and whole.count(" min (median of 2 runs, ") == 2, whole
    assert re.fullmatch(r"speedup device/torch: \d+\.\dx \(median of 2 runs, \d+\.\d-\d+\.\dx\)", lines[-1]), lines[-1]


def test_decode_throughput_table_and_cores_per_gpu_from_its_rates(tmp_path):
    """decode_throughput.py on a tiny run: the table's columns and paths, per core = images/s /
    cores, and the cores-per-GPU line computed from the anchor formula and the printed rate."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_throughput.py"), "--quick", "--images", "48",
                           "--batch", "16", "--sizes", "192", "--cores", "1", "--repeat", "2", "--no-mlflow"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    paths = ["torch"] + (["ffcv-imagenet", "ffcv-jpeg"] if importlib.util.find_spec("ffcv") is not None else [])
    tables = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert tables[0] == ("| path | px | cores | images/s, median | range over runs | images/s per core, median "
                         "| per core, range |"), tables[0]
    rows = {}
    for line in tables[1:1 + len(paths)]:
        path, size, cores, rate, spread, per_core, _ = (cell.strip() for cell in line.strip("|").split("|"))
        low, high = (float(v.replace(",", "")) for v in spread.split("-"))
        rate_value = float(rate.replace(",", ""))
        assert (size, cores) == ("192", "1") and low <= rate_value <= high, line
        assert float(per_core.replace(",", "")) == pytest.approx(rate_value / int(cores), abs=0.051), line
        rows[path] = float(per_core.replace(",", ""))
    assert list(rows) == paths, tables
    anchor = 16 * 1_281_167 / (14.9 * 60) / 8  # ffcv-imagenet: ResNet-50, 16 epochs in 14.9 min on 8 A100s
    assert f"= {anchor:,.0f} images/s per GPU" in next(line for line in lines if line.startswith("anchor GPU rate"))
    for path, per_core in rows.items():
        line = next(line for line in lines if line.startswith(f"cores per GPU, {path} at 192 px: "))
        got = re.match(rf"cores per GPU, {path} at 192 px: ([\d,]+) / ([\d,.]+) = (\d+\.\d) ", line)
        assert got and float(got[2].replace(",", "")) == per_core, line
        assert float(got[3]) == pytest.approx(anchor / per_core, rel=0.01, abs=0.051), line
    assert any(line.startswith("Projection (computed, not measured): ") for line in lines)
    assert sum(line.startswith(f"| {path} | 8 | 64 | ") for path in paths for line in lines) == len(paths)
