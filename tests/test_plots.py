"""Figures: temperature-softmax numbers, the normal-vs-nasty logit figure, sweep plots."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from nt_dist import __version__
from nt_dist.checkpoint import export_model
from nt_dist.data import build_dataset
from nt_dist.data.transforms import Normalise, build_transform
from nt_dist.errors import UserError
from nt_dist.models import create_model
from nt_dist.plots import log_x, plot_logits, responses, softmax_responses, sweep_figure, sweep_plot


def export_teacher(folder: Path, seed: int, num_classes: int = 10, role: str = "teacher") -> torch.nn.Module:
    """A random-weight ``cifar_cnn`` exported as train.py's ``finish()`` does (no training)."""
    torch.manual_seed(seed)
    model = create_model("cifar_cnn", num_classes).eval()
    meta = {"architecture": "cifar_cnn", "num_classes": num_classes, "role": role, "dataset": "digits",
            "image_size": 16, "mlflow_run_id": "", "nt_dist_version": __version__, "test_top1": "nan"}
    export_model(model.state_dict(), folder / "model.safetensors", meta)
    return model


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module, torch.nn.Module]:
    root = tmp_path_factory.mktemp("teachers")
    normal_model = export_teacher(root / "normal", seed=1)
    nasty_model = export_teacher(root / "nasty", seed=2, role="nasty")
    return root / "normal", root / "nasty", normal_model, nasty_model


def test_softmax_responses_by_hand():
    probs = softmax_responses(torch.tensor([[2.0, 0.0, 0.0]]), tau=2.0)
    e = math.exp(1.0)
    torch.testing.assert_close(probs, torch.tensor([[e / (e + 2), 1 / (e + 2), 1 / (e + 2)]]))
    torch.testing.assert_close(softmax_responses(torch.tensor([1.0, 1.0]), 4.0), torch.tensor([0.5, 0.5]))
    logits = torch.tensor([3.0, 1.0, -2.0, 0.5])
    peaks = [float(softmax_responses(logits, tau).max()) for tau in (1.0, 2.0, 4.0, 20.0)]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < 0.3  # higher tau flattens
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match="--tau"):
            softmax_responses(logits, bad)


def test_plot_logits_end_to_end_on_digits(teachers, tmp_path):
    normal, nasty, normal_model, nasty_model = teachers
    out = plot_logits(normal, nasty, tmp_path / "figs" / "logits.png", tau=4.0, count=4, seed=0)
    assert out == tmp_path / "figs" / "logits.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 400
        image.verify()
    assert [p.name for p in out.parent.iterdir()] == ["logits.png"]  # no temporary left

    got = responses(normal, nasty, tau=4.0, count=4, seed=0)
    assert len(got["indices"]) == 4 and len(set(got["labels"].tolist())) == 4  # one per class
    assert got["class_names"] == [str(i) for i in range(10)] and got["split"] == "test"
    # the images are the evaluation transform + normalisation of those test samples
    dataset = build_dataset("digits", "", "test")
    transform = build_transform("digits", "none", 16, train=False)
    pixels = torch.stack([transform(dataset[i][0]) for i in got["indices"]])
    torch.testing.assert_close(got["images"], Normalise("digits", torch.device("cpu"))(pixels))
    assert got["labels"].tolist() == [dataset[i][1] for i in got["indices"]]
    # the probabilities are a direct forward pass's softmax(logits / tau)
    with torch.no_grad():
        for role, model in (("normal", normal_model), ("nasty", nasty_model)):
            expected = torch.softmax(model(got["images"]) / 4.0, dim=-1)
            torch.testing.assert_close(got[f"{role}_probs"], expected)
            torch.testing.assert_close(got[f"{role}_probs"].sum(dim=1), torch.ones(4))
    assert not torch.allclose(got["normal_probs"], got["nasty_probs"])

    again = responses(normal / "model.safetensors", nasty, tau=1.0, count=4, seed=0)  # a file works too
    assert again["indices"] == got["indices"]  # deterministic for a seed
    assert responses(normal, nasty, count=4, seed=1)["indices"] != got["indices"]
    more = responses(normal, nasty, count=12, seed=3)["labels"].tolist()
    assert len(more) == 12 and sorted(set(more)) == list(range(10))  # every class before any repeat


def test_plot_logits_refuses_mismatched_or_missing_teachers(teachers, tmp_path):
    normal, _, _, _ = teachers
    five = tmp_path / "five"
    export_teacher(five, seed=3, num_classes=5)
    with pytest.raises(UserError) as caught:
        plot_logits(normal, five, tmp_path / "x.png")
    message = str(caught.value)
    assert str(normal) in message and str(five) in message and "num_classes" in message and "\n" not in message
    missing = tmp_path / "no_such_run"
    with pytest.raises(UserError, match=str(missing)):
        plot_logits(normal, missing, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_sweep_plot_writes_png_with_log_axis(tmp_path):
    series = {"ω=0.04": [(0.1, 80.0, 1.0), (0.001, 90.0, 0.5), (0.01, 85.0, float("nan"))],
              "normal": [(0.001, 91.0, 0.2), (0.1, 91.5, 0.3)]}
    out = sweep_plot(tmp_path / "sweep.png", title="student vs ω", xlabel="ω", ylabel="top-1 (%)", series=series)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]
    assert log_x([0.001, 0.01, 0.1]) and not log_x([1, 2, 4, 8]) and not log_x([0, 1, 100])
    fig = sweep_figure(title="t", xlabel="x", ylabel="y", series=series)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert list(ax.lines[0].get_xdata()) == [0.001, 0.01, 0.1]  # sorted by x
    linear = sweep_figure(title="t", xlabel="x", ylabel="y", series={"a": [(1.0, 1.0, 0.0), (4.0, 2.0, 0.1)]})
    assert linear.axes[0].get_xscale() == "linear"
