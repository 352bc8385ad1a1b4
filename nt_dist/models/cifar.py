"""The paper's CIFAR-style networks, rebuilt from the authors' released code.

Every class here reproduces the layer structure *and the module names* of the file it cites in
VITA-Group/Nasty-Teacher (``model/*.py``, commit 1438540), so a ``state_dict`` saved by the
authors' scripts loads into these modules unchanged. Two deliberate differences, neither of which
changes a parameter:

* every fixed-size pooling before the classifier is adaptive (``AdaptiveAvgPool2d``), so each
  network accepts any input resolution (16 px digits, 32 px CIFAR, 64 px Tiny-ImageNet);
* reshapes use ``flatten``/``reshape`` instead of ``view`` so ``channels_last`` inputs work.

Each network is registered in timm's model registry under its ``cifar_*`` name (plus ``mlp``), so
``timm.create_model("cifar_resnet18", num_classes=10)`` works as well as
:func:`nt_dist.models.create_model`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

__all__ = [
    "CifarCNN",
    "PreResNet",
    "CifarResNet",
    "CifarResNeXt",
    "MobileNetV2",
    "ShuffleNetV2",
    "DigitsMLP",
    "ENTRYPOINTS",
]

#: Our model name -> entrypoint ``(num_classes=..., **kwargs) -> nn.Module``.
ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}

#: Keyword arguments ``timm.create_model`` passes to every entrypoint; ours have no use for them.
_TIMM_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entrypoint(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name, here and in timm, dropping timm's factory kwargs.

    ``pretrained=True`` is refused: there are no released weights to download.
    """

    @functools.wraps(fn)
    def entry(num_classes: int = 10, **kwargs: Any) -> nn.Module:
        if kwargs.pop("pretrained", False):
            raise ValueError(f"model {fn.__name__!r} has no pretrained weights")
        for key in _TIMM_FACTORY_KWARGS:
            kwargs.pop(key, None)
        return fn(num_classes=num_classes, **kwargs)

    ENTRYPOINTS[fn.__name__] = entry
    return register_model(entry)


