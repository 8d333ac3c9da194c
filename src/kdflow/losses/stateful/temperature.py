"""CTKD: Li, Li, Yang, Zhao, Song, Luo, Li and Yang 2023, "Curriculum Temperature for Knowledge
Distillation" (AAAI).

A module criterion on the logits taps (student ← teacher): vanilla KD at a temperature that is itself
learned, adversarially. The temperature module holds one parameter θ (the *global* temperature of the
paper; initialised to 1) and maps it into a fixed range,

    τ = τ_min + τ_range · sigmoid(GRL_λ(θ)),      τ_min = 1, τ_range = 20, so τ ∈ (1, 21), τ₀ ≈ 15.62,

and the loss is KD at that τ, with the τ² factor and the ``batchmean`` reduction of `kdflow.losses.kd`:

    τ² · KL(softmax(z_t / τ) ‖ softmax(z_s / τ)),   summed over classes, averaged over the batch.

GRL_λ is the gradient reversal layer (Ganin and Lempitsky 2015): the identity forward, the incoming
gradient multiplied by −λ backward. θ joins the student's optimizer, so the student *descends* the KD loss
while θ *ascends* it (the temperature moves to where the student finds the teacher hardest to match).
The reversal strength follows the paper's cosine curriculum over epochs, e = epoch + 1 the 1-based epoch
of the stage (kdflow's context `epoch` is 0-based; the authors' loop counts from 1):

    λ(e) = λ_min + ½ (λ_max − λ_min) (1 + cos((1 + min(e, E_loops) / E_loops) π)),
    λ_min = 0, λ_max = 1, E_loops = 10,

which rises from ≈0.024 at the first epoch to 1 at the tenth and stays there.

Reference: zhengli97/CTKD@7d52522. ``models/temp_global.py`` (``Global_T``: ``nn.Parameter(torch.ones(1))``
through ``GradientReversalFunction``, whose backward multiplies the gradient by the value it is given);
``helper/loops.py`` ``train_distill`` (``temp = opt.t_start + opt.t_end * torch.sigmoid(temp)``, t_start 1
and t_end 20 by ``train_student.py``'s argparse defaults); ``train_student.py`` ``CosineDecay`` with
``--cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10`` (``scripts/run_cifar_distill.sh``),
evaluated at the 1-based epoch and handed to the reversal layer as the multiplier itself. That multiplier
is (cos(e π / E_loops) + 1)/2 − 1 = −λ(e) above: the code's sign convention and the paper's formula are the
same schedule. ``distiller_zoo/KD.py`` ``DistillKL``: ``KLDivLoss(reduction='batchmean')`` × T².

Not built: the instance-wise temperature (one τ per sample). The repository has no module for it (its
README points to an external archive and only shows the per-sample KL); only the global temperature, the
one the released scripts train, is here. The authors' `LinearDecay` alternative is not built either.

Logit standardization (Sun et al. 2024) is the transfer's ``logit_standardization: true``, as for every
logit criterion: the flow z-scores both logits before this module divides them by the learned τ.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from kdflow.losses.logits import kd
from kdflow.losses.precision import compute_dtype
from kdflow.losses.registry import BuildInfo, criterion

__all__ = ["CurriculumTemperature", "GradientReversal", "curriculum_lambda", "gradient_reversal"]


class GradientReversal(torch.autograd.Function):
    """y = x forward; ∂L/∂x = −λ · ∂L/∂y backward (λ a plain number, not differentiated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lam = float(lam)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.lam * grad, None


def gradient_reversal(x: torch.Tensor, lam: float) -> torch.Tensor:
    """`x` unchanged, its gradient multiplied by −`lam` in the backward pass (Ganin and Lempitsky 2015)."""
    return GradientReversal.apply(x, lam)


def curriculum_lambda(epoch: int, loops: int = 10, lambda_min: float = 0.0, lambda_max: float = 1.0) -> float:
    """CTKD's reversal strength at 0-based `epoch`: with n = min(epoch + 1, loops),
    λ = λ_min + ½(λ_max − λ_min)(1 + cos((1 + n / loops)π)): just above λ_min in the first epoch, λ_max from
    the `loops`-th (1-based) on. The paper's cosine curriculum; the authors' `CosineDecay` (train_student.py) at
    their 1-based epoch gives −λ, the multiplier their reversal layer applies."""
    if loops < 1:
        raise ValueError(f"ctkd: loops must be >= 1 (epochs over which λ rises), got {loops}")
    if epoch < 0:
        raise ValueError(f"ctkd: epoch must be >= 0, got {epoch}")
    n = min(epoch + 1, loops)
    return lambda_min + 0.5 * (lambda_max - lambda_min) * (1.0 + math.cos((1.0 + n / loops) * math.pi))


class CurriculumTemperature(nn.Module):
    """KD at a learned global temperature τ = τ_min + τ_range·sigmoid(GRL_λ(θ)), λ by `curriculum_lambda`.

    `temperature()` is the current τ (no gradient); `last_lambda` the λ of the latest forward pass."""

    def __init__(
        self,
        theta_init: float = 1.0,
        min_temperature: float = 1.0,
        temperature_range: float = 20.0,
        loops: int = 10,
        lambda_min: float = 0.0,
        lambda_max: float = 1.0,
    ) -> None:
        super().__init__()
        if not math.isfinite(theta_init):
            raise ValueError(f"ctkd: theta_init must be finite, got {theta_init}")
        if not (min_temperature > 0 and math.isfinite(min_temperature)):
            raise ValueError(f"ctkd: min_temperature must be > 0, got {min_temperature}")
        if not (temperature_range >= 0 and math.isfinite(temperature_range)):
            raise ValueError(f"ctkd: temperature_range must be >= 0, got {temperature_range}")
        if loops < 1:
            raise ValueError(f"ctkd: loops must be >= 1 (epochs over which λ rises), got {loops}")
        self.theta = nn.Parameter(torch.full((1,), float(theta_init)))
        self.min_temperature, self.temperature_range = float(min_temperature), float(temperature_range)
        self.loops, self.lambda_min, self.lambda_max = int(loops), float(lambda_min), float(lambda_max)
        self.last_lambda: float | None = None

    def _tau(self, lam: float) -> torch.Tensor:
        theta = gradient_reversal(self.theta, lam)
        return (self.min_temperature + self.temperature_range * torch.sigmoid(theta)).squeeze(0)

    def temperature(self) -> float:
        """The temperature the next step will use (a plain number)."""
        with torch.no_grad():
            return float(self.min_temperature + self.temperature_range * torch.sigmoid(self.theta))

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, epoch: int) -> torch.Tensor:
        if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"ctkd compares logits (B, C) of equal shape, "
                f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        lam = curriculum_lambda(epoch, self.loops, self.lambda_min, self.lambda_max)
        self.last_lambda = lam
        tau = self._tau(lam).to(compute_dtype(student_logits).dtype)  # float64 in parity checks, float32 under autocast
        return kd(student_logits, teacher_logits, tau)


@criterion(module=True, context=("epoch",))
def ctkd(
    target_shape: tuple[int, ...],
    source_shape: tuple[int, ...],
    build: BuildInfo,
    theta_init: float = 1.0,
    min_temperature: float = 1.0,
    temperature_range: float = 20.0,
    loops: int = 10,
    lambda_min: float = 0.0,
    lambda_max: float = 1.0,
) -> nn.Module:
    """CTKD (Li et al. 2023): KD at a global temperature learned through a gradient reversal layer whose
    strength rises on a cosine curriculum over the first `loops` epochs."""
    if len(target_shape) != 1 or len(source_shape) != 1:
        shapes = f"{tuple(target_shape)}, {tuple(source_shape)}"
        raise ValueError(f"ctkd compares logits: tap `logits` on both sides (got shapes {shapes})")
    return CurriculumTemperature(theta_init, min_temperature, temperature_range, loops, lambda_min, lambda_max)
