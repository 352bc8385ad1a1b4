"""The decoded-split cache serves only what it wrote (issue 24): a truncated or changed
``images.npy`` is found when the entry is opened, named in one warning and decoded again; a
read-only, empty cache folder is one ``data.cache_dir`` line (exit 2), while a read-only folder
that already holds intact entries is served as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import DEVICES, REPO, tiny_overrides
from test_faults import DROP_ROOT_RIGHTS, nt, one_error

from nt_dist.config import DataConfig
from nt_dist.data import array_cache, build_data

CPU = torch.device("cpu")


def _cfg(cache: Path, **values: Any) -> DataConfig:
    """The device loader on the embedded digits at 16 px (1,437 + 360 images, 1.4 MiB decoded)."""
    base = {"name": "digits", "image_size": 16, "batch_size": 8, "eval_batch_size": 50, "loader": "device",
            "augment": "shift", "cache_dir": str(cache)}
    return DataConfig(**{**base, **values})


def _train_entry(cache: Path) -> Path:
    return next(p for p in cache.iterdir() if p.is_dir() and "-train-" in p.name)


def _reference(cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split as first decoded (a copy: the served tensor maps the file)."""
    train = build_data(_cfg(cache), 0, 0, 1, CPU).train
    return train.images.clone(), train.labels.clone()


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("nt-dist: warning:")]


# ------------------------------------------------------------------ damaged entries


