"""Losses against the labels that a trainable node can be supervised with (`supervise:`); the others are
`label_smoothing` and `tfkd_reg`, registered where they are defined in `kdflow.losses.logits`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdflow.losses.logits import tfkd_reg, tfkd_reg_released
from kdflow.losses.precision import compute_dtype
from kdflow.losses.registry import supervision

__all__ = ["ce", "tfkd_reg_ce"]


@supervision()
def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, mean over the batch (in float64 for float64 logits, else in float32)."""
    return F.cross_entropy(compute_dtype(logits), target)


@supervision()
def tfkd_reg_ce(
    student_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.1,
    correct_prob: float = 0.99,
    temperature: float = 20.0,
    form: str = "paper",
    multiplier: float = 100.0,
) -> torch.Tensor:
    """Tf-KD_reg's whole student loss (Yuan et al. 2020): (1 − α)·CE(z, y) + α·R(z, y), with R
    `losses.tfkd_reg`(z, y, a, τ) for ``form="paper"`` and `losses.tfkd_reg_released`(z, y, a, τ,
    multiplier) — the authors' released loss — for ``form="released"``."""
    if form == "paper":
        reg = tfkd_reg(student_logits, target, correct_prob, temperature)
    elif form == "released":
        reg = tfkd_reg_released(student_logits, target, correct_prob, temperature, multiplier)
    else:
        raise ValueError(f"tfkd_reg_ce: form must be 'paper' or 'released', not {form!r}")
    return (1.0 - alpha) * ce(student_logits, target) + alpha * reg