# --------------------------------------------------------------------------------------------
# cifar_cnn -- model/net.py (``Net``), itself from peterliht/knowledge-distillation-pytorch.
# --------------------------------------------------------------------------------------------
class CifarCNN(nn.Module):
    """The authors' plain CNN (``model/net.py: Net``, config ``experiments/*/cnn/params.json``).

    Three stages ``conv3x3(bias) -> BN -> max-pool 2x2 -> ReLU`` with ``c, 2c, 4c`` channels
    (``num_channels`` c = 32 in the released config, so 32/64/128), then
    ``fc1: 4*4*4c -> 4c`` (2048 -> 128, *not* 500) ``-> BN1d -> ReLU -> dropout`` and
    ``fc2: 4c -> classes``.
    The authors flatten a fixed 4x4 map (32 px input); an ``AdaptiveAvgPool2d(4)`` before ``fc1``
    keeps that count at 32 px (where it is the identity) and accepts any other size.

    Parameters (c = 32): 896 + 18,496 + 73,856 convs, 3 x BN, 262,272 fc1, 256 fcbn1,
    (4c + 1) * classes fc2 -> 357,514 for 10 classes.
    """

    def __init__(
        self, num_classes: int = 10, num_channels: int = 32, dropout_rate: float = 0.0
    ) -> None:
        super().__init__()
        c = num_channels
        self.conv1 = nn.Conv2d(3, c, 3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.conv3 = nn.Conv2d(2 * c, 4 * c, 3, stride=1, padding=1)
        self.bn3 = nn.BatchNorm2d(4 * c)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(4 * 4 * 4 * c, 4 * c)
        self.fcbn1 = nn.BatchNorm1d(4 * c)
        self.dropout = nn.Dropout(dropout_rate)
        self.fc2 = nn.Linear(4 * c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(F.max_pool2d(bn(conv(x)), 2))
        x = self.pool(x).flatten(1)
        x = self.dropout(F.relu(self.fcbn1(self.fc1(x))))
        return self.fc2(x)


# --------------------------------------------------------------------------------------------
# cifar_resnet20/32 -- model/preresnet.py (``PreResNet``), Wei Yang's port of fb.resnet.torch.
# --------------------------------------------------------------------------------------------
class PreActBasicBlock(nn.Module):
    """``BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3`` plus identity or a 1x1-conv shortcut
    (no BN on the shortcut, as in the authors' ``preresnet.py``)."""

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


class PreResNet(nn.Module):
    """Pre-activation ResNet for CIFAR (ResNetC): depth ``6n + 2`` = stem conv + 3 stages of ``n``
    basic blocks (2 convs each) with 16/32/64 channels + fc; ends ``BN -> ReLU -> avg-pool -> fc``.

    Source: ``model/preresnet.py: PreResNet`` (depth 20 / 32, ``experiments/CIFAR10/*/preresnet*``).
    Only the basic-block depths (< 44) are built; the authors switch to bottlenecks from 44 on.
    Conv init as the authors': ``N(0, sqrt(2 / (k*k*out_channels)))`` (Kaiming, fan-out).
    """

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or not 8 <= depth < 44:
            raise ValueError(f"PreResNet depth must be 6n+2 with 8 <= depth < 44, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.bn = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False)
            )
        layers = [PreActBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [PreActBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.avgpool(self.relu(self.bn(x))).flatten(1)
        return self.fc(x)


# --------------------------------------------------------------------------------------------
# cifar_resnet18/34/50 -- model/resnet.py, = kuangliu/pytorch-cifar models/resnet.py.
# --------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """Post-activation basic block; 1x1-conv + BN shortcut when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """Post-activation bottleneck ``1x1 -> 3x3(stride) -> 1x1 (x4)``; shortcut as above."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Empty ``Sequential`` (identity) or ``conv1x1(stride) -> BN`` when the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class CifarResNet(nn.Module):
    """ResNet for 32 px inputs: 3x3 stride-1 stem (64 ch), no max-pool, 4 stages of 64/128/256/512
    ``x expansion`` channels (strides 1, 2, 2, 2), global avg-pool, ``linear``.

    Source: ``model/resnet.py`` (``ResNet18/34/50``), identical to kuangliu/pytorch-cifar; the
    authors already use ``adaptive_avg_pool2d(1)`` for Tiny-ImageNet. ResNet-18 with 10 classes has
    11,173,962 parameters.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, n: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --------------------------------------------------------------------------------------------
# cifar_resnext29 -- model/resnext.py, = prlz77/ResNeXt.pytorch models/model.py.
# --------------------------------------------------------------------------------------------
class ResNeXtBottleneck(nn.Module):
    """ResNeXt block type C: ``1x1 -> grouped 3x3 (cardinality groups, stride) -> 1x1``, each
    with BN, inner width ``D = cardinality * out_channels // widen_factor``; 1x1-conv + BN
    shortcut when ``in_channels != out_channels``."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, cardinality: int, widen_factor: int
    ) -> None:
        super().__init__()
        d = cardinality * out_channels // widen_factor
        self.conv_reduce = nn.Conv2d(in_channels, d, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(d)
        self.conv_conv = nn.Conv2d(
            d, d, 3, stride=stride, padding=1, groups=cardinality, bias=False
        )
        self.bn = nn.BatchNorm2d(d)
        self.conv_expand = nn.Conv2d(d, out_channels, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if in_channels != out_channels:
            self.shortcut.add_module(
                "shortcut_conv", nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            )
            self.shortcut.add_module("shortcut_bn", nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_reduce(self.conv_reduce(x)))
        out = F.relu(self.bn(self.conv_conv(out)))
        out = self.bn_expand(self.conv_expand(out))
        return F.relu(self.shortcut(x) + out)


class CifarResNeXt(nn.Module):
    """ResNeXt-29 for CIFAR: 3x3 stem (64 ch), 3 stages of ``(depth - 2) // 9`` = 3 blocks with
    ``64 * widen_factor * (1, 2, 4)`` output channels (256/512/1024), avg-pool, ``classifier``.

    Source: ``model/resnext.py: CifarResNeXt``, called by the authors as
    ``CifarResNeXt(cardinality=8, depth=29, num_classes=...)`` (``widen_factor=4``). The grouped
    conv of the first stage is 512 wide = 8 groups x 64, i.e. the paper-standard
    **ResNeXt-29 (8x64d)** (~34.4 M parameters), not a 2x64d / 4x16d variant. Init as the
    authors': Kaiming-normal (fan-out) convs, Kaiming-normal classifier weight, zero biases.
    """

    def __init__(
        self, cardinality: int = 8, depth: int = 29, num_classes: int = 10, widen_factor: int = 4
    ) -> None:
        super().__init__()
        self.block_depth = (depth - 2) // 9
        self.cardinality = cardinality
        self.widen_factor = widen_factor
        stages = [64, 64 * widen_factor, 128 * widen_factor, 256 * widen_factor]
        self.conv_1_3x3 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        self.stage_1 = self._block("stage_1", stages[0], stages[1], 1)
        self.stage_2 = self._block("stage_2", stages[1], stages[2], 2)
        self.stage_3 = self._block("stage_3", stages[2], stages[3], 2)
        self.classifier = nn.Linear(stages[3], num_classes)
        nn.init.kaiming_normal_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def _block(self, name: str, in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
        block = nn.Sequential()
        for i in range(self.block_depth):
            block.add_module(
                f"{name}_bottleneck_{i}",
                ResNeXtBottleneck(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    stride if i == 0 else 1,
                    self.cardinality,
                    self.widen_factor,
                ),
            )
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_1(self.conv_1_3x3(x)))
        x = self.stage_3(self.stage_2(self.stage_1(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


# --------------------------------------------------------------------------------------------
# cifar_mobilenetv2 -- model/mobilenetv2.py, = weiaicunzai/pytorch-cifar100 models/mobilenetv2.py.
# --------------------------------------------------------------------------------------------
class LinearBottleNeck(nn.Module):
    """Inverted residual ``1x1 (x t) -> BN -> ReLU6 -> dw3x3 (stride) -> BN -> ReLU6 -> 1x1 -> BN``
    (all convs with bias, as in the source), identity added when stride 1 and shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, t: int = 6) -> None:
        super().__init__()
        hidden = in_channels * t
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
            nn.BatchNorm2d(out_channels),
        )
        self.use_identity = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        return out + x if self.use_identity else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) for CIFAR: stages ``(t, c, n, s)`` = (1,16,1,1) (6,24,2,2) (6,32,3,2)
    (6,64,4,2) (6,96,3,1) (6,160,3,1) (6,320,1,1), ``conv1`` 320 -> 1280, global pool, 1x1-conv
    classifier ``conv2``.

    Source: ``model/mobilenetv2.py: MobileNetV2``. Kept quirk of that file: the stem is a **1x1**
    conv with ``padding=1`` (so a 32 px input becomes 34 px; no parameter effect).
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__()
        self.pre = nn.Sequential(
            nn.Conv2d(3, 32, 1, padding=1), nn.BatchNorm2d(32), nn.ReLU6(inplace=True)
        )
        self.stage1 = LinearBottleNeck(32, 16, 1, 1)
        self.stage2 = self._make_stage(2, 16, 24, 2, 6)
        self.stage3 = self._make_stage(3, 24, 32, 2, 6)
        self.stage4 = self._make_stage(4, 32, 64, 2, 6)
        self.stage5 = self._make_stage(3, 64, 96, 1, 6)
        self.stage6 = self._make_stage(3, 96, 160, 1, 6)
        self.stage7 = LinearBottleNeck(160, 320, 1, 6)
        self.conv1 = nn.Sequential(
            nn.Conv2d(320, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True)
        )
        self.conv2 = nn.Conv2d(1280, num_classes, 1)

    @staticmethod
    def _make_stage(
        repeat: int, in_channels: int, out_channels: int, stride: int, t: int
    ) -> nn.Sequential:
        layers = [LinearBottleNeck(in_channels, out_channels, stride, t)]
        layers += [LinearBottleNeck(out_channels, out_channels, 1, t) for _ in range(repeat - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.pre(x)))))
        x = self.conv1(self.stage7(self.stage6(self.stage5(x))))
        return self.conv2(F.adaptive_avg_pool2d(x, 1)).flatten(1)


# --------------------------------------------------------------------------------------------
# cifar_shufflenetv2 -- model/shufflenetv2.py, = weiaicunzai/pytorch-cifar100 shufflenetv2.py.
# --------------------------------------------------------------------------------------------
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(N, g*c, H, W) -> (N, c*g, H, W)``: interleave the channels of ``groups`` groups."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _pointwise(channels: int) -> list[nn.Module]:
    """``1x1 -> BN -> ReLU`` at constant width (the head of a ShuffleNetV2 residual branch)."""
    return [nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


def _depthwise_project(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    """``dw3x3 -> BN -> 1x1 -> BN -> ReLU``: the tail both ShuffleNetV2 branches share. Returned
    as a list so each branch stays one flat ``nn.Sequential`` (the authors' parameter names)."""
    return [
        nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels),
        nn.BatchNorm2d(in_channels),
        nn.Conv2d(in_channels, out_channels, 1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit. Stride 1 with equal widths: split channels in half, transform one half
    (``1x1 -> BN -> ReLU -> dw3x3 -> BN -> 1x1 -> BN -> ReLU``), concat, shuffle. Otherwise both
    branches see the full input (shortcut ``dw3x3 -> BN -> 1x1 -> BN -> ReLU``), each giving half
    the output channels. All convs carry a bias, as in the source."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.split = stride == 1 and in_channels == out_channels
        half = out_channels // 2
        if not self.split:
            self.residual = nn.Sequential(*_pointwise(in_channels), *_depthwise_project(in_channels, half, stride))
            self.shortcut = nn.Sequential(*_depthwise_project(in_channels, half, stride))
        else:
            c = in_channels // 2
            self.shortcut = nn.Sequential()
            self.residual = nn.Sequential(*_pointwise(c), *_depthwise_project(c, c, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split:
            shortcut, residual = x.chunk(2, dim=1)
        else:
            shortcut = residual = x
        return channel_shuffle(
            torch.cat([self.shortcut(shortcut), self.residual(residual)], dim=1), 2
        )


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 for CIFAR: stem ``conv3x3(24, bias) -> BN`` (stride 1, no pooling, no ReLU),
    stages of 1 + (3, 7, 3) units with ``ratio`` widths (1.0: 116/232/464), ``conv5`` 1x1 -> 1024,
    avg-pool, ``fc``.

    Source: ``model/shufflenetv2.py: shufflenetv2(class_num=...)`` (ratio 1 by default there).
    """

    _WIDTHS = {
        0.5: (48, 96, 192, 1024),
        1.0: (116, 232, 464, 1024),
        1.5: (176, 352, 704, 1024),
        2.0: (244, 488, 976, 2048),
    }

    def __init__(self, num_classes: int = 100, ratio: float = 1.0) -> None:
        super().__init__()
        if ratio not in self._WIDTHS:
            raise ValueError(
                f"ShuffleNetV2 ratio must be one of {sorted(self._WIDTHS)}, got {ratio}"
            )
        widths = self._WIDTHS[ratio]
        self.pre = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24))
        self.stage2 = self._make_stage(24, widths[0], 3)
        self.stage3 = self._make_stage(widths[0], widths[1], 7)
        self.stage4 = self._make_stage(widths[1], widths[2], 3)
        self.conv5 = nn.Sequential(
            nn.Conv2d(widths[2], widths[3], 1), nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(widths[3], num_classes)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, repeat: int) -> nn.Sequential:
        units = [ShuffleUnit(in_channels, out_channels, 2)]
        units += [ShuffleUnit(out_channels, out_channels, 1) for _ in range(repeat)]
        return nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stage4(self.stage3(self.stage2(self.pre(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# --------------------------------------------------------------------------------------------
# mlp -- tiny student for the embedded 8x8 digits demo (not from the authors' code).
# --------------------------------------------------------------------------------------------
class DigitsMLP(nn.Sequential):
    """``AdaptiveAvgPool2d(8) -> Flatten -> Linear(192, hidden) -> ReLU -> Linear(hidden, C)``.

    Any input resolution is pooled to 8x8 first. Parameters:
    ``193 * hidden + (hidden + 1) * C`` (25,994 for hidden 128, C = 10 classes). Not the authors'
    ``model/mlp.py`` (a fixed 3072-512-512-C MLP).
    """

    def __init__(self, num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(8),
            nn.Flatten(),
            nn.Linear(3 * 8 * 8, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )


# --------------------------------------------------------------------------------------------
# Registered entrypoints (names are the registry keys).
# --------------------------------------------------------------------------------------------
@_entrypoint
def cifar_cnn(num_classes: int = 10, **kwargs: Any) -> CifarCNN:
    """Authors' ``Net`` with ``num_channels=32, dropout_rate=0.0`` (``experiments/*/cnn``)."""
    return CifarCNN(num_classes=num_classes, **kwargs)


@_entrypoint
def cifar_resnet8(num_classes: int = 10, **kwargs: Any) -> PreResNet:
    """``PreResNet(depth=8)``: n = 1 block per stage, the family's smallest (not in the authors'
    configs; the digits audit's convolutional student)."""
    return PreResNet(8, num_classes=num_classes, **kwargs)


@_entrypoint
def cifar_resnet20(num_classes: int = 10, **kwargs: Any) -> PreResNet:
    """Authors' ``PreResNet(depth=20)``: n = 3 blocks per stage."""
    return PreResNet(20, num_classes=num_classes, **kwargs)


@_entrypoint
def cifar_resnet32(num_classes: int = 10, **kwargs: Any) -> PreResNet:
    """Authors' ``PreResNet(depth=32)``: n = 5 blocks per stage."""
    return PreResNet(32, num_classes=num_classes, **kwargs)


@_entrypoint
def cifar_resnet18(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """Authors' / kuangliu ``ResNet18``: basic blocks (2, 2, 2, 2)."""
    return CifarResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, **kwargs)


@_entrypoint
def cifar_resnet34(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """Authors' / kuangliu ``ResNet34``: basic blocks (3, 4, 6, 3)."""
    return CifarResNet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, **kwargs)


@_entrypoint
def cifar_resnet50(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """Authors' / kuangliu ``ResNet50``: bottlenecks (3, 4, 6, 3)."""
    return CifarResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, **kwargs)


@_entrypoint
def cifar_resnext29(num_classes: int = 10, **kwargs: Any) -> CifarResNeXt:
    """Authors' ``CifarResNeXt(cardinality=8, depth=29, widen_factor=4)`` = ResNeXt-29 (8x64d)."""
    return CifarResNeXt(cardinality=8, depth=29, num_classes=num_classes, **kwargs)


@_entrypoint
def cifar_mobilenetv2(num_classes: int = 10, **kwargs: Any) -> MobileNetV2:
    """Authors' ``MobileNetV2(class_num=...)`` (width 1.0)."""
    return MobileNetV2(num_classes=num_classes, **kwargs)


@_entrypoint
def cifar_shufflenetv2(num_classes: int = 10, **kwargs: Any) -> ShuffleNetV2:
    """Authors' ``shufflenetv2(class_num=...)`` (ratio 1.0)."""
    return ShuffleNetV2(num_classes=num_classes, **kwargs)


@_entrypoint
def mlp(num_classes: int = 10, **kwargs: Any) -> DigitsMLP:
    """Tiny digits-demo student; ``hidden`` (default 128) sets the hidden width."""
    return DigitsMLP(num_classes=num_classes, **kwargs)
