"""The device-resident loader: hand-checked warps, the torch loader's augmentation distributions,
identical evaluation images, determinism, process-count independence, resume, shards, fixed
views, the decoded-split cache (rebuilt when the data change) and the one line when it does not fit."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import DEVICES
from conftest_data import assert_one_line_error
from PIL import Image

from nt_dist.config import DataConfig
from nt_dist.data import build_data, device_loader
from nt_dist.data.device_aug import augment, crop_resize, mix32, rotate, rrc_boxes, translate, uniforms
from nt_dist.data.device_loader import DeviceEvalSource, DeviceTrainSource
from nt_dist.data.synthetic import random_images, write_tinyimagenet
from nt_dist.data.torch_loader import SeededTransformDataset, TorchTrainSource
from nt_dist.data.transforms import build_transform
from nt_dist.errors import UserError

CPU = torch.device("cpu")
WNIDS = ["n02", "n01", "n03"]


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    """A Tiny-ImageNet layout: 3 classes x 6 training images and 5 validation images, 20 px
    (not the trained size: the cache holds the resized images)."""
    images = random_images(23, 20, seed=3)
    write_tinyimagenet(tmp_path / "tiny", WNIDS, {w: images[6 * i:6 * i + 6] for i, w in enumerate(WNIDS)},
                       [(images[18 + j], WNIDS[j % 3]) for j in range(5)])
    return tmp_path / "tiny"


def _cfg(**values: Any) -> DataConfig:
    base = {"name": "digits", "image_size": 16, "batch_size": 8, "eval_batch_size": 50, "loader": "device",
            "augment": "shift"}
    return DataConfig(**{**base, **values})


def _epoch(source: Any, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in source.epoch(epoch, start)]


# ------------------------------------------------------------------- random numbers and warps


def test_hash_is_the_reference_lowbias32_on_tensors_and_ints():
    def reference(x: int) -> int:  # C. Wellons' lowbias32, in plain 32-bit arithmetic
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1]
    assert [mix32(v) for v in values] == [reference(v) for v in values]
    assert mix32(torch.tensor(values)).tolist() == [reference(v) for v in values]


def test_draws_depend_only_on_seed_epoch_and_index():
    everything = uniforms(7, 3, torch.arange(1000), 4)
    some = torch.tensor([999, 5, 17])
    assert torch.equal(uniforms(7, 3, some, 4), everything[some])  # not on the batch a sample is in
    assert not torch.equal(uniforms(7, 4, some, 4), everything[some])
    assert not torch.equal(uniforms(8, 3, some, 4), everything[some])
    assert not torch.equal(uniforms(7 + 2**32, 3, some, 4), everything[some])  # all 64 bits of the seed count
    assert everything.min() >= 0 and everything.max() < 1
    assert torch.allclose(everything.mean(0), torch.full((4,), 0.5), atol=0.03)
    assert abs(np.corrcoef(everything[:, 0], everything[:, 1])[0, 1]) < 0.1


def test_warps_by_hand():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)
    zero, no, yes = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    assert torch.equal(translate(x, zero, zero, no, 2), x)
    assert torch.equal(translate(x, zero, zero, yes, 2), x.flip(-1))
    right = translate(x, zero + 1, zero, no, 2)  # output (y, x) = input (y, x + 1), zero past the edge
    assert torch.equal(right[..., :-1], x[..., 1:]) and not right[..., -1].any()
    up = translate(x, zero, zero - 2, no, 2)
    assert torch.equal(up[..., 2:, :], x[..., :-2, :]) and not up[..., :2, :].any()
    angle = torch.zeros(2)
    assert torch.equal(rotate(x, angle, no).to(torch.uint8), x)
    assert torch.equal(rotate(x, angle, yes).to(torch.uint8), x.flip(-1))
    assert torch.equal(rotate(x, angle + 90, no).to(torch.uint8), torch.rot90(x, 1, (-2, -1)))
    whole = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2)
    assert torch.allclose(crop_resize(x, whole, no), x.float())
    assert torch.allclose(crop_resize(x, whole, yes), x.float().flip(-1))
    # the bottom-right quarter at twice the size: every second output pixel is between two inputs
    quarter = crop_resize(x, torch.tensor([[4.0, 4.0, 4.0, 4.0]] * 2), no)
    reference = torch.nn.functional.interpolate(x[..., 4:, 4:].float(), size=8, mode="bilinear", align_corners=False)
    assert torch.allclose(quarter[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1])


def test_rrc_boxes_stay_inside_and_fall_back_to_the_whole_image():
    box = rrc_boxes(uniforms(0, 0, torch.arange(5000), 40), 64, 64)
    top, left, h, w = box.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()
    area = h * w / 64**2
    assert area.min() >= 0.07 and area.max() <= 1
    # every try fails (areas too large for an aspect of 4/3): the whole image
    fail = torch.tensor([[1.0, 1.0, 0.5, 0.5] * 10])
    assert rrc_boxes(fail, 64, 64).tolist() == [[0.0, 0.0, 64.0, 64.0]]


# -------------------------------------------------- the same distributions as the torch loader


def _coordinates(size: int) -> np.ndarray:
    """An image whose red channel is row + 1 and green channel column + 1 (0: filled)."""
    rows, cols = np.meshgrid(np.arange(size) + 1, np.arange(size) + 1, indexing="ij")
    return np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)


def _fit(image: torch.Tensor, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """The affine map output (row, col) -> source (row, col) that an augmented coordinate image
    shows, fitted over its central pixels: (2x2 matrix, offset)."""
    image = image.float()
    size = image.shape[-1]
    rows, cols = np.meshgrid(np.arange(margin, size - margin), np.arange(margin, size - margin), indexing="ij")
    source = image[:2, margin:size - margin, margin:size - margin].reshape(2, -1).numpy().T - 1
    keep = (source >= 0).all(1)
    design = np.stack([rows.ravel(), cols.ravel(), np.ones(rows.size)], 1)[keep]
    solution, *_ = np.linalg.lstsq(design, source[keep], rcond=None)
    return solution[:2].T, solution[2]


def _torch_loader_samples(augment_mode: str, size: int, n: int) -> list[torch.Tensor]:
    image = Image.fromarray(_coordinates(size))
    dataset = SeededTransformDataset([(image, 0)] * n, build_transform("digits", augment_mode, size, train=True), 0)
    return [dataset[(0, i)][0] for i in range(n)]


def _device_samples(augment_mode: str, size: int, n: int) -> torch.Tensor:
    batch = torch.from_numpy(_coordinates(size)).permute(2, 0, 1)[None].repeat(n, 1, 1, 1).contiguous()
    return augment(batch, augment_mode, 0, 0, torch.arange(n))


def _offsets_and_flips(samples: Any, size: int) -> tuple[list[tuple[int, int]], float]:
    shifts, flips = [], 0
    for sample in samples:
        matrix, offset = _fit(sample, margin=5)
        flipped = matrix[1, 1] < 0
        flips += flipped
        dx = offset[1] - (size - 1 if flipped else 0)
        shifts.append((round(offset[0]), round(dx)))
    return shifts, flips / len(samples)


@pytest.mark.parametrize("mode,pad,flips", [("shift", 2, False), ("pad_crop_flip", 4, True)])
def test_translations_match_the_torch_loader(mode: str, pad: int, flips: bool):
    n, size = 900, 16
    for samples in (_torch_loader_samples(mode, size, n), _device_samples(mode, size, n)):
        shifts, flip_rate = _offsets_and_flips(samples, size)
        values = range(-pad, pad + 1)
        for axis in (0, 1):
            counts = np.bincount([s[axis] + pad for s in shifts], minlength=2 * pad + 1)
            assert len(counts) == 2 * pad + 1 and set(s[axis] for s in shifts) == set(values)
            assert np.all(np.abs(counts / n - 1 / len(values)) < 0.05), counts  # uniform over -pad..pad
        assert (abs(flip_rate - 0.5) < 0.06) if flips else flip_rate == 0


def _angles_and_flips(samples: Any) -> tuple[np.ndarray, float]:
    angles, flips = [], 0
    for sample in samples:
        matrix, _ = _fit(sample, margin=9)
        if np.linalg.det(matrix) < 0:
            flips += 1
            matrix = matrix @ np.diag([1.0, -1.0])
        angles.append(math.degrees(math.atan2(abs(matrix[0, 1] - matrix[1, 0]) / 2,
                                              (matrix[0, 0] + matrix[1, 1]) / 2)))
    return np.array(angles), flips / len(samples)


def test_rotations_match_the_torch_loader():
    n, size = 800, 32
    results = [_angles_and_flips(samples) for samples in
               (_torch_loader_samples("rotate_flip", size, n), _device_samples("rotate_flip", size, n))]
    for angles, flip_rate in results:
        assert angles.max() < 20.6 and angles.max() > 19 and angles.min() < 1
        assert abs(angles.mean() - 10) < 1.0  # |U(-20, 20)| has mean 10
        assert abs(flip_rate - 0.5) < 0.06
    assert abs(results[0][0].mean() - results[1][0].mean()) < 1.0


def test_random_resized_crops_match_the_torch_loader():
    n, size = 800, 32
    measured = []
    for samples in (_torch_loader_samples("rrc_flip", size, n), _device_samples("rrc_flip", size, n)):
        areas, aspects, flips = [], [], 0
        for sample in samples:
            matrix, _ = _fit(sample, margin=3)
            flips += matrix[1, 1] < 0
            areas.append(abs(matrix[0, 0] * matrix[1, 1]))
            aspects.append(abs(matrix[1, 1] / matrix[0, 0]))  # width / height of the crop
        areas, aspects = np.array(areas), np.array(aspects)
        assert areas.min() > 0.06 and areas.max() < 1.02
        assert aspects.min() > 0.6 and aspects.max() < 1.6  # 3/4..4/3, rounded to whole pixels
        assert abs(flips / n - 0.5) < 0.06
        measured.append((areas.mean(), np.log(aspects).mean()))
    (area_t, log_t), (area_d, log_d) = measured
    assert abs(area_t - area_d) < 0.04 and abs(log_t - log_d) < 0.04


# --------------------------------------------------------------------------- the sources


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_images_are_the_torch_loaders(tiny: Path, device: torch.device):
    for cfg in (_cfg(), _cfg(name="tinyimagenet", root=str(tiny), image_size=16, augment="rotate_flip"),
                _cfg(name="tinyimagenet", root=str(tiny), image_size=16, augment="rrc_flip", eval_batch_size=2)):
        resident = build_data(cfg, 0, 0, 1, device)
        reference = build_data(dataclasses.replace(cfg, loader="torch"), 0, 0, 1, CPU)
        assert isinstance(resident.eval, DeviceEvalSource) and len(resident.eval) == len(reference.eval)
        for (x, y), (x_ref, y_ref) in zip(resident.eval.batches(), reference.eval.batches(), strict=True):
            assert x.device.type == y.device.type == device.type
            assert torch.equal(x.cpu(), x_ref) and torch.equal(y.cpu(), y_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_without_augmentation_training_batches_are_the_torch_loaders(tiny: Path, device: torch.device):
    cfg = _cfg(name="tinyimagenet", root=str(tiny), augment="none", batch_size=4)
    resident = build_data(cfg, 5, 0, 1, device).train
    reference = build_data(dataclasses.replace(cfg, loader="torch"), 5, 0, 1, CPU).train
    assert isinstance(resident, DeviceTrainSource) and isinstance(reference, TorchTrainSource)
    assert resident.images.device.type == device.type
    assert resident.batch_indices(1) == reference.batch_indices(1)
    for (x, y), (x_ref, y_ref) in zip(resident.epoch(1), reference.epoch(1), strict=True):
        assert torch.equal(x.cpu(), x_ref) and torch.equal(y.cpu(), y_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["shift", "pad_crop_flip", "rotate_flip", "rrc_flip"])
def test_batches_do_not_depend_on_the_process_count(mode: str, device: torch.device):
    one = build_data(_cfg(augment=mode, batch_size=8), 3, 0, 1, device).train
    two = [build_data(_cfg(augment=mode, batch_size=4), 3, rank, 2, device).train for rank in (0, 1)]
    assert one.steps_per_epoch == two[0].steps_per_epoch
    whole = _epoch(one, 2)
    halves = [_epoch(source, 2) for source in two]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *halves, strict=True):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert whole[0][0].std() > 0 and not torch.equal(whole[0][0], _epoch(one, 3)[0][0])  # augmented afresh


@pytest.mark.parametrize("device", DEVICES)
def test_the_same_run_sees_the_same_images_and_resumes_mid_epoch(device: torch.device):
    cfg = _cfg(augment="rotate_flip")
    first, second = (build_data(cfg, 1, 0, 1, device).train for _ in range(2))
    full = _epoch(first, 4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, _epoch(second, 4), strict=True))
    tail = _epoch(second, 4, start=5)
    assert len(tail) == len(full) - 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[5:], tail, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_views_repeat_every_k_epochs(device: torch.device):
    source = build_data(_cfg(augment="pad_crop_flip", augment_views=2, batch_size=16), 0, 0, 1, device).train

    def images_by_index(epoch: int) -> dict[int, torch.Tensor]:
        out = {}
        for (x, _), indices in zip(source.epoch(epoch), source.batch_indices(epoch), strict=True):
            out.update({index: x[j] for j, index in enumerate(indices)})
        return out

    e0, e1, e2 = images_by_index(0), images_by_index(1), images_by_index(2)
    common = sorted(set(e0) & set(e1) & set(e2))[:50]
    assert all(torch.equal(e0[i], e2[i]) for i in common)
    assert sum(not torch.equal(e0[i], e1[i]) for i in common) > 35  # 9 x 9 x 2 views: rarely equal


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_shards_are_disjoint_and_complete(device: torch.device):
    shards = [build_data(_cfg(eval_batch_size=7), 0, rank, 3, device).eval for rank in range(3)]
    labels = [torch.cat([y for _, y in shard.batches()]).cpu() for shard in shards]
    assert sum(len(y) for y in labels) == len(shards[0]) == 360
    merged = torch.empty(360, dtype=torch.long)
    for rank, y in enumerate(labels):
        merged[rank::3] = y
    reference = torch.cat([y for _, y in build_data(_cfg(eval_batch_size=360), 0, 0, 1, CPU).eval.batches()])
    assert torch.equal(merged, reference)


@pytest.mark.parametrize("device", DEVICES)
def test_train_subset_takes_the_first_samples(device: torch.device):
    whole = build_data(_cfg(), 0, 0, 1, device)
    part = build_data(_cfg(train_subset=100), 0, 0, 1, device)
    assert part.train_size == 100 and part.train.steps_per_epoch == 100 // 8
    assert torch.equal(part.train.labels, whole.train.labels[:100])


# --------------------------------------------------------------------------- the cache


def test_a_changed_data_set_is_decoded_again_and_the_old_entry_removed(tiny: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    cfg = _cfg(name="tinyimagenet", root=str(tiny), cache_dir=str(cache), augment="rotate_flip")
    before = torch.cat([x for x, _ in build_data(cfg, 0, 0, 1, CPU).eval.batches()])
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(entries) == 2  # training and evaluation split
    stamp = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    build_data(cfg, 0, 0, 1, CPU)  # same files: the entries are reused as they are
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamp

    changed = tiny / "val" / "images" / "val_2.JPEG"
    Image.fromarray(np.full((20, 20, 3), 255, dtype=np.uint8)).save(changed, quality=95)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    after = torch.cat([x for x, _ in build_data(cfg, 0, 0, 1, CPU).eval.batches()])
    reference = build_data(dataclasses.replace(cfg, loader="torch"), 0, 0, 1, CPU).eval
    assert torch.equal(after, torch.cat([x for x, _ in reference.batches()]))
    assert not torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])
    now = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(now) == 2 and now != entries and entries[0] in now  # training entry kept, evaluation replaced


def test_a_half_written_entry_is_never_read(tmp_path: Path):
    cache = tmp_path / "cache"
    cfg = _cfg(cache_dir=str(cache))
    build_data(cfg, 0, 0, 1, CPU)
    entry = next(p for p in cache.iterdir() if p.is_dir() and "-train-" in p.name)
    (entry / "meta.json").unlink()  # as if the writer died before the rename (never under the real name)
    (cache / (entry.name + ".tmp-999999")).mkdir()  # a dead writer's temporary folder
    train = build_data(cfg, 0, 0, 1, CPU).train
    assert len(train.labels) == 1437 and (entry / "meta.json").is_file()
    assert not list(cache.glob("*.tmp-*"))


@pytest.mark.parametrize("device", DEVICES)
def test_a_split_that_does_not_fit_is_one_line_or_falls_back(monkeypatch: pytest.MonkeyPatch,
                                                            capfd: pytest.CaptureFixture[str], device: torch.device):
    monkeypatch.setattr(device_loader, "free_bytes", lambda device: 1_000_000)  # digits at 16 px: 1.4 MiB
    with pytest.raises(UserError) as info:
        build_data(_cfg(loader="device"), 0, 0, 1, device)
    assert_one_line_error(info.value, "data.loader: device", "digits decoded at 16 px", "1,437 + 360 images",
                          "data.loader: torch", "ffcv", f"free on {device}")
    bundle = build_data(_cfg(loader="auto"), 0, 0, 1, device)
    assert isinstance(bundle.train, TorchTrainSource)
    assert "data.loader: auto" in capfd.readouterr().err
    monkeypatch.setattr(device_loader, "free_bytes", lambda device: 10**9)
    assert isinstance(build_data(_cfg(loader="auto"), 0, 0, 1, device).train, DeviceTrainSource)


def test_an_unwritable_cache_folder_is_one_line(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError) as info:
        build_data(_cfg(cache_dir=str(blocker / "cache")), 0, 0, 1, CPU)
    assert_one_line_error(info.value, "data.cache_dir", str(blocker))


def test_an_unreadable_image_is_named_when_decoding(tiny: Path):
    broken = tiny / "train" / "n01" / "images" / "n01_3.JPEG"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(UserError) as info:
        build_data(_cfg(name="tinyimagenet", root=str(tiny), num_workers=1), 0, 0, 1, CPU)
    assert_one_line_error(info.value, str(broken), "unreadable image")


def test_the_torch_loader_seeds_only_the_cpu_generator(monkeypatch: pytest.MonkeyPatch):
    """torch.manual_seed per sample also reseeded every CUDA device: a driver call per sample
    on a GPU machine, and the training process's CUDA RNG clobbered when num_workers is 0."""
    reference = build_data(_cfg(loader="torch", augment="rotate_flip"), 0, 0, 1, CPU).train
    expected = next(iter(reference.epoch(0)))[0]

    def refuse(seed: int) -> None:
        raise AssertionError("a CUDA generator was reseeded")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", refuse)
    monkeypatch.setattr(torch.cuda, "manual_seed", refuse)
    source = build_data(_cfg(loader="torch", augment="rotate_flip"), 0, 0, 1, CPU).train
    assert torch.equal(next(iter(source.epoch(0)))[0], expected)


def test_a_run_that_decodes_trains_like_a_run_that_reads_the_cache(tmp_path: Path):
    """Decoding runs a DataLoader; had it drawn from the global RNG, the model's initialisation
    (and every weight after) would differ between the first run on a machine and the next."""
    from conftest import REPO, tiny_overrides
    from safetensors.torch import load_file

    from nt_dist.entry import main

    weights = []
    for run in ("decodes", "reads"):
        out = tmp_path / run
        overrides = tiny_overrides(out, "teacher", **{"tracking.enabled": "false", "run.epochs": "1",
                                                      "data.cache_dir": str(tmp_path / "cache")})
        assert main([str(REPO / "recipes" / "digits_teacher.yaml"), *[a for o in overrides for a in ("--set", o)]]) == 0
        weights.append(load_file(str(out / "model.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
