"""Progressive resizing and the evaluation resolution (data.min_res, start_ramp, end_ramp,
res_step, eval_image_size, eval_crop_ratio): the schedule against hand-computed values, each
loader serving the epoch's resolution, and a resumed run continuing the schedule bit-identically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from conftest import DEVICES, REPO, tiny_overrides
from conftest_data import assert_one_line_error
from PIL import Image
from safetensors.torch import load_file

from nt_dist.config import DataConfig, load_recipe
from nt_dist.data.resolution import ResolutionSchedule, eval_size
from nt_dist.data.synthetic import write_imagefolder
from nt_dist.data.transforms import build_transform
from nt_dist.errors import UserError

NT_DIST = str(Path(sys.executable).with_name("nt-dist"))


def test_ffcv_imagenets_rn50_16_epoch_ramp():
    """rn50_16_epochs.yaml: min_res 160, max_res 192, start_ramp 11, end_ramp 13. Epoch 12 is
    160 + (1/2)·32 = 176 = 5.5 × 32, rounded half to even (np.round) to 6 × 32 = 192."""
    schedule = ResolutionSchedule(192, min_res=160, start_ramp=11, end_ramp=13)
    assert schedule.sizes(16) == [160] * 12 + [192] * 4


def test_ffcv_imagenets_rn50_88_epoch_ramp():
    """rn50_88_epochs.yaml: start_ramp 65, end_ramp 76. Epoch 70: 160 + 5/11·32 = 174.5 -> 5.45 × 32
    -> 160; epoch 71: 160 + 6/11·32 = 177.5 -> 5.55 × 32 -> 192."""
    sizes = ResolutionSchedule(192, min_res=160, start_ramp=65, end_ramp=76).sizes(88)
    assert sizes[:71] == [160] * 71 and sizes[71:] == [192] * 17


def test_a_finer_step_ramps_through_every_multiple():
    # 16 + (e − 1)/4 · 32 for e = 2, 3, 4: 24, 32, 40 (multiples of 8); 48 from epoch 5
    assert ResolutionSchedule(48, min_res=16, start_ramp=1, end_ramp=5, step=8).sizes(7) == [16, 16, 24, 32, 40, 48, 48]
    assert ResolutionSchedule(32).sizes(3) == [32, 32, 32]  # no ramp: image_size every epoch
    assert ResolutionSchedule(32, min_res=16, start_ramp=2, end_ramp=2).sizes(4) == [16, 16, 16, 32]


def test_eval_size_defaults_to_image_size():
    assert eval_size(DataConfig(image_size=32)) == 32
    assert eval_size(DataConfig(image_size=32, eval_image_size=40)) == 40


def test_eval_crop_is_the_centre_share_of_the_shorter_side():
    """224/256 at 256 px (ffcv-imagenet's validation): the centre 224/256 of the shorter side
    resized to 256, as torchvision does it: resize the shorter side to 256 · 256/224, crop 256."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    out = build_transform("imagefolder", "rrc_flip", 32, train=False, crop_ratio=0.5)(image)
    expected = T.Compose([T.ToImage(), T.Resize(64, antialias=True), T.CenterCrop(32)])(image)
    assert out.shape == (3, 32, 32) and torch.equal(out, expected)


@pytest.mark.parametrize(("changes", "key"), [
    ({"data.min_res": "40"}, "data.min_res: 40 exceeds data.image_size (32)"),
    ({"data.min_res": "16", "data.augment": "shift"}, "data.min_res: progressive resizing needs data.augment: rrc_flip"),
    ({"data.min_res": "16", "data.start_ramp": "1", "data.end_ramp": "0"}, "data.end_ramp: 0 is before"),
    ({"data.min_res": "16", "data.start_ramp": "2", "data.end_ramp": "3"}, "data.start_ramp: 2 is not an epoch of this run (0..1)"),
])
def test_schedule_mistakes_are_one_line_naming_the_key(tmp_path: Path, changes: dict[str, str], key: str):
    overrides = tiny_overrides(tmp_path, **{"data.image_size": "32", "data.augment": "rrc_flip", **changes})
    with pytest.raises(UserError) as error:
        load_recipe(REPO / "recipes" / "digits_teacher.yaml", overrides)
    assert_one_line_error(error.value, "digits_teacher.yaml", key)


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (8, 40, 48, 3), dtype=np.uint8)
    write_imagefolder(root, {"train": {"a": images[:4], "b": images[4:]}, "val": {"a": images[:2], "b": images[6:]}})
    return root


