"""The ImageNet-1k and ImageNet 64x64 recipes and pipelines: every one passes ``nt-dist check``,
and the ImageNet chain (normal ResNet-50, nasty ResNet-50 against it, a ResNet-18 student of the
nasty one) runs end to end from ILSVRC-2012's own layout, shrunk (3 classes, tiny images, 2
epochs with a 32 -> 64 px ramp), through the same code: the .beton files written by
``nt-dist data write-ffcv`` and read by the FFCV loader where ffcv installs, else the torch loader."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, documented_errors

from nt_dist.cli import check
from nt_dist.data.synthetic import digit_images, write_imagenet

NT_DIST = str(Path(sys.executable).with_name("nt-dist"))
FILES = sorted(str(p.relative_to(REPO)) for folder in ("imagenet", "imagenet64") for p in (REPO / "recipes" / folder).glob("*.yaml"))
HAS_FFCV = importlib.util.find_spec("ffcv") is not None


def test_the_recipe_folders_hold_the_grid_and_its_presets():
    assert FILES == [f"recipes/{d}/{f}.yaml" for d, names in (
        ("imagenet", ("grid", "grid_16ep", "grid_32ep", "nasty", "student", "teacher")),
        ("imagenet64", ("grid", "grid_16ep", "nasty", "student", "teacher"))) for f in names]


@pytest.mark.parametrize("path", FILES)
def test_every_recipe_and_pipeline_passes_check(path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # run folders and the tracking store are checked where the user stands
    assert check(str(REPO / path), []) == 0


def test_nt_dist_check_validates_every_stage_of_a_pipeline(tmp_path: Path):
    proc = subprocess.run([NT_DIST, "check", str(REPO / "recipes" / "imagenet" / "grid_16ep.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip().endswith("grid_16ep.yaml: valid (11 stages)")
    assert proc.stdout.count("--set run.epochs=16") == 11


def test_a_stage_that_breaks_is_named_in_one_line(tmp_path: Path):
    proc = subprocess.run([NT_DIST, "check", str(REPO / "recipes" / "imagenet" / "grid.yaml"), "--set",
                           "data.min_res=400"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    label = "a pipeline stage that does not validate (`nt-dist check PIPELINE`)"
    assert lines[0].replace(f"{REPO}/", "") == documented_errors()[label]


WNIDS = ["n02119789", "n01440764", "n04592741"]  # not in sorted order


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ILSVRC-2012's layout (flat validation split labelled by the devkit), real digit pixels
    upscaled to 80x96 JPEGs, and (with ffcv) its .beton files."""
    base = tmp_path_factory.mktemp("imagenet")
    pixels, labels = digit_images(96)
    pick = {w: pixels[labels == c][:, 8:88] for c, w in enumerate(WNIDS)}  # 80 x 96: not square
    train = {w: images[:8] for w, images in pick.items()}
    val = [(images[8 + j], w) for j in range(2) for w, images in pick.items()]
    write_imagenet(base / "ILSVRC2012", train, val, val_layout="devkit")
    paths = {"root": base / "ILSVRC2012"}
    if HAS_FFCV:
        paths["ffcv"] = base / "beton"
        proc = subprocess.run([NT_DIST, "data", "write-ffcv", "--dataset", "imagenet", "--root", str(paths["root"]),
                               "--out", str(paths["ffcv"]), "--max-res", "96", "--jpeg-quality", "90", "--workers", "1"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return paths


def test_the_imagenet_chain_runs_shrunk_through_the_same_code(imagenet: dict[str, Path], tmp_path: Path):
    loader = {"data.loader": "ffcv", "data.ffcv_dir": str(imagenet["ffcv"])} if HAS_FFCV else {"data.loader": "torch"}
    shrink = {"run.epochs": 2, "run.precision": "no", "run.progress": False, "tracking.enabled": False,
              "data.root": str(imagenet["root"]), "data.image_size": 64, "data.min_res": 32, "data.start_ramp": 0,
              "data.end_ramp": 1, "data.eval_image_size": 64, "data.batch_size": 8,
              "data.eval_batch_size": 6, "data.num_workers": 1, "optim.lr": 0.1, **loader}
    recipes = REPO / "recipes" / "imagenet"
    pipeline = {
        "pipeline": "imagenet_ci", "output_dir": str(tmp_path / "runs"), "launcher": "local", "seeds": [0],
        "set": shrink,
        "teachers": {"ResNet-50 normal": {"recipe": str(recipes / "teacher.yaml")}},
        "nasty": {"ResNet-50 nasty": {"recipe": str(recipes / "nasty.yaml"), "adversary": "ResNet-50 normal",
                                      "set": {"nasty.adversary_precision": "fp32"}}},
        "students": {"ResNet-18": {"recipe": str(recipes / "student.yaml"), "baseline": False,
                                   "teachers": ["ResNet-50 nasty"],
                                   "set": {"model.name": "resnet18", "distill.teacher_precision": "fp32"}}},
    }
    path = tmp_path / "imagenet_ci.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    proc = subprocess.run([NT_DIST, "pipeline", str(path), "--no-report"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = sorted(p.parent for p in (tmp_path / "runs").glob("seed0/**/metrics.jsonl"))
    assert [p.relative_to(tmp_path / "runs").as_posix() for p in runs] == [
        "seed0/nasty/resnet-50-nasty", "seed0/student/resnet-18/resnet-50-nasty", "seed0/teacher/resnet-50-normal"]
    for run in runs:
        assert (run / "model.safetensors").is_file()
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in records if "epoch" in r]
        assert [r["resolution"] for r in epochs] == [32, 64]  # the ramp, on every stage
        assert all(np.isfinite(r["train_loss"]) and 0 <= r["test_top1"] <= 100 for r in epochs)


def test_the_device_loader_refuses_imagenets_crops_and_auto_picks_torch(imagenet: dict[str, Path],
                                                                         capfd: pytest.CaptureFixture[str]):
    from nt_dist.config import DataConfig, load_recipe
    from nt_dist.data import build_data
    from nt_dist.data.torch_loader import TorchTrainSource
    from nt_dist.errors import UserError

    with pytest.raises(UserError) as error:
        load_recipe(REPO / "recipes" / "imagenet" / "teacher.yaml", ["data.loader=device"])
    assert "\n" not in str(error.value)
    assert str(error.value).endswith("teacher.yaml: data.loader: device: imagenet's random-resized crops are cut from "
                                     "its full-resolution files, and the device loader holds every image resized to "
                                     "one square size (192 px); use data.loader: ffcv (write the .beton files with: "
                                     "nt-dist data write-ffcv --dataset imagenet --preset imagenet) or torch")
    cfg = DataConfig(name="imagenet", root=str(imagenet["root"]), loader="auto", augment="rrc_flip", image_size=32,
                     batch_size=4)
    bundle = build_data(cfg, seed=0, rank=0, world=1, device=torch.device("cpu"))
    assert isinstance(bundle.train, TorchTrainSource)
    assert "data.loader: auto: imagenet's random-resized crops" in capfd.readouterr().err
