"""Tests for nt_dist.models: the paper's networks by name, timm pass-through, unknown names.

Expected parameter counts were verified against the authors' released code
(VITA-Group/Nasty-Teacher ``model/*.py``): the reference modules built with the same arguments
have identical ``state_dict`` keys and shapes, and give identical 32 px outputs with shared weights.
"""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from torch import nn

from nt_dist.models import UnknownModelError, create_model, list_models

OURS = [
    "cifar_cnn",
    "cifar_resnet8",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet18",
    "cifar_resnet34",
    "cifar_resnet50",
    "cifar_resnext29",
    "cifar_mobilenetv2",
    "cifar_shufflenetv2",
    "mlp",
]

#: name -> (params with 10 classes, params with 200 classes), from the authors' implementations.
PARAMS = {
    "cifar_cnn": (357_514, 382_024),
    "cifar_resnet8": (77_850, 90_200),
    "cifar_resnet20": (272_282, 284_632),
    "cifar_resnet32": (466_714, 479_064),
    "cifar_resnet18": (11_173_962, 11_271_432),
    "cifar_resnet34": (21_282_122, 21_379_592),
    "cifar_resnet50": (23_520_842, 23_910_152),
    "cifar_resnext29": (34_426_698, 34_621_448),
    "cifar_mobilenetv2": (2_254_090, 2_497_480),
    "cifar_shufflenetv2": (1_268_646, 1_463_396),
    "mlp": (25_994, 50_504),
}


@functools.cache
def built(name: str, num_classes: int) -> nn.Module:
    """One seeded eval-mode instance per (name, classes), shared by the tests of this file."""
    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_names_ours() -> None:
    assert list_models() == OURS


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize(("size", "num_classes"), [(16, 10), (32, 10), (64, 200)])
def test_forward_shape_any_resolution(name: str, size: int, num_classes: int) -> None:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y = built(name, num_classes)(x)
    assert y.shape == (2, num_classes)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", OURS)
def test_parameter_counts_match_authors(name: str) -> None:
    assert (n_params(built(name, 10)), n_params(built(name, 200))) == PARAMS[name]


def preresnet_params(depth: int, num_classes: int) -> int:
    """Hand count of the authors' PreResNet: stem conv, 3 stages of n pre-act basic blocks, BN, fc.

    Block(i -> o): BN(i) + conv3x3(i, o) + BN(o) + conv3x3(o, o), plus a conv1x1(i, o) shortcut
    if i != o; a BN(c) holds 2c parameters, a bias-free conv k x k holds k*k*i*o.
    """
    n = (depth - 2) // 6

    def block(i: int, o: int) -> int:
        return 2 * i + 9 * i * o + 2 * o + 9 * o * o + (i * o if i != o else 0)

    stages = sum(block(i, o) + (n - 1) * block(o, o) for i, o in ((16, 16), (16, 32), (32, 64)))
    return 9 * 3 * 16 + stages + 2 * 64 + (64 + 1) * num_classes


def test_hand_counts() -> None:
    assert n_params(built("cifar_resnet18", 10)) == 11_173_962  # kuangliu ResNet18, CIFAR-10
    assert n_params(built("cifar_resnet20", 10)) == preresnet_params(20, 10) == 272_282  # ~0.27 M
    assert n_params(built("cifar_resnet32", 10)) == preresnet_params(32, 10)
    assert n_params(built("cifar_resnet8", 10)) == preresnet_params(8, 10) == 77_850
    assert n_params(create_model("mlp", 10, hidden=32)) == (3 * 64 + 1) * 32 + (32 + 1) * 10


@pytest.mark.parametrize("name", OURS)
def test_timm_finds_ours(name: str) -> None:
    assert timm.is_model(name)
    model = timm.create_model(name, num_classes=7, pretrained_cfg_overlay={"num_classes": 7})
    assert type(model) is type(built(name, 10))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_ours_refuse_pretrained() -> None:
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("cifar_resnet20", pretrained=True)


def test_timm_name_passes_through() -> None:
    model = create_model("resnet18", num_classes=10, drop_rate=0.1)
    assert isinstance(model, timm.models.ResNet)
    assert model.get_classifier().out_features == 10
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="pretrained"):
        create_model("resnet18", num_classes=10, pretrained=True)


def test_unknown_name_lists_close_matches_on_one_line() -> None:
    with pytest.raises(UnknownModelError) as info:
        create_model("cifar_resnt18", num_classes=10)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    assert message.startswith("unknown model 'cifar_resnt18'; close matches: cifar_resnet18, ")
    with pytest.raises(UnknownModelError, match=r"close matches: \(none\)$") as info:
        create_model("zz\nqq", num_classes=10)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", OURS)
def test_channels_last_matches_contiguous(name: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    model = built(name, 10)
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        try:
            actual = model(x.contiguous(memory_format=torch.channels_last))
        finally:
            model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_torch_compile_channels_last() -> None:
    """Inductor on CPU compiles a small net (~20 s cold, a few seconds with a warm cache)."""
    model = create_model("cifar_cnn", num_classes=10).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