RAMP = {"image_size": 32, "min_res": 16, "start_ramp": 0, "end_ramp": 2, "res_step": 8, "augment": "rrc_flip",
        "eval_image_size": 24, "batch_size": 2, "eval_batch_size": 4}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loader", ["torch", "device"])
def test_each_epoch_is_served_at_its_resolution(tmp_path: Path, loader: str, device: torch.device):
    from nt_dist.data import build_data

    cfg = DataConfig(name="imagefolder", root=str(_folder(tmp_path / "data")), loader=loader,
                     cache_dir=str(tmp_path / "cache"), **RAMP)
    bundle = build_data(cfg, seed=0, rank=0, world=1, device=device)
    for epoch, size in enumerate([16, 24, 32, 32]):
        images, labels = next(iter(bundle.train.epoch(epoch)))
        assert images.shape == (2, 3, size, size) and images.device.type == device.type
        again, _ = next(iter(bundle.train.epoch(epoch)))
        assert torch.equal(images, again)  # a pure function of (seed, epoch): what a resume reads
    images, _ = next(iter(bundle.eval.batches()))
    assert images.shape == (4, 3, 24, 24)


def test_the_ffcv_loader_recompiles_for_each_resolution(tmp_path: Path):
    pytest.importorskip("ffcv")
    from nt_dist.data.ffcv_io import write_ffcv
    from nt_dist.data.ffcv_loader import build_ffcv_data

    root = _folder(tmp_path / "data")
    write_ffcv("imagefolder", str(root), str(tmp_path / "beton"), raw=True)
    cfg = DataConfig(name="imagefolder", root=str(root), loader="ffcv", ffcv_dir=str(tmp_path / "beton"),
                     num_workers=1, **RAMP)
    bundle = build_ffcv_data(cfg, seed=0, rank=0, world=1, device=torch.device("cpu"))
    sizes = [next(iter(bundle.train.epoch(epoch)))[0].shape[-1] for epoch in range(3)]
    assert sizes == [16, 24, 32]
    assert next(iter(bundle.eval.batches()))[0].shape == (4, 3, 24, 24)


def _ramp_run(out: Path, **extra: str) -> list[str]:
    overrides = tiny_overrides(out, **{"run.epochs": "3", "data.image_size": "32", "data.min_res": "16",
                                       "data.start_ramp": "0", "data.end_ramp": "2", "data.res_step": "8",
                                       "data.augment": "rrc_flip", "data.loader": "torch",
                                       "run.checkpoint_every_steps": "3", "tracking.enabled": "false", **extra})
    return [NT_DIST, "train", str(REPO / "recipes" / "digits_teacher.yaml"), *sum((["--set", o] for o in overrides), [])]


def test_a_resumed_run_continues_the_resolution_schedule_bit_identically(tmp_path: Path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    subprocess.run(_ramp_run(whole), check=True, capture_output=True, timeout=600)
    # stop in the middle of epoch 2 (24 px; 8 steps an epoch), then the same command again
    subprocess.run(_ramp_run(resumed, **{"run.max_steps": "13"}), check=True, capture_output=True, timeout=600)
    subprocess.run(_ramp_run(resumed), check=True, capture_output=True, timeout=600)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    last = {r["epoch"]: r["resolution"] for r in records if "epoch" in r}
    assert last == {1: 16, 2: 24, 3: 32}
