"""The FFCV path: .beton round trips, agreement with the torch path, and exact coverage across ranks.

One ffcv bundle is shared by the module: numba compiles each pipeline on first use. Loaders run
with one thread (``num_workers=1``), which numba compiles far faster than its parallel variant.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("ffcv", reason="ffcv is an optional extra (pip install -e '.[ffcv]')")

from conftest_data import IndexDataset, assert_one_line_error

from nt_dist.config import DataConfig
from nt_dist.data import DataBundle, build_data
from nt_dist.data.digits import DigitsDataset
from nt_dist.data.ffcv_io import check_beton, main, write_ffcv, write_splits
from nt_dist.data.synthetic import write_cifar10
from nt_dist.data.transforms import normalisation
from nt_dist.errors import UserError

CPU = torch.device("cpu")

# Freeing an ffcv Loader before interpreter shutdown makes numba's dispatcher finalizer print an
# ignored KeyError (numba 0.68 + ffcv 1.0.2; harmless). Bundles stay referenced here until exit.
_KEEP: list[DataBundle] = []


def _ffcv_data(cfg: DataConfig) -> DataBundle:
    _KEEP.append(build_data(cfg, 0, 0, 1, CPU))
    return _KEEP[-1]


def _cfg(**changes: Any) -> DataConfig:
    fields = {"name": "cifar10", "image_size": 32, "batch_size": 4, "eval_batch_size": 4, "augment": "none",
              "loader": "ffcv", "num_workers": 1}
    return DataConfig(**{**fields, **changes})


def _pixels(images: torch.Tensor, dataset: str) -> np.ndarray:
    """Normalised NCHW floats back to uint8 NHWC pixels."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in normalisation(dataset))
    return (images * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("ffcv")
    expected = write_cifar10(base / "root")
    summary = write_ffcv("cifar10", str(base / "root"), str(base / "raw"), raw=True, workers=2)
    bundle = _ffcv_data(_cfg(root=str(base / "root"), ffcv_dir=str(base / "raw")))
    return {"base": base, "expected": expected, "summary": summary, "bundle": bundle}


def test_raw_round_trip_is_bit_exact(cifar: dict[str, Any]) -> None:
    bundle: DataBundle = cifar["bundle"]
    images, labels = cifar["expected"]["test"]
    batches = list(bundle.eval.batches())
    assert [len(y) for _, y in batches] == [4, 2]  # the last, short batch is kept
    got = torch.cat([x for x, _ in batches])
    assert got.shape == (6, 3, 32, 32) and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(_pixels(got, "cifar10"), images)
    assert torch.cat([y for _, y in batches]).tolist() == labels


def test_torch_and_ffcv_paths_agree_in_eval_order(cifar: dict[str, Any]) -> None:
    torch_bundle = build_data(_cfg(root=str(cifar["base"] / "root"), loader="torch"), 0, 0, 1, CPU)
    pairs = list(zip(torch_bundle.eval.batches(), cifar["bundle"].eval.batches(), strict=True))
    for (torch_images, torch_labels), (ffcv_images, ffcv_labels) in pairs:
        assert ffcv_labels.dtype == torch.int64 and torch.equal(torch_labels, ffcv_labels)
        torch.testing.assert_close(ffcv_images, torch_images, atol=1e-5, rtol=0)
    assert len(cifar["bundle"].eval) == len(torch_bundle.eval) == 6


def test_train_epochs_are_seeded_resumable_and_fresh_tensors(cifar: dict[str, Any]) -> None:
    train = cifar["bundle"].train
    assert train.steps_per_epoch == 5  # 20 images, batch 4
    first = [(x, y) for x, y in train.epoch(1)]
    assert len(first) == 5 and first[0][0] is not first[1][0]
    again = [y.tolist() for _, y in train.epoch(1)]
    assert again == [y.tolist() for _, y in first]  # yielded tensors survive later batches
    assert [y.tolist() for _, y in train.epoch(1, start_step=3)] == again[3:]
    other = [y.tolist() for _, y in train.epoch(2)]
    assert sorted(label for batch in other for label in batch) == sorted(cifar["expected"]["train"][1])
    assert other != again
    stopped = train.epoch(0)
    next(stopped)
    stopped.close()  # the consumer stops early: ffcv's thread must let go
    assert len(list(train.epoch(0))) == 5


def test_jpg_round_trip_within_tolerance(tmp_path: Path) -> None:
    summary = write_ffcv("digits", "", str(tmp_path), jpeg_quality=90)
    assert summary["settings"] == {"write_mode": "jpg", "max_resolution": None, "jpeg_quality": 90}
    bundle = _ffcv_data(_cfg(name="digits", image_size=8, eval_batch_size=128, ffcv_dir=str(tmp_path)))
    got = _pixels(torch.cat([x for x, _ in bundle.eval.batches()]), "digits").astype(int)
    expected = DigitsDataset("test").images[..., None].astype(int)
    assert got.shape == (360, 8, 8, 3)
    assert np.abs(got - expected).mean() < 4 and np.abs(got - expected).max() < 80


def test_summary_content(cifar: dict[str, Any]) -> None:
    summary = cifar["summary"]
    on_disk = json.loads((cifar["base"] / "raw" / "summary.json").read_text())
    assert on_disk == summary
    assert summary["dataset"] == "cifar10" and summary["num_classes"] == 10 and summary["classes"][0] == "airplane"
    for split in ("train", "test"):
        labels = cifar["expected"][split][1]
        assert summary["splits"][split]["samples"] == len(labels)
        assert summary["splits"][split]["label_histogram"] == np.bincount(labels, minlength=10).tolist()
    assert summary["settings"]["write_mode"] == "raw"


def test_writer_is_idempotent_and_ignores_worker_count(cifar: dict[str, Any], tmp_path: Path) -> None:
    write_ffcv("cifar10", str(cifar["base"] / "root"), str(tmp_path), raw=True, workers=1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["summary.json", "test.beton", "train.beton"]  # no temporary files left
    for name in names:
        assert (tmp_path / name).read_bytes() == (cifar["base"] / "raw" / name).read_bytes(), name
    write_ffcv("cifar10", str(cifar["base"] / "root"), str(tmp_path), raw=True, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_truncated_beton_is_one_line_error(cifar: dict[str, Any], tmp_path: Path) -> None:
    for name in ("train.beton", "test.beton", "summary.json"):
        shutil.copy(cifar["base"] / "raw" / name, tmp_path / name)
    beton = tmp_path / "train.beton"
    whole = beton.read_bytes()
    for cut in (0, 20, 5000, len(whole) // 2, len(whole) - 1, len(whole) - 24):
        beton.write_bytes(whole[:cut])
        with pytest.raises(UserError) as info:
            check_beton(beton)
        assert_one_line_error(info.value, str(beton), "write-ffcv")
    with pytest.raises(UserError) as info:  # the loader checks before ffcv opens the file
        build_data(_cfg(ffcv_dir=str(tmp_path)), 0, 0, 1, CPU)
    assert_one_line_error(info.value, str(beton))


def test_missing_files_name_path_and_command(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        build_data(_cfg(root="/data/c10", ffcv_dir=str(tmp_path)), 0, 0, 1, CPU)
    assert_one_line_error(info.value, str(tmp_path / "summary.json"),
                          f"nt-dist data write-ffcv --dataset cifar10 --root /data/c10 --out {tmp_path}")
    write_splits("cifar10", {"train": IndexDataset(8)}, str(tmp_path), raw=True)
    with pytest.raises(UserError) as info:
        build_data(_cfg(ffcv_dir=str(tmp_path)), 0, 0, 1, CPU)
    assert_one_line_error(info.value, str(tmp_path / "test.beton"), "write-ffcv")
    with pytest.raises(UserError) as info:
        build_data(_cfg(name="cifar100", ffcv_dir=str(tmp_path)), 0, 0, 1, CPU)
    assert_one_line_error(info.value, "'cifar10'", "'cifar100'")


def test_augment_without_ffcv_pipeline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        build_data(_cfg(augment="rotate_flip", ffcv_dir=str(tmp_path)), 0, 0, 1, CPU)
    assert_one_line_error(info.value, "data.augment", "rotate_flip", "data.loader: torch")


def test_cli(cifar: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--dataset", "cifar10", "--root", str(cifar["base"] / "root"), "--out", str(tmp_path),
                 "--max-res", "16", "--jpeg-quality", "80", "--workers", "1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"] == {"write_mode": "jpg", "max_resolution": 16, "jpeg_quality": 80}
    assert check_beton(tmp_path / "train.beton") == 20
    assert main(["--dataset", "cifar10", "--root", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("nt-dist: error: data.root: ") and str(tmp_path / "none") in err
    with pytest.raises(SystemExit):
        main(["--dataset", "cifar10", "--out", str(tmp_path), "--raw", "--jpeg-quality", "80"])


# --- two processes over gloo ----------------------------------------------------------------

N_TRAIN, N_EVAL, BATCH = 64, 37, 8  # 64 = 4 x (2 ranks x batch 8); 37 is odd on purpose


def _rank_main(rank: int, world: int, folder: str) -> None:
    from ffcv.loader import Loader, OrderOption

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        cfg = _cfg(name="digits", image_size=8, batch_size=BATCH, eval_batch_size=BATCH,
                   augment="pad_crop_flip", ffcv_dir=folder)
        bundle = build_data(cfg, seed=3, rank=rank, world=world, device=CPU)
        result = {
            "steps": bundle.train.steps_per_epoch,
            "epochs": [[y.tolist() for _, y in bundle.train.epoch(e)] for e in (0, 1)],
            "resumed": [y.tolist() for _, y in bundle.train.epoch(1, start_step=2)],
            "eval": [y.tolist() for _, y in bundle.eval.batches()],
            "eval_len": len(bundle.eval),
            # What ffcv's own distributed evaluation would read on this rank.
            "ffcv_distributed_eval": Loader(f"{folder}/test.beton", batch_size=BATCH, distributed=True,
                                            order=OrderOption.SEQUENTIAL, drop_last=False,
                                            num_workers=1).next_traversal_order().tolist(),
        }
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_see_every_sample_exactly_once(tmp_path: Path) -> None:
    write_splits("digits", {"train": IndexDataset(N_TRAIN), "test": IndexDataset(N_EVAL, seed=1)},
                 str(tmp_path), raw=True)
    mp.spawn(_rank_main, args=(2, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["steps"] for r in ranks] == [N_TRAIN // (2 * BATCH)] * 2
    for epoch in (0, 1):
        seen = [label for r in ranks for batch in r["epochs"][epoch] for label in batch]
        assert all(len(batch) == BATCH for r in ranks for batch in r["epochs"][epoch])
        assert sorted(seen) == list(range(N_TRAIN)), f"epoch {epoch}"
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]
    assert all(r["resumed"] == r["epochs"][1][2:] for r in ranks)
    evaluated = [label for r in ranks for batch in r["eval"] for label in batch]
    assert sorted(evaluated) == list(range(N_EVAL)) and all(r["eval_len"] == N_EVAL for r in ranks)
    # Why we shard evaluation ourselves: ffcv's distributed order pads with a repeated sample.
    padded = ranks[0]["ffcv_distributed_eval"] + ranks[1]["ffcv_distributed_eval"]
    assert len(padded) == N_EVAL + 1 and sorted(set(padded)) == list(range(N_EVAL))
