"""The checkpoint folder's pieces on their own: which folders count as checkpoints, the
counters' file (old and new), and the modes the atomic writers give their files.
Whole runs that resume through them are in test_resume.py."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from nt_dist import checkpoint, fileio
from nt_dist.checkpoint import TrainState, parse_state


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----------------------------------------------------------------------------- checkpoint folders


def test_only_step_number_folders_are_checkpoints_and_each_stray_one_is_named_once(tmp_path: Path, capfd):
    root = tmp_path / checkpoint.CHECKPOINTS
    for name in ("step_000000003", "step_000000012", "step_5", "step_5.bak", "step_x", "step_", "notes",
                 "step_\u0663", ".tmp-step_000000015-123"):  # an Arabic-Indic 3: int() reads it, we do not
        (root / name).mkdir(parents=True)
    (root / "step_000000099").write_text("a file, not a checkpoint folder")
    first = checkpoint.checkpoint_dirs(tmp_path)
    again = checkpoint.checkpoint_dirs(tmp_path)
    assert [p.name for p in first] == ["step_000000012", "step_5", "step_000000003"] == [p.name for p in again]
    warnings = capfd.readouterr().err.splitlines()
    strays = sorted(root / name for name in ("notes", "step_", "step_5.bak", "step_x", "step_\u0663"))
    assert warnings == [f"nt-dist: warning: ignoring {path}: not a checkpoint folder (those are named "
                        "step_<number>)" for path in strays]  # once per process, not at every listing


# ----------------------------------------------------------------------------- the counters' file


def test_a_state_file_from_before_the_epoch_sums_loads_as_a_partial_epoch():
    old = {"epoch": 1, "step_in_epoch": 5, "global_step": 13, "mlflow_run_id": "abc"}
    state = parse_state(old)
    assert (state.epoch, state.step_in_epoch, state.global_step, state.mlflow_run_id) == (1, 5, 13, "abc")
    assert state.epoch_sums == {} and state.epoch_steps == 0 and state.epoch_lr is None
    assert state.partial_epoch
    at_an_epoch_end = parse_state({**old, "step_in_epoch": 0})
    assert not at_an_epoch_end.partial_epoch  # nothing of that epoch was trained: nothing is missing


def test_the_epoch_sums_round_trip_bit_for_bit():
    """The float32 running sums survive the JSON file exactly, so a resumed epoch's mean is the
    uninterrupted one's."""
    sums = torch.tensor([1.8594446182250977, 0.1 + 0.2, 3.4028234663852886e38, 1e-45], dtype=torch.float32)
    state = TrainState(epoch=0, step_in_epoch=5, global_step=5, epoch_steps=5, epoch_lr=0.049999,
                       epoch_sums={f"k{i}": float(v) for i, v in enumerate(sums)})
    back = parse_state(json.loads(json.dumps(asdict(state), indent=1)))
    assert back == state and not back.partial_epoch
    restored = torch.tensor([back.epoch_sums[f"k{i}"] for i in range(4)], dtype=torch.float32)
    assert torch.equal(restored, sums)


@pytest.mark.parametrize("fields", [{"epoch_sums": [1.0]}, {"epoch_sums": {"loss": "1.0"}},
                                    {"epoch_sums": {"loss": True}}, {"epoch_steps": -1}, {"epoch_steps": 1.0},
                                    {"epoch_steps": 9}, {"epoch_lr": "0.1"}, {"epoch_lr": -0.1}])
def test_epoch_fields_of_the_wrong_type_are_refused(fields: dict):
    with pytest.raises((ValueError, TypeError)):
        parse_state({"epoch": 0, "step_in_epoch": 5, "global_step": 5, "mlflow_run_id": "", **fields})


# ----------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)],
                         ids=["umask-022", "umask-027", "umask-002"])
def test_the_atomic_writers_give_the_mode_the_umask_gives_a_plain_file(tmp_path: Path, mask: int, expected: int):
    """Read when writing, not when imported: the umask set after import is the one that counts."""
    with umask(mask):
        fileio.atomic_write_text(tmp_path / "a.json", "{}")
        fileio.atomic_save_tensors({"w": torch.zeros(2)}, tmp_path / "b.safetensors", {"k": "v"})
        checkpoint.export_model({"w": torch.zeros(2)}, tmp_path / "model.safetensors", {"architecture": "x"})
        (tmp_path / "plain").write_text("open() as the yardstick")
    assert mode(tmp_path / "plain") == expected
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {
        "a.json": expected, "b.safetensors": expected, "model.safetensors": expected, "plain": expected}


def test_a_folder_written_by_another_library_gets_the_umask_mode(tmp_path: Path):
    """safetensors' save_file (what accelerate's save_state calls) makes its files 0600."""
    from safetensors.torch import save_file

    (tmp_path / "shards").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "shards" / "part.safetensors"))
    with umask(0o022):
        fileio.apply_umask(tmp_path)
    assert mode(tmp_path / "model.safetensors") == 0o644 == mode(tmp_path / "shards" / "part.safetensors")
