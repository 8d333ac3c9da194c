"""CIFAR ResNets of the CRD/RepDistiller benchmark (He et al. 2016, CIFAR variants).

Registered names: ``resnet8``, ``resnet14``, ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``,
``resnet110`` (basic blocks, widths 16 | 16, 32, 64), ``resnet8x4``, ``resnet32x4`` (basic blocks,
widths 32 | 64, 128, 256) and ``ResNet50`` (bottleneck blocks 3-4-6-3, widths 64 | 64, 128, 256, 512,
×4 expansion, a 3×3 stride-1 stem and no max-pool).

A basic-block ResNet of depth d has (d - 2) / 6 blocks in each of its three stages; the first
stage keeps the stem's resolution and the other two halve it (32 → 32, 16, 8 on CIFAR).
Parameter names follow the benchmark (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample``,
``fc``; ``shortcut`` and ``linear`` in ResNet50), so its checkpoints load.

Tap names (``model.tap_names``):

* ``stem``: the stem's conv-BN-ReLU output.
* ``stage1``..``stage3`` (``stage1``..``stage4`` for ResNet50): each stage's output, after the
  last block's final ReLU (module ``layerK.<last>.relu_out``).
* ``stage1_pre``..``stage3_pre`` (``..stage4_pre``): the same value before that ReLU, i.e. the
  residual sum (module ``layerK.<last>.preact``, an ``nn.Identity``); ``relu(stageK_pre) == stageK``.
* ``embedding`` (generic): the input of ``fc`` / ``linear``, the globally pooled last stage.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdflow.models.registry import register_model


def init_weights(model: nn.Module) -> None:
    """He-normal (fan-out) convolutions, unit-scale zero-shift batch norms; linears keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _stage_taps(stages: list[nn.Sequential], prefix: str = "layer") -> dict[str, str]:
    taps: dict[str, str] = {}
    for k, stage in enumerate(stages, start=1):
        last = f"{prefix}{k}.{len(stage) - 1}"
        taps[f"stage{k}"] = f"{last}.relu_out"
        taps[f"stage{k}_pre"] = f"{last}.preact"
    return taps


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or 1×1 conv-BN) shortcut; ReLU after the sum.

    The sum passes through ``preact`` (an ``nn.Identity``, so it can be tapped) and then
    ``relu_out``, which is not in-place in the last block of a stage (``is_last``) so the
    captured pre-activation survives.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, is_last: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.preact = nn.Identity()
        self.relu_out = nn.ReLU(inplace=not is_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + residual
        return self.relu_out(self.preact(out))


def make_stage(block: type[nn.Module], inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` residual blocks, the first with `stride` and, when the shape changes, a 1×1 conv-BN
    shortcut (`downsample`); the last block's output ReLU is not in-place (`is_last`, for taps)."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample, is_last=blocks == 1)]
    for i in range(1, blocks):
        layers.append(block(planes * block.expansion, planes, is_last=i == blocks - 1))
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """The benchmark's CIFAR ResNet: 3×3 conv stem, three stages of `n` basic blocks, global pool, ``fc``."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a basic-block CIFAR ResNet has depth 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[1], n, stride=1)
        self.layer2 = self._make_layer(widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)
        self.tap_names = {"stem": "relu", **_stage_taps([self.layer1, self.layer2, self.layer3])}
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        stage = make_stage(BasicBlock, self.inplanes, planes, blocks, stride)
        self.inplanes = planes * BasicBlock.expansion
        return stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand ×4, each with BN; projection shortcut when the shape changes."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, is_last: bool = False) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))
        self.preact = nn.Identity()
        self.relu_out = nn.ReLU(inplace=not is_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + self.shortcut(x)
        return self.relu_out(self.preact(out))


class ResNetBottleneck(nn.Module):
    """The benchmark's ResNet50 for CIFAR: 3×3 stride-1 stem (no max-pool), four bottleneck stages, ``linear``."""

    def __init__(self, num_blocks: tuple[int, ...], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        for k, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks), start=1):
            stage = self._make_layer(planes, n, stride=1 if k == 1 else 2)
            self.add_module(f"layer{k}", stage)
            stages.append(stage)
        self.n_stages = len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)
        self.tap_names = {"stem": "relu", **_stage_taps(stages)}
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i, s in enumerate([stride] + [1] * (blocks - 1)):
            layers.append(Bottleneck(self.in_planes, planes, s, is_last=i == blocks - 1))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for k in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{k}")(x)
        return self.linear(torch.flatten(self.avgpool(x), 1))


def _check_image(input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"CIFAR models take C×H×W inputs, got shape {input_shape}")
    return input_shape[0]


def _register_resnet(name: str, depth: int, widths: tuple[int, int, int, int]) -> None:
    def build(num_classes: int, input_shape: tuple[int, ...] = (3, 32, 32)) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes, _check_image(input_shape))

    build.__name__ = name
    build.__doc__ = f"CIFAR ResNet-{depth}, stem {widths[0]}, stages {widths[1]}, {widths[2]}, {widths[3]}."
    register_model(name)(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register_resnet(f"resnet{_depth}", _depth, (16, 16, 32, 64))
_register_resnet("resnet8x4", 8, (32, 64, 128, 256))
_register_resnet("resnet32x4", 32, (32, 64, 128, 256))


@register_model("ResNet50")
def resnet50(num_classes: int, input_shape: tuple[int, ...] = (3, 32, 32)) -> ResNetBottleneck:
    """CIFAR ResNet-50 (bottleneck blocks 3-4-6-3, 3×3 stride-1 stem, no max-pool)."""
    return ResNetBottleneck((3, 4, 6, 3), num_classes, _check_image(input_shape))
