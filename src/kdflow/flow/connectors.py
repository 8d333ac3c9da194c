"""Trainable connectors that map a target tap to the source tap's shape (FitNet's regressor and kin).

A connector belongs to the node on its target side and joins that node's optimizer.

``regressor`` is the convolutional regressor of the CIFAR-100 benchmark's FitNet (Romero et al. 2015,
as built by RepDistiller's and mdistiller's ``ConvReg``): a convolution with bias whose shape follows
the two maps' spatial sizes (1×1 at equal size, 3×3 stride 2 from twice the size, 4×4 stride-2
transposed from half the size, else a valid (1 + ΔH)×(1 + ΔW) kernel), then batch norm, then ReLU
(``relu=False`` leaves the ReLU out: the benchmark's AB connector).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdflow.flow.errors import RecipeError


class Regressor(nn.Module):
    """Conv (with bias, chosen by the spatial sizes) → BN → ReLU (optional); maps C_s×H_s×W_s to C_t×H_t×W_t
    (or C_s×L_s to C_t×L_t with 1-d convolutions)."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], relu: bool = True) -> None:
        super().__init__()
        if len(in_shape) != len(out_shape) or len(in_shape) not in (2, 3):
            raise ValueError(f"a regressor maps C×H×W or C×L feature maps, got {in_shape} -> {out_shape}")
        two_d = len(in_shape) == 3
        conv, deconv = (nn.Conv2d, nn.ConvTranspose2d) if two_d else (nn.Conv1d, nn.ConvTranspose1d)
        (c_s, *size_s), (c_t, *size_t) = in_shape, out_shape
        h_s, h_t = size_s[0], size_t[0]
        if h_s == 2 * h_t:
            self.conv: nn.Module = conv(c_s, c_t, kernel_size=3, stride=2, padding=1)
        elif 2 * h_s == h_t:
            self.conv = deconv(c_s, c_t, kernel_size=4, stride=2, padding=1)
        elif all(a >= b for a, b in zip(size_s, size_t)):
            self.conv = conv(c_s, c_t, kernel_size=tuple(1 + a - b for a, b in zip(size_s, size_t)))
        else:
            raise ValueError(f"no regressor from spatial size {size_s} to {size_t}")
        self.bn = nn.BatchNorm2d(c_t) if two_d else nn.BatchNorm1d(c_t)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return torch.relu(x) if self.relu else x


def build_connector(kind: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...], where: str) -> nn.Module:
    """`in_shape`/`out_shape` exclude the batch: (D,) for vectors, (C, H, W) or (C, L) for feature maps."""
    if kind == "linear":
        if len(in_shape) != 1 or len(out_shape) != 1:
            raise RecipeError(f"{where}: connector 'linear' maps vectors, got {in_shape} -> {out_shape}")
        return nn.Linear(in_shape[0], out_shape[0])
    if kind in ("conv1x1", "conv3x3"):
        if len(in_shape) != len(out_shape) or len(in_shape) not in (2, 3) or in_shape[1:] != out_shape[1:]:
            raise RecipeError(
                f"{where}: connector {kind!r} needs feature maps of equal spatial size, got {in_shape} -> {out_shape}"
            )
        conv = nn.Conv2d if len(in_shape) == 3 else nn.Conv1d
        bn = nn.BatchNorm2d if len(in_shape) == 3 else nn.BatchNorm1d
        k = 1 if kind == "conv1x1" else 3
        return nn.Sequential(conv(in_shape[0], out_shape[0], k, padding=k // 2, bias=False), bn(out_shape[0]))
    if kind == "regressor":
        try:
            return Regressor(in_shape, out_shape)
        except ValueError as e:
            raise RecipeError(f"{where}: {e}") from None
    raise RecipeError(f"{where}: unknown connector {kind!r}")
