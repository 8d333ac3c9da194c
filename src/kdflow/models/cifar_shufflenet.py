"""The CIFAR ShuffleNets of the CRD/RepDistiller benchmark: ``ShuffleV1`` and ``ShuffleV2``.

``ShuffleV1`` (Zhang et al. 2018), groups 3: a 1×1 conv-BN-ReLU stem to 24 channels, then three
stages of 4, 8, 4 bottlenecks with outputs 240, 480, 960 channels. A bottleneck is a grouped 1×1
reduce to out/4 (ungrouped on the 24-channel stem output) - BN - ReLU - channel shuffle -
3×3 depthwise (stride) - BN - grouped 1×1 expand - BN, added to the input, or, in each stage's
first (stride-2) block, concatenated with a 3×3 stride-2 average pool of the input; then ReLU.
Global average pool and ``linear``.

``ShuffleV2`` (Ma et al. 2018), ×1 size: a 1×1 conv-BN-ReLU stem to 24 channels, three stages of
one down-sampling block plus 3, 7, 3 basic blocks with 116, 232, 464 channels, a 1×1 conv-BN-ReLU
head to 1024 channels, global average pool and ``linear``. A basic block splits the channels in
half, passes one half through and sends the other through 1×1-BN-ReLU, 3×3 depthwise-BN,
1×1-BN-ReLU, concatenates and shuffles (2 groups); a down-sampling block concatenates two strided
branches (3×3 depthwise-BN, 1×1-BN-ReLU | 1×1-BN-ReLU, 3×3 depthwise-BN, 1×1-BN-ReLU) and shuffles.

On 32×32 both run their stages at 16, 8 and 4 pixels. Parameter names follow the benchmark.

Tap names (both models; three stages ``layer1``..``layer3``):

* ``stem``: the stem's conv-BN-ReLU output (module ``relu``).
* ``stage1``..``stage3``: each stage's output after its last block's final ReLU
  (``layerK.<last>.relu_out``).
* ``stage1_pre``..``stage3_pre``: the same before that ReLU (``layerK.<last>.preact``);
  ``relu(stageK_pre) == stageK``. In ShuffleV2 the last block's pre-activation is the shuffled
  concatenation of the passed-through half (already non-negative) and the branch's BN output,
  so it lines up channel for channel with ``stageK``.
* ``embedding`` (generic): the input of ``linear`` (ShuffleV2: the pooled 1024-channel head).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdflow.models.cifar_resnet import _check_image, init_weights
from kdflow.models.registry import register_model


class ShuffleBlock(nn.Module):
    """Channel shuffle: (g, C/g) -> (C/g, g)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


# --------------------------------------------------------------------------- ShuffleNet V1


class ShuffleV1Bottleneck(nn.Module):
    """ShuffleNet unit (see the module docstring); ``preact`` then ``relu_out`` end it."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, is_last: bool = False) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ShuffleBlock(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        self.preact = nn.Identity()
        self.relu_out = nn.ReLU(inplace=not is_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.relu_out(self.preact(out))


class ShuffleNetV1(nn.Module):
    def __init__(self, out_planes: tuple[int, int, int], num_blocks: tuple[int, int, int], groups: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=True)
        self.in_planes = 24
        self.tap_names = {"stem": "relu"}
        for k, (planes, n) in enumerate(zip(out_planes, num_blocks), start=1):
            self.add_module(f"layer{k}", self._make_layer(planes, n, groups))
            self.tap_names[f"stage{k}"] = f"layer{k}.{n - 1}.relu_out"
            self.tap_names[f"stage{k}_pre"] = f"layer{k}.{n - 1}.preact"
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)
        init_weights(self)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # the stride-2 first block concatenates its pooled input, so its branch makes the rest
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(ShuffleV1Bottleneck(self.in_planes, out_planes - cat_planes, 2 if i == 0 else 1, groups, i == num_blocks - 1))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- ShuffleNet V2


class ShuffleV2Block(nn.Module):
    """Channel-split unit; in the last block of a stage the ReLU runs after the shuffle through
    ``preact``/``relu_out`` so the pre-activation can be tapped."""

    def __init__(self, channels: int, split_ratio: float = 0.5, is_last: bool = False) -> None:
        super().__init__()
        self.split_ratio = split_ratio
        self.is_last = is_last
        c = int(channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(2)
        if is_last:
            self.preact = nn.Identity()
            self.relu_out = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = int(x.shape[1] * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        if self.is_last:
            # x1 is a ReLU output, so relu(shuffle(cat(x1, out))) == shuffle(cat(x1, relu(out)))
            return self.relu_out(self.preact(self.shuffle(torch.cat([x1, out], 1))))
        return self.shuffle(torch.cat([x1, F.relu(out)], 1))


class ShuffleV2DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    def __init__(self, out_channels: tuple[int, int, int, int], num_blocks: tuple[int, int, int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=True)
        self.in_channels = 24
        self.tap_names = {"stem": "relu"}
        for k, (ch, n) in enumerate(zip(out_channels[:3], num_blocks), start=1):
            self.add_module(f"layer{k}", self._make_layer(ch, n))
            self.tap_names[f"stage{k}"] = f"layer{k}.{n}.relu_out"
            self.tap_names[f"stage{k}_pre"] = f"layer{k}.{n}.preact"
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)
        init_weights(self)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [ShuffleV2DownBlock(self.in_channels, out_channels)]
        for i in range(num_blocks):
            layers.append(ShuffleV2Block(out_channels, is_last=i == num_blocks - 1))
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register_model("ShuffleV1")
def shufflev1(num_classes: int, input_shape: tuple[int, ...] = (3, 32, 32)) -> ShuffleNetV1:
    """The benchmark's CIFAR ShuffleNetV1 (groups 3; stages 240, 480, 960 of 4, 8, 4 blocks)."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes, _check_image(input_shape))


@register_model("ShuffleV2")
def shufflev2(num_classes: int, input_shape: tuple[int, ...] = (3, 32, 32)) -> ShuffleNetV2:
    """The benchmark's CIFAR ShuffleNetV2 ×1 (stages 116, 232, 464 of 1+3, 1+7, 1+3 blocks; head 1024)."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes, _check_image(input_shape))
