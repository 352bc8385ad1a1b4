"""Every mistake and fault ends in one line: bad values, paths, files, a full disk, Ctrl-C."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_overrides

from nt_dist import checkpoint, entry
from nt_dist.config import load_recipe
from nt_dist.data.synthetic import write_tinyimagenet
from nt_dist.errors import MAX_LINE, UserError

NT_DIST = str(Path(sys.executable).with_name("nt-dist"))
TEACHER = REPO / "recipes" / "digits_teacher.yaml"


DROP_ROOT_RIGHTS = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                    "--bounding-set=-dac_override,-dac_read_search"]


def nt(*args: str, cwd: Path, as_user: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """``nt-dist ARGS`` as a user types it; ``as_user``: without root's power to ignore permission
    bits (CI runs as root), as an ordinary user would meet a read-only folder."""
    prefix = DROP_ROOT_RIGHTS if as_user and os.geteuid() == 0 else []
    return subprocess.run([*prefix, NT_DIST, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def one_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("nt-dist: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert len(lines[0]) <= MAX_LINE
    return lines[0]


def sets(*items: str) -> list[str]:
    return sum((["--set", item] for item in items), [])


# ----------------------------------------------------------------------------- check == train


@pytest.mark.parametrize("override,needle", [
    ("data.image_size=4", "data.image_size: 4 px does not fit model.name 'cifar_cnn' (Given input size"),
    ("optim.lr=.inf", "optim.lr: input should be a finite number (got inf)"),
    ("nasty.omega=.nan", "nasty.omega: input should be a finite number (got nan)"),
    ("run.seed=-1", "run.seed: input should be greater than or equal to 0"),
    ("optim.warmup_epochs=30", "optim.warmup_epochs: 30.0 exceeds run.epochs (15)"),
    ("tracking.uri=ftp://host/x", "tracking.uri: ftp://host/x: unsupported tracking store"),
    ("tracking.uri=./mlruns", "tracking.uri: ./mlruns: MLflow 3 refuses its file store"),
])
def test_check_rejects_what_train_rejects_with_the_same_line(tmp_path: Path, override: str, needle: str):
    lines = {command: one_error(nt(command, str(TEACHER), *sets(override, f"run.output_dir={tmp_path / 'out'}"),
                                   cwd=tmp_path))
             for command in ("check", "train")}
    assert lines["check"] == lines["train"]
    assert needle in lines["train"]
    assert not (tmp_path / "out").exists()


def test_recipe_text_that_is_not_utf8_or_not_a_mapping(tmp_path: Path):
    (tmp_path / "latin1.yaml").write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    assert one_error(nt("train", "latin1.yaml", cwd=tmp_path)) == \
        "nt-dist: error: latin1.yaml: not UTF-8 text (byte 16); a recipe is a YAML file"
    (tmp_path / "list.yaml").write_text("- run\n- data\n")
    assert one_error(nt("check", "list.yaml", cwd=tmp_path)) == \
        "nt-dist: error: list.yaml: a recipe is a mapping of sections (run, data, model, ...), not a list"


def test_error_lines_stay_short_whatever_the_input(tmp_path: Path):
    huge = "x" * 1_000_000  # just under the 1 MiB a recipe file may hold
    (tmp_path / "huge.yaml").write_text(f"optim:\n  lr: {huge}\n")
    line = one_error(nt("check", "huge.yaml", cwd=tmp_path))
    assert line.startswith("nt-dist: error: huge.yaml: optim.lr: input should be a valid number") and line.endswith("...")
    assert len(line) <= 500
    (tmp_path / "over.yaml").write_text(f"optim:\n  lr: {huge * 2}\n")
    assert one_error(nt("check", "over.yaml", cwd=tmp_path)) == (
        "nt-dist: error: over.yaml: 2000014 bytes; a recipe file is at most 1 MiB")


# ----------------------------------------------------------------------------- paths and permissions


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A folder with a read-only ``readonly/`` in it."""
    (tmp_path / "readonly").mkdir()
    (tmp_path / "readonly").chmod(0o555)
    return tmp_path


def test_output_dir_that_is_a_file_or_read_only(tmp_path: Path, shared: Path):
    (tmp_path / "taken").write_text("not a folder")
    line = one_error(nt("train", str(TEACHER), *sets(f"run.output_dir={tmp_path / 'taken'}"), cwd=tmp_path))
    assert line == f"nt-dist: error: run.output_dir: {tmp_path / 'taken'} is a file, not a folder"
    out = shared / "readonly" / "run"
    line = one_error(nt("train", str(TEACHER), *sets(f"run.output_dir={out}", "tracking.enabled=false"),
                        cwd=shared, as_user=True))
    assert line == f"nt-dist: error: run.output_dir: {out}: not writable (its parent {out.parent} is read-only)"


def test_mlflow_store_in_a_read_only_folder_is_refused_at_once(shared: Path):
    uri = f"sqlite:///{shared / 'readonly' / 'mlflow.db'}"
    started = time.perf_counter()
    proc = nt("train", str(TEACHER), *sets(f"run.output_dir={shared / 'out'}", f"tracking.uri={uri}",
                                          "tracking.timeout_s=5"), cwd=shared, as_user=True)
    assert one_error(proc) == (f"nt-dist: error: tracking.uri: {uri}: the folder {shared / 'readonly'} is not "
                               "writable; set tracking.uri to a writable sqlite:///PATH, or tracking.enabled=false")
    assert time.perf_counter() - started < 60
    assert not (shared / "out").exists()


