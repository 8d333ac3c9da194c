"""CIFAR VGGs with batch norm of the CRD/RepDistiller benchmark (Simonyan & Zisserman 2015).

Registered names: ``vgg8``, ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``. Five conv blocks
(``block0``..``block4``) of 3×3 conv(bias)-BN-ReLU layers with widths 64, 128, 256, 512, 512;
convolutions per block: vgg8 1-1-1-1-1, vgg11 1-1-2-2-2, vgg13 2-2-2-2-2, vgg16 2-2-3-3-3,
vgg19 2-2-4-4-4. A 2×2 max-pool follows blocks 0-2 (and block 3 only for inputs of 64 pixels or
more, as in the benchmark: on 32×32 the last two blocks both run at 4×4); then global average pool
and one ``classifier`` linear layer. Parameter names follow the benchmark, so its checkpoints load.

Tap names (``model.tap_names``):

Taps follow the benchmark's feature list ``[f0, f1, .., f4, pooled]`` (RepDistiller ``models/vgg.py``,
``forward(is_feat=True)``), in which ``block0`` is the stem:

* ``stem``: the output of ``block0`` after its final ReLU (f0).
* ``stage1``..``stage4``: the output of ``block1``..``block4`` after its final ReLU (f1..f4).
* ``stage1_pre``..``stage4_pre``: the same before that ReLU (the block's ``nn.Identity`` just
  before it); ``relu(stageK_pre) == stageK``.
* ``embedding`` (generic): the input of ``classifier``, the pooled ``stage4``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdflow.models.cifar_resnet import _check_image, init_weights
from kdflow.models.registry import register_model

WIDTHS = (64, 128, 256, 512, 512)
CONVS = {
    "vgg8": (1, 1, 1, 1, 1),
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}


def _block(cin: int, cout: int, convs: int) -> nn.Sequential:
    """conv-BN-ReLU × convs, the last ReLU split as an ``nn.Identity`` (pre-activation tap) and a non-inplace ReLU."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm2d(cout)]
        layers.append(nn.ReLU(inplace=True) if i < convs - 1 else nn.Identity())
    layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """VGG with BN for CIFAR (see the module docstring)."""

    def __init__(self, convs: tuple[int, ...], num_classes: int, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        cin = _check_image(input_shape)
        for k, (w, n) in enumerate(zip(WIDTHS, convs)):
            self.add_module(f"block{k}", _block(cin, w, n))
            cin = w
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2) if input_shape[1] >= 64 else nn.Identity()
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(WIDTHS[-1], num_classes)
        # the benchmark's feature list: block0 is the stem (f0), block1..block4 the stages (f1..f4)
        self.tap_names = {"stem": f"block0.{3 * convs[0]}"}
        for k, n in enumerate(convs[1:], start=1):
            self.tap_names[f"stage{k}"] = f"block{k}.{3 * n}"
            self.tap_names[f"stage{k}_pre"] = f"block{k}.{3 * n - 1}"
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.pool3(self.block3(x))
        x = self.pool4(self.block4(x))
        return self.classifier(torch.flatten(x, 1))


def _register_vgg(name: str) -> None:
    convs = CONVS[name]

    def build(num_classes: int, input_shape: tuple[int, ...] = (3, 32, 32)) -> CifarVGG:
        return CifarVGG(convs, num_classes, tuple(input_shape))

    build.__name__ = name
    build.__doc__ = f"CIFAR {name.upper()} with batch norm (convs per block {'-'.join(map(str, convs))})."
    register_model(name)(build)


for _name in CONVS:
    _register_vgg(_name)
