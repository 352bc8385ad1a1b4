"""The command line as a user types it: one-line errors with exit code 2, nothing trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ON_CUDA, REPO, documented_errors

NT_DIST = str(Path(sys.executable).with_name("nt-dist"))


def nt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([NT_DIST, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("nt-dist: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_check_prints_the_resolved_recipe(tmp_path: Path):
    proc = nt("check", str(REPO / "recipes" / "tinyimagenet_nasty.yaml"), "--set", "optim.lr=0.05", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.05" in proc.stdout and "omega: 0.01" in proc.stdout and "valid" in proc.stderr
    assert not any(tmp_path.iterdir())  # validation trains and writes nothing


@pytest.mark.parametrize("text,needles", [
    ("nasty: {omgea: 0.1}\n", ["nasty.omgea", "unknown key"]),
    ("optim: {lr: fast}\n", ["optim.lr"]),
    ("run: [1, 2\n", ["unreadable YAML"]),
    ("model: {name: cifar_resnt18}\n", ["model.name", "cifar_resnet18"]),
])
def test_bad_recipes_fail_in_one_line(tmp_path: Path, text: str, needles: list[str]):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    for command in ("check", "train"):
        assert_one_line_error(nt(command, str(recipe), cwd=tmp_path), str(recipe) if "model" not in text else "", *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing trained or written


def test_missing_data_root_names_the_path(tmp_path: Path):
    missing = tmp_path / "nowhere"
    proc = nt("train", str(REPO / "recipes" / "paper" / "tinyimagenet" / "teacher.yaml"), "--set", f"data.root={missing}",
              "--set", f"run.output_dir={tmp_path / 'out'}", "--set", "run.precision=no", cwd=tmp_path)
    assert_one_line_error(proc, str(missing))
    assert not (tmp_path / "out").exists()


def test_wrong_adversary_checkpoint_names_the_key(tmp_path: Path):
    proc = nt("train", str(REPO / "recipes" / "digits_nasty.yaml"),
              "--set", f"nasty.adversary_checkpoint={tmp_path / 'no_such_run'}",
              "--set", f"run.output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert_one_line_error(proc, "nasty.adversary_checkpoint", "no_such_run")
    assert not (tmp_path / "out").exists()


def test_fp16_trains_on_a_gpu_and_is_refused_on_a_cpu(tmp_path: Path):
    proc = nt("check", str(REPO / "recipes" / "digits_teacher.yaml"), cwd=tmp_path)
    assert proc.returncode == 0
    proc = nt("train", str(REPO / "recipes" / "digits_teacher.yaml"), "--set", "run.precision=fp16",
              "--set", "run.max_steps=2", "--set", "tracking.enabled=false",
              "--set", f"run.output_dir={tmp_path / 'out'}", cwd=tmp_path)
    if ON_CUDA:  # accelerate's grad scaler; the two steps and the evaluation finish
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((tmp_path / "out" / "metrics.json").read_text())["global_step"] == 2
    else:
        assert_one_line_error(proc, "digits_teacher.yaml: run.precision: fp16 needs a GPU")


# ten levels of nine aliases: 4,412,961,486 values once expanded, 0.3 KiB as text
BILLION_LAUGHS = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{new}: &{new} [{', '.join([f'*{old}'] * 9)}]\n" for old, new in zip("abcdefghi", "bcdefghij", strict=True))


# docs/errors.md row -> (file name, file text or None for "no such file", extra environment)
ERROR_CASES = {
    "unknown recipe key": ("bad.yaml", "nasty: {omgea: 0.1}\n", {}),
    "mistyped value": ("bad.yaml", "optim: {lr: fast}\n", {}),
    "unreadable YAML": ("bad.yaml", "optim:\n  milestones: [1, 2\n", {}),
    "missing recipe": ("nope.yaml", None, {}),
    "unknown model name": ("recipe.yaml", "model: {name: resnet1}\n", {}),
    "fp16 on a CPU": ("recipe.yaml", "run: {precision: fp16}\ntracking: {enabled: false}\n", {}),
    "an FSDP launcher config": ("recipe.yaml", "tracking: {enabled: false}\n", {"ACCELERATE_USE_FSDP": "true"}),
    "a value out of range or not finite": ("recipe.yaml", "optim: {lr: .inf}\n", {}),
    "an image size the network cannot take": ("recipe.yaml", "data: {image_size: 4}\n", {}),
    "progressive resizing without random-resized crops": ("recipe.yaml", "data: {image_size: 32, min_res: 16}\n", {}),
    "a model option the network does not take": ("recipe.yaml", "model: {blurpool: true}\ntracking: {enabled: false}\n",
                                                 {}),
    "ImageNet's random-resized crops on the device loader": (
        "recipe.yaml", "data: {name: imagenet, root: x, loader: device, augment: rrc_flip}\n", {}),
    "recipe not UTF-8": ("recipe.yaml", "run:\n  name: caf\xe9\n".encode("latin-1"), {}),
    "recipe not a mapping": ("recipe.yaml", "- run\n- data\n", {}),
    "`run.output_dir` is a file": ("recipe.yaml", "run: {output_dir: taken}\n", {}),
    "a tracking store that cannot work": ("recipe.yaml", "tracking: {uri: 'ftp://host/x'}\n", {}),
    "a pipeline file given to `nt-dist train`": ("pipe.yaml", "pipeline: t\n", {}),
    "a key given twice in a recipe or pipeline file": ("dup.yaml", "optim:\n  lr: 0.1\n  lr: 0.2\n", {}),
    'YAML aliases that expand without bound ("billion laughs")': ("bomb.yaml", BILLION_LAUGHS, {}),
    "a recipe or pipeline file over 1 MiB": ("big.yaml", "#" * 2_000_000, {}),
    "a nasty recipe whose adversary was not trained yet": (
        "recipe.yaml", "run: {role: nasty}\nnasty: {adversary_checkpoint: runs/t}\ntracking: {enabled: false}\n", {}),
    "a run name with a control or bidi character": ("r.yaml", 'run: {name: "ab\\ncd"}\n', {}),
    "an ImageNet `data.root` without `train/`": (
        "recipe.yaml", "data: {name: imagenet, root: imagenet}\ntracking: {enabled: false}\n", {}),
    "a missing ImageNet 64x64 batch file": (
        "recipe.yaml", "data: {name: imagenet64, root: imagenet64}\ntracking: {enabled: false}\n", {}),
}


@pytest.mark.parametrize("label", sorted(ERROR_CASES))
def test_the_errors_page_shows_the_real_error_line(tmp_path: Path, label: str):
    """The error table of docs/errors.md is what a user sees (rows that need no trained model)."""
    import os

    if label == "fp16 on a CPU" and ON_CUDA:
        pytest.skip("fp16 trains where there is a GPU: test_fp16_trains_on_a_gpu_and_is_refused_on_a_cpu")
    name, text, env = ERROR_CASES[label]
    if isinstance(text, bytes):
        (tmp_path / name).write_bytes(text)
    elif text is not None:
        (tmp_path / name).write_text(text)
    (tmp_path / "taken").write_text("a file where the run folder should be")
    proc = subprocess.run([NT_DIST, "train", name], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, **env})
    assert_one_line_error(proc)
    shown = documented_errors()[label]
    actual = next(line for line in proc.stderr.splitlines() if line.startswith("nt-dist: error:"))
    if shown.endswith("..."):  # a long list cut short in the table
        assert actual.startswith(shown.removesuffix("..."))
    else:
        assert actual == shown


def test_ui_without_a_store_is_one_line_and_version_names_the_stack(tmp_path: Path):
    """(The UI itself is served in test_tracking.py: test_a_moved_store_keeps_its_artifacts_in_the_ui.)"""
    import nt_dist

    assert_one_line_error(nt("ui", "--db", str(tmp_path / "none.db"), cwd=tmp_path), "none.db")
    version = subprocess.run([NT_DIST, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0
    assert version.stdout.startswith(f"nt-dist {nt_dist.__version__} (torch ") and "mlflow 3." in version.stdout
    assert version.stdout.count("\n") == 1