@pytest.mark.parametrize("device", DEVICES)
def test_a_truncated_images_file_is_named_and_decoded_again(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                            device: torch.device):
    cache = tmp_path / "cache"
    images, labels = _reference(cache)
    path = _train_entry(cache) / "images.npy"
    size = path.stat().st_size
    os.truncate(path, size // 2)  # numpy's memory map raised 'mmap length is greater than file size'
    capfd.readouterr()
    train = build_data(_cfg(cache), 0, 0, 1, device).train
    assert train.images.device.type == train.labels.device.type == device.type
    assert torch.equal(train.images.cpu(), images) and torch.equal(train.labels.cpu(), labels)
    assert path.stat().st_size == size
    assert _warnings(capfd.readouterr().err) == [
        f"nt-dist: warning: {path} is {size // 2:,} bytes, expected {size:,} (truncated or overwritten); "
        "decoding digits training split again"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_pixels_changed_in_place_anywhere_are_found_and_decoded_again(tmp_path: Path, seed: int,
                                                                    capfd: pytest.CaptureFixture[str],
                                                                    device: torch.device):
    """One byte at a random place, the size unchanged: the check hashes every byte, so no place
    escapes it (a sampled check would miss most of them)."""
    cache = tmp_path / "cache"
    images, _ = _reference(cache)
    path = _train_entry(cache) / "images.npy"
    size = path.stat().st_size
    offset = int(np.random.default_rng(seed).integers(size - images.numel(), size))  # a pixel, past the header
    with path.open("r+b") as handle:
        handle.seek(offset)
        old = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([old ^ 0x5A]))
    assert path.stat().st_size == size
    capfd.readouterr()
    train = build_data(_cfg(cache), 0, 0, 1, device).train
    assert torch.equal(train.images.cpu(), images)
    assert _warnings(capfd.readouterr().err) == [
        f"nt-dist: warning: {path} does not match the sha256 recorded when it was written (changed on disk); "
        "decoding digits training split again"]


def test_changed_labels_and_a_garbled_metadata_file_are_found(tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    cache = tmp_path / "cache"
    _, labels = _reference(cache)
    entry = _train_entry(cache)
    np.save(entry / "labels.npy", np.roll(labels.numpy(), 1))  # the same size, other labels
    capfd.readouterr()
    assert torch.equal(build_data(_cfg(cache), 0, 0, 1, CPU).train.labels, labels)
    assert f"{entry / 'labels.npy'} does not match the sha256" in capfd.readouterr().err

    (entry / "meta.json").write_text("{ not json")
    assert torch.equal(build_data(_cfg(cache), 0, 0, 1, CPU).train.labels, labels)
    assert _warnings(capfd.readouterr().err) == [
        f"nt-dist: warning: {entry / 'meta.json'} is not the metadata nt-dist writes (garbled or edited); "
        "decoding digits training split again"]


def test_an_intact_entry_is_read_as_it_is_and_records_its_check(tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    cache = tmp_path / "cache"
    _reference(cache)
    entry = _train_entry(cache)
    meta = json.loads((entry / "meta.json").read_text())
    record = meta["files"]["images.npy"]
    assert record["bytes"] == (entry / "images.npy").stat().st_size
    assert record["sha256"] == array_cache.file_digests(entry / "images.npy")
    stamp = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    capfd.readouterr()
    build_data(_cfg(cache), 0, 0, 1, CPU)
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == stamp
    err = capfd.readouterr().err
    assert not _warnings(err) and "decoding" not in err


def test_block_digests_cover_every_byte_and_do_not_depend_on_the_threads(tmp_path: Path):
    path = tmp_path / "blob"
    data = np.random.default_rng(0).integers(0, 256, 3 * 1000 + 17, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    digests = array_cache.file_digests(path, block=1000, threads=1)
    assert len(digests) == 4
    assert array_cache.file_digests(path, block=1000, threads=3) == digests
    data[3016] ^= 1  # the last byte of the short last block
    path.write_bytes(data.tobytes())
    assert array_cache.file_digests(path, block=1000, threads=2)[:3] == digests[:3]
    assert array_cache.file_digests(path, block=1000, threads=2)[3] != digests[3]
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert array_cache.file_digests(empty) == []


# ------------------------------------------------------------------ a read-only cache folder


def _can_drop_root_rights() -> bool:
    """Tests run as root, whom permission bits do not stop: the read-only tests drop
    CAP_DAC_OVERRIDE (as tests/test_faults.py does); where setpriv cannot, they are skipped."""
    if os.geteuid() != 0:
        return True
    try:
        return subprocess.run([*DROP_ROOT_RIGHTS, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_user = pytest.mark.skipif(not _can_drop_root_rights(),
                                reason="running as root and setpriv cannot drop CAP_DAC_OVERRIDE")

BUILD = """
import os, sys, torch
from nt_dist.config import DataConfig
from nt_dist.data import build_data
from nt_dist.errors import UserError
cfg = DataConfig(name="digits", image_size=16, batch_size=8, eval_batch_size=50, loader="device",
                 augment="shift", cache_dir=sys.argv[1])
train = build_data(cfg, 0, 0, 1, torch.device("cpu")).train
print(len(train.labels), int(train.images.sum()), flush=True)
damaged = sys.argv[2]  # damaged by its owner, who may not write in the folders
os.chmod(damaged, 0o644)
os.truncate(damaged, 100)
try:
    build_data(cfg, 0, 0, 1, torch.device("cpu"))
except UserError as exc:
    sys.exit(f"nt-dist: error: {exc}")
"""


@needs_user
def test_a_read_only_empty_cache_folder_is_one_line_naming_data_cache_dir(tmp_path: Path):
    """Through the training entry point, as a user types it: one line, exit 2, no traceback
    (it was a traceback on ``<entry>.lock``)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        line = one_error(nt("train", str(REPO / "recipes" / "digits_teacher.yaml"),
                            *sum((["--set", o] for o in tiny_overrides(tmp_path / "out", **{
                                "tracking.enabled": "false", "data.loader": "device",
                                "data.cache_dir": str(cache)})), []),
                            cwd=tmp_path, as_user=True))
    finally:
        cache.chmod(0o755)
    assert line == (f"nt-dist: error: data.cache_dir: cannot write in {cache} to decode digits training split "
                    "(Permission denied); set data.cache_dir or $NT_DIST_CACHE to a writable folder, "
                    "or use data.loader: torch")
    assert not list(cache.iterdir())


@needs_user
def test_a_read_only_cache_folder_with_intact_entries_is_served(tmp_path: Path):
    """A cache decoded once and shared read-only (even its ``.lock`` files): verifying and
    reading take no lock and write nothing. Damaged there, it is one line, not a traceback."""
    cache = tmp_path / "cache"
    images, labels = _reference(cache)
    damaged = _train_entry(cache) / "images.npy"
    size = damaged.stat().st_size
    paths = [cache, *cache.iterdir(), *(p for d in cache.iterdir() if d.is_dir() for p in d.iterdir())]
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        prefix = DROP_ROOT_RIGHTS if os.geteuid() == 0 else []
        proc = subprocess.run([*prefix, sys.executable, "-c", BUILD, str(cache), str(damaged)],
                              capture_output=True, text=True, timeout=300)
    finally:
        for path in paths:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert proc.stdout.split() == [str(len(labels)), str(int(images.sum()))], proc.stderr[-3000:]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"nt-dist: error: data.cache_dir: {damaged} is 100 bytes, expected {size:,} (truncated or "
        f"overwritten); cannot write in {cache} to decode digits training split (Permission denied); set "
        "data.cache_dir or $NT_DIST_CACHE to a writable folder, or use data.loader: torch"]