# ----------------------------------------------------------------------------- data files


def tiny_imagenet(root: Path) -> Path:
    wnids = ["n01443537", "n01629819"]
    rng = np.random.default_rng(0)
    images = {w: rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8) for w in wnids}
    write_tinyimagenet(root, wnids, images, [(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), wnids[i % 2])
                                             for i in range(8)])
    return root


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_corrupt_jpeg_is_found_before_the_first_step(tmp_path: Path, split: str):
    root = tiny_imagenet(tmp_path / "tiny")
    bad = (sorted((root / "train").glob("*/images/*.JPEG")) if split == "train"
           else sorted((root / "val" / "images").glob("*.JPEG")))[3]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: the header reads, the pixels do not
    out = tmp_path / "out"
    proc = nt("train", str(TEACHER), *sets("data.name=tinyimagenet", f"data.root={root}", "data.image_size=16",
                                           "data.batch_size=16", "data.num_workers=1", f"run.output_dir={out}",
                                           "tracking.enabled=false", "run.progress=false"), cwd=tmp_path)
    line = one_error(proc)
    assert line.startswith(f"nt-dist: error: {bad}: unreadable image (")
    assert "epoch 1" not in proc.stdout and not out.exists()


def test_an_error_raised_in_a_dataloader_worker_stays_one_line():
    class Broken(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int):
            raise UserError("/data/x.JPEG: unreadable image (OSError: image file is truncated)")

    loader = torch.utils.data.DataLoader(Broken(), num_workers=1)
    with pytest.raises(UserError) as info:
        next(iter(loader))
    assert str(info.value) == "/data/x.JPEG: unreadable image (OSError: image file is truncated)"


# ----------------------------------------------------------------------------- files a run reads back


def test_exported_model_with_corrupt_metadata_is_one_line(tmp_path: Path):
    model = torch.nn.Linear(2, 2)
    checkpoint.export_model(model.state_dict(), tmp_path / "model.safetensors",
                            {"architecture": "mlp", "num_classes": "ten"})
    with pytest.raises(UserError, match=r"corrupt metadata: num_classes is 'ten', not a count"):
        checkpoint.load_frozen_model("", str(tmp_path), 10, "distill.teacher_checkpoint", lambda n, c: model)


def test_a_state_dict_mismatch_is_one_short_line(tmp_path: Path):
    from nt_dist.models import create_model

    big = create_model("cifar_resnet18", num_classes=10)
    checkpoint.export_model(big.state_dict(), tmp_path / "model.safetensors", {"num_classes": "10"})
    with pytest.raises(UserError) as info:
        checkpoint.load_frozen_model("cifar_resnet34", str(tmp_path), 10, "nasty.adversary_checkpoint",
                                     lambda n, c: create_model(n, num_classes=c))
    message = str(info.value)
    assert message.startswith("nasty.adversary_checkpoint: ") and "does not fit 'cifar_resnet34'" in message
    assert len(message) <= MAX_LINE and "\n" not in message


@pytest.mark.parametrize("counters", ['{"epoch": "one", "step_in_epoch": 0, "global_step": 3, "mlflow_run_id": ""}',
                                      '{"epoch": 0, "step_in_epoch": -2, "global_step": 3, "mlflow_run_id": ""}',
                                      '[1, 2]', '{"epoch": 0, "extra": 1}'])
def test_counters_of_the_wrong_type_are_a_corrupt_checkpoint(counters: str):
    import json

    with pytest.raises((ValueError, TypeError)):
        checkpoint.parse_state(json.loads(counters))


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_ends_in_one_line_and_keeps_the_newest_complete_checkpoint(tmp_path: Path, monkeypatch, capfd):
    """The second checkpoint's write fails half-way with ENOSPC, as on a full disk."""
    from accelerate import Accelerator

    calls = {"n": 0}
    real_save = Accelerator.save_state

    def filling_disk(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(output_dir, "model.safetensors").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", filling_disk)
    out = tmp_path / "run"
    recipe_args = [str(TEACHER), *sets(*tiny_overrides(out, "teacher", **{"tracking.enabled": "false",
                                                                           "run.checkpoint_every_steps": "3"}))]
    assert entry.main(recipe_args) == 1
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("nt-dist: error:")]
    assert lines == [f"nt-dist: error: {TEACHER}: run.output_dir: No space left on device while writing the "
                     f"checkpoint of step 6 in {out}; the newest complete checkpoint is "
                     f"{out / 'checkpoints' / 'step_000000003'}"]
    assert "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000000003"]  # no temporary left
    assert not (out / "metrics.json").exists()
    # space freed: the same command resumes from the surviving checkpoint and finishes
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    assert entry.main(recipe_args) == 0
    assert f"resumed from {out / 'checkpoints' / 'step_000000003'}" in capfd.readouterr().out


def test_recipe_load_error_under_the_train_entry_point_is_one_line(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "nt_dist.train", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert one_error(proc) == f"nt-dist: error: {tmp_path / 'missing.yaml'}: recipe file not found"


def test_recipe_keys_are_names(tmp_path: Path):
    (tmp_path / "keys.yaml").write_text("run:\n  1: 2\n")
    with pytest.raises(UserError, match=r"keys.yaml: run.1: keys are names, not ints"):
        load_recipe(tmp_path / "keys.yaml")
