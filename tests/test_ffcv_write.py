"""``nt-dist data write-ffcv``: write mode ``proportion`` (``--compress-probability``) and
``--preset imagenet`` (ffcv-imagenet's ``./write_imagenet.sh 500 0.50 90``).

Tiny images only: nothing here decodes through an ffcv pipeline (no numba compile); the
per-sample storage mode and bytes are read straight from the ``.beton`` metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ffcv", reason="ffcv is an optional extra (pip install -e '.[ffcv]')")

import cv2
from ffcv.reader import Reader

from nt_dist import cli
from nt_dist.data.ffcv_io import PRESETS, compresses, image_modes, write_splits

N = 600  # samples in the training split: the share of JPEG ones within 0.06 of P (4 binomial sigma at P 0.5)


class SmoothDataset:
    """``n`` smooth 12 x 10 RGB images (gradients: JPEG-friendly), label ``index % 3``."""

    classes = ["a", "b", "c"]

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        ys, xs = np.mgrid[0:10, 0:12]
        slopes = rng.uniform(-10, 10, (n, 1, 1, 3))
        base = rng.uniform(60, 190, (n, 1, 1, 3))
        self.images = np.clip(base + slopes * (xs + ys)[None, :, :, None] / 4, 0, 255).astype(np.uint8)
        self.targets = [i % 3 for i in range(n)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), self.targets[index]


def _write(out: Path, probability: float | None, workers: int = 1, **settings: Any) -> dict[str, Any]:
    data = {"train": SmoothDataset(N), "val": SmoothDataset(40, seed=1)}
    return write_splits("imagefolder", data, str(out), workers=workers, compress_probability=probability, **settings)


def _samples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(per-sample image metadata, the file's bytes), read with ffcv's own Reader."""
    metadata = Reader(str(path)).metadata["f0"]  # f0: the image field
    return metadata, np.fromfile(path, dtype=np.uint8)


def test_proportion_mixes_raw_and_jpeg_at_the_share(tmp_path: Path) -> None:
    state = np.random.get_state()[1].copy()
    summary = _write(tmp_path, 0.3)
    assert np.array_equal(np.random.get_state()[1], state)  # numpy's global RNG is left alone
    metadata, data = _samples(tmp_path / "train.beton")
    modes = metadata["mode"]  # ffcv's IMAGE_MODES: 0 jpg, 1 raw
    assert set(modes.tolist()) == {0, 1}
    assert abs(np.mean(modes == 0) - 0.3) < 0.06, np.mean(modes == 0)
    assert [m == 0 for m in modes] == [compresses(i, 0.3) for i in range(N)]  # the documented rule
    assert image_modes(tmp_path / "train.beton").tolist() == ["jpg" if m == 0 else "raw" for m in modes]
    assert summary["splits"]["train"]["jpeg_samples"] == int(np.sum(modes == 0))
    images = SmoothDataset(N).images
    pointers = metadata["data_ptr"].astype(np.int64)
    for index in (int(np.flatnonzero(modes == 1)[0]), int(np.flatnonzero(modes == 0)[0])):
        h, w, ptr = int(metadata["height"][index]), int(metadata["width"][index]), int(pointers[index])
        if modes[index] == 1:  # raw: the pixels, bit-exact
            assert np.array_equal(data[ptr:ptr + h * w * 3].reshape(h, w, 3), images[index])
        else:  # jpg: a JPEG stream of the image
            assert data[ptr:ptr + 2].tobytes() == b"\xff\xd8"
            decoded = cv2.cvtColor(cv2.imdecode(data[ptr:ptr + 20_000], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            assert np.abs(decoded.astype(int) - images[index]).mean() < 4
    settings = summary["settings"]
    assert settings["write_mode"] == "proportion" and settings["compress_probability"] == 0.3
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


@pytest.mark.parametrize(("probability", "mode"), [(0.0, 1), (1.0, 0)])
def test_probability_zero_and_one_store_all_raw_or_all_jpeg(tmp_path: Path, probability: float, mode: int) -> None:
    _write(tmp_path, probability)
    assert set(_samples(tmp_path / "train.beton")[0]["mode"].tolist()) == {mode}


def test_proportion_is_byte_identical_for_any_worker_count(tmp_path: Path) -> None:
    _write(tmp_path / "one", 0.5, workers=1)
    _write(tmp_path / "two", 0.5, workers=2)
    _write(tmp_path / "again", 0.5, workers=2)
    for name in ("train.beton", "val.beton", "summary.json"):
        first = (tmp_path / "one" / name).read_bytes()
        assert first == (tmp_path / "two" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["data", "write-ffcv", "--dataset", "digits", "--workers", "1", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_preset_imagenet_lands_in_summary_and_explicit_values_win(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert PRESETS["imagenet"] == {"max_res": 500, "compress_probability": 0.5, "jpeg_quality": 90}
    code, out, _ = _cli(capsys, "--out", str(tmp_path / "preset"), "--preset", "imagenet")
    assert code == 0
    assert ("settings: write_mode proportion, compress_probability 0.5, jpeg_quality 90, max_res 500 "
            "(preset imagenet)") in out.splitlines()
    settings = json.loads((tmp_path / "preset" / "summary.json").read_text())["settings"]
    assert {k: settings[k] for k in ("write_mode", "max_resolution", "compress_probability", "jpeg_quality")} == {
        "write_mode": "proportion", "max_resolution": 500, "compress_probability": 0.5, "jpeg_quality": 90}
    code, out, _ = _cli(capsys, "--out", str(tmp_path / "own"), "--preset", "imagenet", "--jpeg-quality", "75",
                        "--compress-probability", "0.25", "--max-res", "6")
    assert code == 0 and "settings: write_mode proportion, compress_probability 0.25, jpeg_quality 75, max_res 6" in out
    summary = json.loads((tmp_path / "own" / "summary.json").read_text())
    assert (summary["settings"]["compress_probability"], summary["settings"]["jpeg_quality"],
            summary["settings"]["max_resolution"]) == (0.25, 75, 6)
    modes = _samples(tmp_path / "own" / "train.beton")[0]
    assert int(modes["width"].max()) == 6  # 8 x 8 digits resized to at most 6 px
    assert summary["splits"]["train"]["jpeg_samples"] == int(np.sum(modes["mode"] == 0))


@pytest.mark.parametrize(("args", "fragment"), [
    (["--compress-probability", "1.5"], "--compress-probability: must lie in 0..1 (got 1.5)"),
    (["--compress-probability", "-0.1"], "--compress-probability: must lie in 0..1 (got -0.1)"),
    (["--compress-probability", "nan"], "--compress-probability: must lie in 0..1 (got nan)"),
    (["--compress-probability", "0.5", "--raw"], "cannot go with --raw"),
])
def test_bad_compress_probability_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     args: list[str], fragment: str) -> None:
    code, out, err = _cli(capsys, "--out", str(tmp_path / "out"), *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nt-dist: error: ") and fragment in lines[0], err
    assert out == "" and not (tmp_path / "out").exists()  # refused before anything is read or written
