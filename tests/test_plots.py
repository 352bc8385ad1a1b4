"""Figures: temperature-softmax numbers, the normal-vs-nasty logit figure, sweep plots."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from nt_dist import __version__
from nt_dist.checkpoint import export_model
from nt_dist.data import build_dataset
from nt_dist.data.transforms import Normalise, build_transform
from nt_dist.errors import UserError
from nt_dist.models import create_model
from nt_dist.plots import (
    log_x,
    logits_figure,
    misclassified,
    nasty_tau,
    plot_logits,
    responses,
    softmax_responses,
    sweep_figure,
    sweep_plot,
)


def export_teacher(folder: Path, seed: int, num_classes: int = 10, role: str = "teacher",
                   **recorded: str) -> torch.nn.Module:
    """A random-weight ``cifar_cnn`` exported as train.py's ``finish()`` does (no training);
    ``recorded``: further metadata (``tau_a="8"``)."""
    torch.manual_seed(seed)
    model = create_model("cifar_cnn", num_classes).eval()
    meta = {"architecture": "cifar_cnn", "num_classes": num_classes, "role": role, "dataset": "digits",
            "image_size": 16, "mlflow_run_id": "", "nt_dist_version": __version__, "test_top1": "nan", **recorded}
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


def test_tau_defaults_to_the_nasty_teachers_recorded_tau_a(teachers, tmp_path):
    normal, _, _, _ = teachers
    nasty = tmp_path / "nasty8"
    export_teacher(nasty, seed=2, role="nasty", tau_a="8")
    out = plot_logits(normal, nasty, tmp_path / "tau8.png", count=2)
    with Image.open(out) as image:
        recorded = dict(image.text)
    assert recorded["Tau"] == "8" and recorded["TauSource"] == "the nasty teacher's τ_A, from its metadata"
    assert recorded["Title"] == "digits test: normal vs nasty teacher, τ=8 (the nasty teacher's τ_A, from its metadata)"
    assert responses(normal, nasty, count=1)["tau"] == 8.0
    # an explicit τ wins
    assert nasty_tau(nasty, 2.0) == (2.0, "--tau")
    with Image.open(plot_logits(normal, nasty, tmp_path / "tau2.png", tau=2.0, count=1)) as image:
        assert image.text["Tau"] == "2" and "τ=2 (--tau)" in image.text["Title"]


def test_tau_from_the_run_folders_recipe_or_the_stated_default(teachers, tmp_path):
    normal, nasty, _, _ = teachers
    assert nasty_tau(nasty) == (4.0, "default: the nasty teacher records no τ_A; --tau sets it")
    with Image.open(plot_logits(normal, nasty, tmp_path / "default.png", count=1)) as image:
        assert image.text["Tau"] == "4" and "τ=4 (default: the nasty teacher records no τ_A" in image.text["Title"]
    run = tmp_path / "run"  # a run folder whose export predates tau_a: its resolved recipe says
    export_teacher(run, seed=2, role="nasty")
    recipe = {"run": {"role": "nasty"}, "nasty": {"tau": 16.0, "omega": 0.04}, "data": {"name": "digits"}}
    (run / "resolved_recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert nasty_tau(run) == (16.0, "the nasty teacher's τ_A, nasty.tau of its resolved_recipe.yaml")
    assert nasty_tau(run / "model.safetensors")[0] == 16.0
    recipe["run"]["role"] = "teacher"  # a normal teacher's recipe holds nasty.tau too: not its τ
    (run / "resolved_recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert nasty_tau(run)[0] == 4.0
    corrupt = tmp_path / "corrupt"
    export_teacher(corrupt, seed=2, role="nasty", tau_a="hot")
    with pytest.raises(UserError) as caught:
        plot_logits(normal, corrupt, tmp_path / "x.png")
    assert str(caught.value) == (f"nasty: {corrupt / 'model.safetensors'}: corrupt metadata: tau_a is 'hot', "
                                 "not a positive number")
    with pytest.raises(UserError, match="^--tau: must be a positive number, got 0.0$"):
        plot_logits(normal, nasty, tmp_path / "x.png", tau=0.0)
    assert not (tmp_path / "x.png").exists()


def test_misclassified_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [0.0, 4.0, 1.0]])
    assert misclassified(torch.tensor([0, 1, 1]), logits) == [1]
    assert misclassified(torch.tensor([1, 0, 0]), logits) == [0, 1, 2]
    assert misclassified(torch.tensor([0, 2, 1]), logits) == []


def test_wrong_top1s_are_marked_and_counted(teachers, tmp_path):
    normal, nasty, normal_model, nasty_model = teachers
    data = responses(normal, nasty, count=10, seed=0)  # one image per class: a random net is right on few
    with torch.no_grad():
        wrong = {role: int((model(data["images"]).argmax(1) != data["labels"]).sum())
                 for role, model in (("normal", normal_model), ("nasty", nasty_model))}
    assert {role: len(data[f"{role}_wrong"]) for role in wrong} == wrong
    assert 0 < wrong["normal"] + wrong["nasty"] < 20  # some marks, not all: the test can tell them apart
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph (the ✗) would warn while drawing
        figure = logits_figure(data)
        figure.canvas.draw()
    marks = [ax for ax in figure.axes if ax.get_xlabel().startswith("✗ top-1: ")]
    assert len(marks) == wrong["normal"] + wrong["nasty"]
    edged = [bar for ax in figure.axes for bar in ax.patches if bar.get_linewidth() == 2.0]
    assert len(edged) == len(marks)
    for role, column in (("normal", 1), ("nasty", 2)):
        for row in data[f"{role}_wrong"]:
            predicted = int(data[f"{role}_logits"][row].argmax())
            ax = figure.axes[3 * row + column]
            assert ax.get_xlabel() == f"✗ top-1: {predicted}"
            assert ax.patches[predicted].get_linewidth() == 2.0 and predicted != int(data["labels"][row])
    out = plot_logits(normal, nasty, tmp_path / "wrong.png", count=10, seed=0)
    with Image.open(out) as image:
        assert image.text["MisclassifiedNormal"] == str(wrong["normal"])
        assert image.text["MisclassifiedNasty"] == str(wrong["nasty"])
        assert image.text["Description"] == (f"normal: top-1 wrong on {wrong['normal']} of 10, "
                                             f"nasty: top-1 wrong on {wrong['nasty']} of 10")


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
