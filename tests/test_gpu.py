"""The CUDA code paths, each on tiny sizes (issue 20). ``pytest -m gpu`` runs them, with the
``cuda`` cases of the device-parametrised tests in the other modules (the device loader, the array
cache, the frozen network, the losses); ``benchmarks/gpu_check.sh`` runs them first. Where there
is no CUDA they are reported as skipped, with the reason, never silently absent.

What each covers: the device loader on CUDA (pixels identical to the CPU device loader without
augmentation and for evaluation; the augmentation draws bit-identical; a split copied to the GPU
in several chunks; the fit rule against ``torch.cuda.mem_get_info`` and its one-line refusal);
fp16 with the grad scaler; bf16 frozen forwards on hardware bf16; ``peak_memory_mb`` reset as each
epoch starts; MLflow's ``system/gpu_0_*`` metrics; two steps of the flagship recipe under DeepSpeed
ZeRO-2 with channels-last on one GPU; ``model.compile``; the MFU figure of the step benchmark.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, needs_cuda, tiny_overrides
from conftest_data import assert_one_line_error

from nt_dist import engine
from nt_dist.config import DataConfig, load_recipe
from nt_dist.data import array_cache, build_data, device_loader
from nt_dist.data.device_aug import augment, rrc_boxes, uniforms
from nt_dist.data.device_loader import DeviceTrainSource
from nt_dist.data.torch_loader import TorchTrainSource
from nt_dist.errors import UserError
from nt_dist.frozen_network import native_bf16
from nt_dist.train import train

pytestmark = [pytest.mark.gpu, needs_cuda]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BIN = Path(sys.executable).parent


def _cfg(**values: object) -> DataConfig:
    base = {"name": "digits", "image_size": 16, "batch_size": 8, "eval_batch_size": 50, "loader": "device",
            "augment": "none"}
    return DataConfig(**{**base, **values})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"test_top1"' in line]


def _digits(out: Path, role: str = "teacher", **extra: str) -> Path:
    """A tiny digits run (tests/conftest.py tiny_overrides: 2 epochs of 8 steps) on the GPU."""
    train(load_recipe(REPO / "recipes" / "digits_teacher.yaml",
                      tiny_overrides(out, role, **{"tracking.enabled": "false", **extra})))
    return out


# ------------------------------------------------------------------------- the device loader


def test_the_cuda_device_loader_serves_the_cpu_device_loaders_pixels():
    gpu, cpu = build_data(_cfg(), 0, 0, 1, CUDA), build_data(_cfg(), 0, 0, 1, CPU)
    assert isinstance(gpu.train, DeviceTrainSource) and gpu.train.images.is_cuda and gpu.train.labels.is_cuda
    for (x, y), (x_cpu, y_cpu) in zip(gpu.train.epoch(1), cpu.train.epoch(1), strict=True):  # augment: none
        assert x.is_cuda and torch.equal(x.cpu(), x_cpu) and torch.equal(y.cpu(), y_cpu)
    for (x, y), (x_cpu, y_cpu) in zip(gpu.eval.batches(), cpu.eval.batches(), strict=True):
        assert x.is_cuda and torch.equal(x.cpu(), x_cpu) and torch.equal(y.cpu(), y_cpu)


def test_augmentation_draws_are_the_same_bits_on_cuda():
    index = torch.arange(4096)
    for count in (2, 3, 41):  # rotate_flip, the translations, rrc_flip
        assert torch.equal(uniforms(7, 3, index.to(CUDA), count).cpu(), uniforms(7, 3, index, count))
    images = torch.randint(0, 256, (256, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = torch.arange(256)
    for mode in ("shift", "pad_crop_flip"):  # integer gathers: the same pixels
        assert torch.equal(augment(images.to(CUDA), mode, 5, 2, batch.to(CUDA)).cpu(),
                           augment(images, mode, 5, 2, batch))
    u = uniforms(5, 2, batch, 40)
    same_box = (rrc_boxes(u.to(CUDA), 16, 16).cpu() == rrc_boxes(u, 16, 16)).all(1).float().mean()
    assert same_box >= 0.99  # sqrt/exp/round of the same draws; a last-bit difference may move a box
    for mode in ("rotate_flip", "rrc_flip"):  # float warps: the same draws, kernels that may round apart
        on_gpu = augment(images.to(CUDA), mode, 5, 2, batch.to(CUDA)).cpu()
        on_cpu = augment(images, mode, 5, 2, batch)
        assert ((on_gpu - on_cpu).abs() <= 0.5).float().mean() >= 0.99, mode


def test_a_split_larger_than_one_copy_reaches_the_gpu_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = _cfg(cache_dir=str(tmp_path / "cache"))
    reference = build_data(cfg, 0, 0, 1, CPU).train.images.clone()
    copies = []
    original = torch.Tensor.copy_

    def counted(self: torch.Tensor, src: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.is_cuda and self.dtype == torch.uint8 and self.dim() == 4:
            copies.append(len(src))
        return original(self, src, *args, **kwargs)

    monkeypatch.setattr(array_cache, "COPY_CHUNK_BYTES", 100 * 3 * 16 * 16)  # 100 images per copy
    monkeypatch.setattr(torch.Tensor, "copy_", counted)
    train_split = build_data(cfg, 0, 0, 1, CUDA).train
    assert train_split.images.is_cuda and torch.equal(train_split.images.cpu(), reference)
    assert copies[:15] == [100] * 14 + [37]  # 1,437 training images: 14 full copies and the rest


def test_the_fit_rule_reads_mem_get_info_and_refuses_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                capfd: pytest.CaptureFixture[str]):
    free, total = torch.cuda.mem_get_info(CUDA)
    assert abs(device_loader.free_bytes(CUDA) - free) < 256 << 20  # the driver's figure (others may allocate)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1_000_000, total))  # 1 MB free
    with pytest.raises(UserError) as info:
        build_data(_cfg(), 0, 0, 1, CUDA)
    assert_one_line_error(info.value, "data.loader: device", "digits decoded at 16 px", "0.00 GiB free on cuda",
                          "data.loader: torch", "ffcv")
    assert isinstance(build_data(_cfg(loader="auto"), 0, 0, 1, CUDA).train, TorchTrainSource)
    assert "data.loader: auto" in capfd.readouterr().err


# ------------------------------------------------------------------------ precision, memory


def test_fp16_trains_with_the_grad_scaler(tmp_path: Path):
    out = _digits(tmp_path / "fp16", **{"run.precision": "fp16"})
    last = sorted((out / "checkpoints").iterdir())[-1]
    assert (last / "scaler.pt").is_file()  # accelerate keeps the GradScaler's state in the checkpoint
    assert all(math.isfinite(e["train_loss"]) for e in _metrics(out))
    assert json.loads((out / "metrics.json").read_text())["final"]["test_top1"] > 20  # 10 classes: it learned


def test_bf16_frozen_forwards_run_in_hardware_on_ampere_and_later():
    major, _ = torch.cuda.get_device_capability(CUDA)
    assert native_bf16(CUDA) == (major >= 8)


def test_peak_memory_is_reset_as_each_epoch_starts(tmp_path: Path):
    big = torch.empty(512 << 20, dtype=torch.uint8, device=CUDA)
    del big
    engine.reset_peak_memory(CUDA)
    small = torch.empty(1 << 20, dtype=torch.uint8, device=CUDA)
    assert engine.peak_memory(CUDA)["peak_memory_mb"] < 512  # the 512 MiB before the reset is forgotten
    del small
    peaks = [e["peak_memory_mb"] for e in _metrics(_digits(tmp_path / "run"))]
    assert len(peaks) == 2 and all(p > 0 for p in peaks)


def test_mlflow_logs_the_gpus_system_metrics(tmp_path: Path):
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow is not installed (make setup installs it)")
    if importlib.util.find_spec("pynvml") is None:
        pytest.skip("MLflow samples GPU metrics through pynvml: pip install nvidia-ml-py")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "tracked"
    train(load_recipe(REPO / "recipes" / "digits_teacher.yaml", tiny_overrides(out, "teacher", **{"run.epochs": "1"})))
    run = MlflowClient().get_run(json.loads((out / "metrics.json").read_text())["mlflow_run_id"])
    for key in ("system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes"):
        assert key in run.data.metrics, sorted(run.data.metrics)


# ------------------------------------------------------------------- engines and compilers


def test_the_flagship_recipe_trains_two_steps_under_zero2_with_channels_last(tmp_path: Path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (make setup installs it)")
    from test_flagship import tiny_imagenet

    root, out = tiny_imagenet(tmp_path / "tiny-imagenet-200"), tmp_path / "zero2"
    overrides = {"data.root": str(root), "run.max_steps": "2", "model.name": "cifar_resnet18",
                 "model.channels_last": "true", "run.output_dir": str(out), "tracking.enabled": "false",
                 "data.batch_size": "32", "run.progress": "false"}
    cmd = [str(BIN / "accelerate"), "launch", "-q", "--config_file", str(REPO / "cluster/deepspeed_zero2.yaml"),
           "--num_processes", "1", "--main_process_port", str(free_port()), "-m", "nt_dist.train",
           str(REPO / "recipes/paper/tinyimagenet/teacher.yaml")]
    cmd += [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["global_step"] == 2 and math.isfinite(summary["final"]["test_top1"])


def test_model_compile_trains_and_exports_the_plain_weights(tmp_path: Path):
    from safetensors.torch import load_file

    out = _digits(tmp_path / "compiled", **{"model.compile": "true", "run.epochs": "1"})
    weights = load_file(str(out / "model.safetensors"))
    assert weights and not any(k.startswith("_orig_mod.") for k in weights)
    assert json.loads((out / "metrics.json").read_text())["final"]["test_top1"] > 0


def test_the_step_benchmark_reports_mfu(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/train_throughput.py"), "--model", "cifar_resnet18",
                           "--batch", "128", "--rounds", "1", "--steps", "3", "--precision", "bf16", "--repeat", "1",
                           "--no-mlflow"],  # large enough a step that its MFU shows at one decimal
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| step |"))
    assert header.rstrip().endswith("| MFU |"), header
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| normal |")]
    mfu = rows[0].rstrip(" |").rsplit("|", 1)[1].strip()
    known = any(name in torch.cuda.get_device_name() for name in ("H100", "H200", "A100"))
    if known:  # a dense bf16 peak on record: a share of it
        assert mfu.endswith("%") and 0 < float(mfu.rstrip(" %")) < 100, rows[0]
    else:
        assert mfu == "nan %", rows[0]
