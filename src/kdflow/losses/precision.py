"""The dtype a loss computes in: its input's, except that half precisions are raised to float32.

float64 inputs stay float64 (parity checks and gradient checks need it); float16 and bfloat16
inputs (autocast) are computed in float32, whose exponent range the softmaxes and norms need.
"""
from __future__ import annotations

import torch

_RAISED = (torch.float16, torch.bfloat16)


def compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """`x` as float32 if it is float16/bfloat16 (or an integer type), else unchanged."""
    if x.dtype in _RAISED or not x.is_floating_point():
        return x.float()
    return x
