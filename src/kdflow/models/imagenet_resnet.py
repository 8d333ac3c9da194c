"""ImageNet ResNets (He et al. 2016) at 224×224: ResNet-18, -34 (basic blocks) and -50 (bottleneck).

Registered names: ``resnet18_imagenet`` (basic blocks 2-2-2-2), ``resnet34_imagenet`` (3-4-6-3) and
``resnet50_imagenet`` (bottleneck blocks 3-4-6-3, ×4 expansion, stride on the 3×3 conv, "v1.5").
The CIFAR zoo's ``ResNet50`` is a different (3×3-stem) model. Layout: 7×7 stride-2 conv-BN-ReLU
stem with a 3×3 stride-2 max-pool, four stages of widths 64, 128, 256, 512 (the first keeps the
resolution, the others halve it: 56, 28, 14, 7 on 224×224), global average pool and ``fc``.
Parameter names are the common ones (``conv1``, ``bn1``, ``layerK.i.conv1``, ``downsample.0/1``,
``fc``), so ImageNet checkpoints in that naming load. At 1000 classes: 11,689,512 / 21,797,672 /
25,557,032 parameters.

Tap names (``model.tap_names``):

* ``stem``: the whole stem's output, after the max-pool (module ``maxpool``; 64×56×56 on 224).
* ``stage1``..``stage4``: each stage's output, after the last block's final ReLU
  (module ``layerK.<last>.relu_out``, not in-place).
* ``stage1_pre``..``stage4_pre``: the same value before that ReLU, the residual sum
  (module ``layerK.<last>.preact``, an ``nn.Identity``); ``relu(stageK_pre) == stageK``.
* ``embedding`` (generic): the input of ``fc``, the globally pooled last stage.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdflow.models.cifar_resnet import BasicBlock, _stage_taps, init_weights, make_stage
from kdflow.models.registry import register_model


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand ×4, each with BN; a 1×1 conv-BN ``downsample`` when the
    shape changes. The sum passes ``preact`` (``nn.Identity``) then ``relu_out`` (not in-place when
    ``is_last``, so a captured pre-activation survives)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, is_last: bool = False
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.preact = nn.Identity()
        self.relu_out = nn.ReLU(inplace=not is_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + residual
        return self.relu_out(self.preact(out))


class ImageNetResNet(nn.Module):
    """7×7 stride-2 stem + max-pool, four stages of `block`, global average pool, ``fc``."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        for k, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            stage = self._make_layer(block, planes, n, stride=1 if k == 1 else 2)
            self.add_module(f"layer{k}", stage)
            stages.append(stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.tap_names = {"stem": "maxpool", **_stage_taps(stages)}
        init_weights(self)
        if zero_init_residual:
            # each residual branch starts as zero, so every block starts as the identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int) -> nn.Sequential:
        stage = make_stage(block, self.inplanes, planes, blocks, stride)
        self.inplanes = planes * block.expansion
        return stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def check_image(input_shape: tuple[int, ...]) -> int:
    """The channel count of a C×H×W input shape (ImageNet models need a 2-D image)."""
    if len(input_shape) != 3:
        raise ValueError(f"ImageNet models take C×H×W inputs, got shape {input_shape}")
    if min(input_shape[1:]) < 32:
        raise ValueError(f"ImageNet models downsample by 32; inputs of {input_shape[1]}×{input_shape[2]} are too small")
    return input_shape[0]


@register_model("resnet18_imagenet")
def resnet18_imagenet(
    num_classes: int, input_shape: tuple[int, ...] = (3, 224, 224), zero_init_residual: bool = False
) -> ImageNetResNet:
    """ImageNet ResNet-18 (basic blocks 2-2-2-2); 11,689,512 parameters at 1000 classes."""
    return ImageNetResNet(BasicBlock, (2, 2, 2, 2), num_classes, check_image(input_shape), zero_init_residual)


@register_model("resnet34_imagenet")
def resnet34_imagenet(
    num_classes: int, input_shape: tuple[int, ...] = (3, 224, 224), zero_init_residual: bool = False
) -> ImageNetResNet:
    """ImageNet ResNet-34 (basic blocks 3-4-6-3); 21,797,672 parameters at 1000 classes."""
    return ImageNetResNet(BasicBlock, (3, 4, 6, 3), num_classes, check_image(input_shape), zero_init_residual)


@register_model("resnet50_imagenet")
def resnet50_imagenet(
    num_classes: int, input_shape: tuple[int, ...] = (3, 224, 224), zero_init_residual: bool = False
) -> ImageNetResNet:
    """ImageNet ResNet-50 (bottleneck blocks 3-4-6-3); 25,557,032 parameters at 1000 classes."""
    return ImageNetResNet(Bottleneck, (3, 4, 6, 3), num_classes, check_image(input_shape), zero_init_residual)
