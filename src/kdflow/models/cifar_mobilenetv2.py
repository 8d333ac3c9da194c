"""The CIFAR MobileNetV2 of the CRD/RepDistiller benchmark (Sandler et al. 2018), half width.

Registered name: ``MobileNetV2`` (the benchmark's ``mobile_half``: expansion 6, width ×0.5).
A 3×3 stride-2 conv-BN-ReLU stem (16 channels), seven groups of inverted residuals
(1×1 expand-BN-ReLU, 3×3 depthwise-BN-ReLU, 1×1 linear projection-BN; identity residual when
the shape is kept) with (t, c, n, s) = (1,16,1,1), (6,24,2,1), (6,32,3,2), (6,64,4,2), (6,96,3,1),
(6,160,3,2), (6,320,1,1) (channels halved: 8, 12, 16, 32, 48, 80, 160; note the second group keeps
stride 1 for CIFAR), a 1×1 conv-BN-ReLU to 1280 channels (not halved), global average pool and a
linear ``classifier.0``. On 32×32 the resolutions are 16 (stem, groups 0-1), 8 (group 2),
4 (groups 3-4) and 2 (groups 5-6). Parameter names follow the benchmark.

Stages are the resolution groups, as in the benchmark's feature list:

* ``stem``: ``conv1`` (conv-BN-ReLU), 16×16.
* ``stage1`` = ``blocks.1`` (12 ch, 16×16), ``stage2`` = ``blocks.2`` (16 ch, 8×8),
  ``stage3`` = ``blocks.4`` (48 ch, 4×4), ``stage4`` = ``blocks.6`` (160 ch, 2×2).
* ``stage1_pre``..``stage4_pre``: the SAME modules. Inverted residuals end in a linear bottleneck,
  so a stage's output is never followed by a ReLU: it is already the pre-activation value
  (``relu(stageK_pre) != stageK`` here, unlike the ResNets).
* ``embedding`` (generic): the input of ``classifier.0``, the pooled 1280-channel head.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdflow.models.cifar_resnet import _check_image
from kdflow.models.registry import register_model

SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STAGE_ENDS = (1, 2, 4, 6)  # the group that ends each stage


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class InvertedResidual(nn.Module):
    """1×1 expand (×t), 3×3 depthwise (stride), 1×1 linear projection, each with BN; residual if shape kept."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for CIFAR (see the module docstring)."""

    def __init__(self, num_classes: int, in_channels: int = 3, expansion: int = 6, width_mult: float = 0.5) -> None:
        super().__init__()
        cin = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in SETTINGS:
            t = expansion if t != 1 else 1
            cout = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.tap_names = {"stem": "conv1"}
        for k, g in enumerate(STAGE_ENDS, start=1):
            self.tap_names[f"stage{k}"] = f"blocks.{g}"
            self.tap_names[f"stage{k}_pre"] = f"blocks.{g}"
        self._init_weights()

    def _init_weights(self) -> None:
        # the benchmark's initialisation: He-normal (fan-out over groups) convs, N(0, 0.01) linear
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        x = self.conv2(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


@register_model("MobileNetV2")
def mobilenetv2(num_classes: int, input_shape: tuple[int, ...] = (3, 32, 32), expansion: int = 6, width_mult: float = 0.5) -> CifarMobileNetV2:
    """The benchmark's half-width CIFAR MobileNetV2 (``mobile_half``: expansion 6, width 0.5)."""
    return CifarMobileNetV2(num_classes, _check_image(input_shape), expansion, width_mult)
