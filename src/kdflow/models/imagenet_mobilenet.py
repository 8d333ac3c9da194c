"""ImageNet MobileNetV1 (Howard et al. 2017), width 1.0: the student of the ResNet50 → MobileNetV1 benchmark.

Registered name: ``mobilenetv1_imagenet``. A 3×3 stride-2 conv-BN-ReLU stem (32 channels), 13
depthwise-separable blocks (3×3 depthwise conv-BN-ReLU, then 1×1 pointwise conv-BN-ReLU; no
residuals), global average pool and ``fc`` (1024 → classes); 4,231,976 parameters at 1000 classes.
The layers live in one ``model`` Sequential as in the benchmark's code: ``model.0`` is the stem,
``model.1``..``model.13`` the blocks, each block ``model.K`` with children ``0`` (depthwise conv),
``1`` (BN), ``2`` (ReLU), ``3`` (pointwise conv), ``4`` (BN), ``preact`` (``nn.Identity``) and
``relu_out`` (ReLU), so its parameter names (``model.K.0.weight``, ``model.K.4.running_mean``, ``fc``)
match the benchmark's checkpoints.

Blocks (output channels, stride; resolution on 224×224): 1 (64, 1; 112), 2 (128, 2; 56), 3 (128, 1; 56),
4 (256, 2; 28), 5 (256, 1; 28), 6 (512, 2; 14), 7-11 (512, 1; 14), 12 (1024, 2; 7), 13 (1024, 1; 7).

Stages group the blocks by output resolution, in four stages that line up with the ResNets'
(56, 28, 14, 7 on 224×224) as in the benchmark's feature list; block 1, the only block at the stem's
resolution (112), joins the first stage:

* ``stem``: ``model.0`` (conv-BN-ReLU), 32×112×112.
* ``stage1`` = blocks 1-3 (128×56×56), ``stage2`` = blocks 4-5 (256×28×28),
  ``stage3`` = blocks 6-11 (512×14×14), ``stage4`` = blocks 12-13 (1024×7×7): module
  ``model.<last block>.relu_out``, the stage's final (pointwise) ReLU, not in-place.
* ``stage1_pre``..``stage4_pre``: ``model.<last block>.preact``, the pointwise conv-BN output before
  that ReLU; ``relu(stageK_pre) == stageK``.
* ``embedding`` (generic): the input of ``fc``, the pooled 1024-channel ``stage4``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from kdflow.models.cifar_resnet import init_weights
from kdflow.models.imagenet_resnet import check_image
from kdflow.models.registry import register_model

# (output channels, stride) of the 13 depthwise-separable blocks
BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
STAGE_ENDS = (3, 5, 11, 13)  # the (1-based) block that ends each stage


def _stem(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _depthwise_separable(cin: int, cout: int, stride: int, is_last: bool) -> nn.Sequential:
    """3×3 depthwise conv-BN-ReLU, 1×1 pointwise conv-BN, ``preact``, ``relu_out`` (not in-place if ``is_last``)."""
    return nn.Sequential(
        OrderedDict(
            [
                ("0", nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)),
                ("1", nn.BatchNorm2d(cin)),
                ("2", nn.ReLU(inplace=True)),
                ("3", nn.Conv2d(cin, cout, 1, bias=False)),
                ("4", nn.BatchNorm2d(cout)),
                ("preact", nn.Identity()),
                ("relu_out", nn.ReLU(inplace=not is_last)),
            ]
        )
    )


class MobileNetV1(nn.Module):
    """MobileNetV1 at width 1.0 (see the module docstring)."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers = [_stem(in_channels, 32)]
        cin = 32
        for k, (cout, stride) in enumerate(BLOCKS, start=1):
            layers.append(_depthwise_separable(cin, cout, stride, is_last=k in STAGE_ENDS))
            cin = cout
        self.model = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.tap_names = {"stem": "model.0"}
        for k, end in enumerate(STAGE_ENDS, start=1):
            self.tap_names[f"stage{k}"] = f"model.{end}.relu_out"
            self.tap_names[f"stage{k}_pre"] = f"model.{end}.preact"
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("mobilenetv1_imagenet")
def mobilenetv1_imagenet(num_classes: int, input_shape: tuple[int, ...] = (3, 224, 224)) -> MobileNetV1:
    """ImageNet MobileNetV1, width 1.0; 4,231,976 parameters at 1000 classes."""
    return MobileNetV1(num_classes, check_image(input_shape))
