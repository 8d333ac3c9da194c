"""Trainable connectors that map a target tap to the source tap's shape (FitNet's regressor and kin).

A connector belongs to the node on its target side and joins that node's optimizer.

``regressor`` is `kdflow.losses.stateful.feature_blocks.Regressor` (FitNet's; also AB's connector).
"""
from __future__ import annotations

import torch.nn as nn

from kdflow.flow.errors import RecipeError
from kdflow.losses.stateful.feature_blocks import Regressor


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
