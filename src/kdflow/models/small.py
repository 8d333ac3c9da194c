"""Small models for 28×28 images and 1-D signals: the demo's teacher and students.

Every model names its parts the same way, so taps are stable:
``stem``, ``stage1``..``stageN`` (each stage ends in its ReLU), ``pool`` and ``fc``.
The ConvNet also publishes ``stage1_pre``..``stageN_pre`` in ``tap_names``: the value just
before a stage's last ReLU (the output of its last batch norm; ``relu(stageK_pre) == stageK``),
which the pre-activation methods (AB, OFD, ReviewKD's teacher side) tap. That last ReLU is
not in-place so the captured pre-activation survives, as in the CIFAR zoo.
Channel widths are multiples of 8, which the CPU convolution kernels prefer.
The pooled embedding is the input of ``fc``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdflow.models.registry import register_model


def _conv_bn_relu(cin: int, cout: int, dims: int, inplace: bool = True) -> list[nn.Module]:
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return [conv(cin, cout, 3, padding=1, bias=False), bn(cout), nn.ReLU(inplace=inplace)]


class ConvNet(nn.Module):
    """A plain VGG-style CNN: a conv stem at full resolution, then stages that each halve the
    resolution (max-pool) and apply `depth` conv-BN-ReLU blocks; global average pool; linear head.

    Works for images (C×H×W) and signals (C×L); `widths` gives the channels of the stem and of each stage.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], widths: tuple[int, ...], depth: int = 1) -> None:
        super().__init__()
        dims = len(input_shape) - 1
        if dims not in (1, 2):
            raise ValueError(f"ConvNet takes C×H×W or C×L inputs, got shape {input_shape}")
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool1d
        self.stem = nn.Sequential(*_conv_bn_relu(input_shape[0], widths[0], dims))
        cin = widths[0]
        self.tap_names: dict[str, str] = {}
        for i, w in enumerate(widths[1:], start=1):
            layers: list[nn.Module] = [pool(2)]
            for j in range(depth):
                layers += _conv_bn_relu(cin, w, dims, inplace=j < depth - 1)
                cin = w
            self.add_module(f"stage{i}", nn.Sequential(*layers))
            self.tap_names[f"stage{i}_pre"] = f"stage{i}.{len(layers) - 2}"  # the last batch norm
        self.stages = len(widths) - 1
        self.pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, self.stages + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class MLP(nn.Module):
    """A multilayer perceptron on the flattened input: ``stage1``..``stageN`` are Linear-ReLU(-Dropout) blocks."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], hidden: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        cin = 1
        for d in input_shape:
            cin *= d
        self.stem = nn.Flatten()
        for i, h in enumerate(hidden, start=1):
            block = [nn.Linear(cin, h), nn.ReLU(inplace=True)] + ([nn.Dropout(dropout)] if dropout else [])
            self.add_module(f"stage{i}", nn.Sequential(*block))
            cin = h
        self.stages = len(hidden)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, self.stages + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.fc(x)


@register_model("convnet_l")
def convnet_l(num_classes: int, input_shape: tuple[int, ...], width: int = 32, depth: int = 1) -> ConvNet:
    """Teacher-sized CNN: stem `width`, three stages of 2, 4 and 8·width (391k parameters on 28×28 at width 32)."""
    return ConvNet(num_classes, input_shape, (width, 2 * width, 4 * width, 8 * width), depth)


@register_model("convnet_m")
def convnet_m(num_classes: int, input_shape: tuple[int, ...], width: int = 16, depth: int = 1) -> ConvNet:
    """Medium CNN: stem `width`, three stages of 2, 4 and 8·width (98k parameters on 28×28 at width 16)."""
    return ConvNet(num_classes, input_shape, (width, 2 * width, 4 * width, 8 * width), depth)


@register_model("convnet_s")
def convnet_s(num_classes: int, input_shape: tuple[int, ...], width: int = 8, depth: int = 1) -> ConvNet:
    """Student-sized CNN: stem `width`, two stages of 2 and 4·width (6k parameters on 28×28 at width 8)."""
    return ConvNet(num_classes, input_shape, (width, 2 * width, 4 * width), depth)


@register_model("mlp")
def mlp(num_classes: int, input_shape: tuple[int, ...], hidden: tuple[int, ...] = (100,), dropout: float = 0.0) -> MLP:
    """MLP student on the flattened input: one hidden layer of 100 units by default."""
    return MLP(num_classes, input_shape, tuple(hidden), dropout)
