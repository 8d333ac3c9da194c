"""Losses on logits: knowledge read off a model's output distribution."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdflow.losses.precision import compute_dtype
from kdflow.losses.registry import criterion, supervision

__all__ = [
    "annealing_kd",
    "annealing_mse",
    "annealing_temperature_index",
    "dist",
    "dkd",
    "kd",
    "label_smoothing",
    "nkd",
    "standardize",
    "tfkd_reg",
    "tfkd_reg_released",
    "virtual_teacher_logits",
    "wttm",
]


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Sun, Ren, Li, Wang and Cao 2024, "Logit Standardization in Knowledge Distillation" (CVPR).

    Each row z-scored: (z − mean(z)) / (ε + std(z)), the standard deviation with Bessel's correction
    (torch's default, as the authors' `normalize`), ε = 1e-7. Applied to both models' logits before the
    temperature, it lets the student match the teacher's logit relations rather than their scale.
    A transfer's `logit_standardization: true` applies it to both sides before any criterion."""
    z = compute_dtype(logits)
    return (z - z.mean(dim=1, keepdim=True)) / (eps + z.std(dim=1, keepdim=True))


@criterion()
def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network".

    τ² · KL(p_t ‖ p_s) with p = softmax(z / τ), summed over classes and averaged over the
    batch (``batchmean``). The τ² keeps the gradient scale independent of τ.
    """
    log_p_s = F.log_softmax(compute_dtype(student_logits) / temperature, dim=1)
    log_p_t = F.log_softmax(compute_dtype(teacher_logits) / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

#: Gap below the row minimum used to mask a logit before a softmax. exp(-1000) underflows
#: to exactly 0 in fp32 and bf16, while ``row_min - 1000`` stays finite for any finite row.
_MASK_GAP = 1000.0


def _mask_logits(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace ``z`` where ``mask`` is True by ``min(row) - 1000`` (finite, softmax weight 0).

    A fixed ``z - 1000`` (as in the DKD code) is not enough when logits are larger than
    1000 in magnitude; anchoring on the row minimum keeps the masked entry at least 1000
    below every other entry whatever the scale, and it never overflows to -inf.
    """
    fill = z.detach().amin(dim=1, keepdim=True) - _MASK_GAP
    return torch.where(mask, fill.expand_as(z), z)


def _target_mask(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Boolean (B, C) mask, True at each row's target class."""
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
    mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    return mask.scatter_(1, target.long().unsqueeze(1), True)


def _binary_log_probs(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log of [p_target, 1 - p_target] for p = softmax(z), computed without cancellation.

    log p_target = z_y - lse(z); log(1 - p_target) = lse(z_{c≠y}) - lse(z).
    """
    lse_all = torch.logsumexp(z, dim=1, keepdim=True)
    log_p_target = (z.masked_fill(~mask, 0.0)).sum(dim=1, keepdim=True) - lse_all
    log_p_other = torch.logsumexp(_mask_logits(z, mask), dim=1, keepdim=True) - lse_all
    return torch.cat([log_p_target, log_p_other], dim=1)


# ---------------------------------------------------------------------------------------
# DKD
# ---------------------------------------------------------------------------------------


@criterion()
def dkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Zhao, Cui, Song, Qiu and Liang 2022, "Decoupled Knowledge Distillation" (CVPR).

    α·TCKD + β·NCKD with p = softmax(z / τ) and y the target class:

    * TCKD = τ² · KL(b_t ‖ b_s), b = [p_y, 1 − p_y] (the binary target / non-target split);
    * NCKD = τ² · KL(p̂_t ‖ p̂_s), p̂ = softmax over the non-target classes only, obtained by
      masking the target logit before the softmax.

    Reduction: each KL is summed over its classes and averaged over the batch (``batchmean``),
    each multiplied by τ². No warm-up here: the paper's min(epoch / 20, 1) ramp is a weight
    schedule applied by the flow.

    Numerics: computed in the input's dtype (half precisions in fp32); log(1 − p_y) comes from a log-sum-exp over the non-target
    logits (no ``log(1 - p)`` cancellation), and the target logit is masked with
    ``min(row) − 1000`` instead of the code's ``z − 1000`` so the mask also holds for
    logits beyond ±1000 and stays finite. With C = 2 the non-target distribution has a
    single class and NCKD is exactly 0.
    """
    z_s = compute_dtype(student_logits) / temperature
    z_t = compute_dtype(teacher_logits) / temperature
    mask = _target_mask(z_s, target)

    log_b_s = _binary_log_probs(z_s, mask)
    log_b_t = _binary_log_probs(z_t, mask)
    tckd = F.kl_div(log_b_s, log_b_t, reduction="batchmean", log_target=True)

    log_q_s = F.log_softmax(_mask_logits(z_s, mask), dim=1)
    log_q_t = F.log_softmax(_mask_logits(z_t, mask), dim=1)
    nckd = F.kl_div(log_q_s, log_q_t, reduction="batchmean", log_target=True)

    return (alpha * tckd + beta * nckd) * temperature**2


# ---------------------------------------------------------------------------------------
# NKD
# ---------------------------------------------------------------------------------------


@criterion()
def nkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 3.0,
    gamma: float = 3.5,
) -> torch.Tensor:
    """Yang, Zeng, Li, Zhang, Yuan and Li 2023, "From Knowledge Distillation to Self-Knowledge Distillation:
    A Unified Approach with Normalized Loss and Customized Soft Labels" (ICCV), normalized KD.

    −mean_i T_y·log S_y  −  γ·τ²·mean_i Σ_{c≠y} T̂_c·log Ŝ_c, with T, S the teacher's and student's softmax
    at τ = 1 (T_y not differentiated) and T̂, Ŝ the softmax at τ over the non-target logits only (the
    target logit removed, not masked). Cross-entropy form as the authors' NKDLoss (yzd-v/cls_KD
    mmcls/models/dis_losses/nkd.py): it differs from a KL by the teacher's entropy, a constant. The
    student's own CE is the method's supervision, not part of this loss."""
    z_s, z_t = compute_dtype(student_logits), compute_dtype(teacher_logits).detach()
    n, c = z_s.shape
    y = target.view(-1, 1)
    s_y = F.log_softmax(z_s, dim=1).gather(1, y)
    t_y = F.softmax(z_t, dim=1).gather(1, y)
    loss_target = -(t_y * s_y).mean()
    keep = ~_target_mask(z_s, target)
    log_q_s = F.log_softmax(z_s[keep].view(n, c - 1) / temperature, dim=1)
    q_t = F.softmax(z_t[keep].view(n, c - 1) / temperature, dim=1)
    loss_non_target = -gamma * temperature**2 * (q_t * log_q_s).sum(dim=1).mean()
    return loss_target + loss_non_target



# ---------------------------------------------------------------------------------------
# WTTM
# ---------------------------------------------------------------------------------------


@criterion()
def wttm(student_logits: torch.Tensor, teacher_logits: torch.Tensor, gamma: float = 0.2) -> torch.Tensor:
    """Zheng and Yang 2024, "Knowledge Distillation Based on Transformed Teacher Matching" (ICLR).

    Weighted transformed teacher matching: the teacher's probabilities raised to the power γ (= 1/T) and
    renormalised, p̃_t = p_t^γ / U with U = Σ_c p_t,c^γ, matched by the student's plain softmax (no
    temperature on the student's side): mean over the batch of U · KL(p̃_t ‖ p_s). U ≥ 1 is larger for a
    flatter teacher, which weights those samples up. No τ² factor.
    """
    p_t = F.softmax(compute_dtype(teacher_logits), dim=1).pow(gamma)
    norm = p_t.sum(dim=1, keepdim=True)
    p_t = p_t / norm
    log_p_s = F.log_softmax(compute_dtype(student_logits), dim=1)
    kl = F.kl_div(log_p_s, p_t, reduction="none").sum(dim=1)
    return (norm.squeeze(1) * kl).mean()


# ---------------------------------------------------------------------------------------
# DIST
# ---------------------------------------------------------------------------------------


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Pearson correlation of matching rows: Σ ā·b̄ / (‖ā‖·‖b̄‖ + eps), ā = a − mean(a)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    # sqrt(x + tiny) keeps the norm's gradient finite when a centred row is all zeros
    # (e.g. a class no sample predicts at extreme logits); the value changes by < 1e-15.
    norm_a = torch.sqrt((a * a).sum(dim=1) + 1e-30)
    norm_b = torch.sqrt((b * b).sum(dim=1) + 1e-30)
    return (a * b).sum(dim=1) / (norm_a * norm_b + eps)


@criterion()
def dist(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 2.0,
    temperature: float = 4.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Huang, You, Wang, Qian and Xu 2022, "Knowledge Distillation from A Stronger Teacher".

    τ² · [β·(1 − 1/B Σ_i ρ(p_s,i, p_t,i)) + γ·(1 − 1/C Σ_c ρ(p_s,:c, p_t,:c))]

    with p = softmax(z / τ) (B × C), ρ the Pearson correlation
    ρ(u, v) = Σ (u − ū)(v − v̄) / (‖u − ū‖·‖v − v̄‖ + eps). The first term is the
    inter-class relation (per sample, across classes), the second the intra-class relation
    (per class, across the batch).

    Reduction: mean of the correlations over samples (inter) and over classes (intra).
    Temperature scaling [check]: τ² multiplies both terms, i.e. the whole loss, as in the
    paper's total loss and the authors' released implementation.
    Defaults [check]: τ = 4, β = γ = 2 are the paper's CIFAR-100 settings (ImageNet uses
    τ = 1, β = γ = 1). Identical inputs give ≈ 0 (exactly 0 up to eps).
    """
    p_s = F.softmax(compute_dtype(student_logits) / temperature, dim=1)
    p_t = F.softmax(compute_dtype(teacher_logits) / temperature, dim=1)
    inter = 1.0 - _pearson_rows(p_s, p_t, eps).mean()
    intra = 1.0 - _pearson_rows(p_s.t(), p_t.t(), eps).mean()
    return (beta * inter + gamma * intra) * temperature**2


# ---------------------------------------------------------------------------------------
# Tf-KD (regularisation variant)
# ---------------------------------------------------------------------------------------


def virtual_teacher_logits(
    target: torch.Tensor,
    num_classes: int,
    correct_prob: float = 0.99,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Log-probabilities of the Tf-KD virtual teacher (Yuan et al. 2020), shape (B, C).

    p^d(k) = a if k = y, (1 − a)/(C − 1) otherwise. Returned as log p^d, i.e. logits whose
    softmax is p^d; softening at τ is then softmax(log p^d / τ) ∝ (p^d)^(1/τ).
    """
    if num_classes < 2:
        raise ValueError("the virtual teacher needs at least 2 classes")
    if not 0.0 < correct_prob < 1.0:
        raise ValueError("correct_prob must be in (0, 1)")
    other = (1.0 - correct_prob) / (num_classes - 1)
    out = torch.full((target.shape[0], num_classes), math.log(other), dtype=dtype, device=target.device)
    return out.scatter_(1, target.long().unsqueeze(1), math.log(correct_prob))


@supervision()
def tfkd_reg(
    student_logits: torch.Tensor,
    target: torch.Tensor,
    correct_prob: float = 0.99,
    temperature: float = 20.0,
) -> torch.Tensor:
    """Yuan, Tay, Li, Wang and Feng 2020, "Revisiting Knowledge Distillation via Label
    Smoothing Regularization" (CVPR): Tf-KD_reg, KD from a hand-designed virtual teacher.

    τ² · KL(p^d_τ ‖ p_τ), p_τ = softmax(z_s / τ), p^d_τ = softmax(log p^d / τ) with
    p^d = a on the true class and (1 − a)/(C − 1) elsewhere (see ``virtual_teacher_logits``).

    Reduction: summed over classes, averaged over the batch (``batchmean``), times τ².
    The published code instead uses ``KLDivLoss()`` (mean over all B·C elements) times a
    ``multiplier`` (e.g. 100 for ResNet18 on CIFAR-100), applies softmax to p^d / τ (the
    probabilities, not their log) and does not soften the student; we follow the paper's
    formula (both sides at τ, the teacher softened as a distribution) and the framework's
    batchmean convention. Reductions alone differ by C·τ² (theirs = batchmean / C, no τ²),
    so a published weight w·multiplier maps to about w·multiplier / (C·τ²) here.
    Defaults [check]: a = 0.99 and τ = 20, the paper's / published CIFAR-100 ResNet18 setting
    (the released configs use τ = 40 for some other architectures).
    """
    z_s = compute_dtype(student_logits)
    log_p_d = virtual_teacher_logits(target, z_s.shape[1], correct_prob, dtype=z_s.dtype)
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    log_p_t = F.log_softmax(log_p_d / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def tfkd_reg_released(
    student_logits: torch.Tensor,
    target: torch.Tensor,
    correct_prob: float = 0.99,
    temperature: float = 20.0,
    multiplier: float = 100.0,
) -> torch.Tensor:
    """Tf-KD_reg's regulariser as the authors' released code computes it (Yuan et al. 2020;
    yuanli2333/Teacher-free-Knowledge-Distillation, ``my_loss_function.loss_kd_regularization``).

    multiplier · (1 / (B·C)) · Σ_{b,k} q_bk · (log q_bk − log p_bk), with the student *unsoftened*,
    p = softmax(z_s), and the teacher q = softmax(p^d / τ): the softmax of the virtual teacher's
    *probabilities* (a on the true class, (1 − a)/(C − 1) elsewhere) divided by τ, so q is close to
    uniform (for a = 0.99, τ = 20, C = 100: 0.0105 on the true class). The mean over all B·C
    elements is ``nn.KLDivLoss()``'s default reduction, i.e. the batch-mean KL divided by C.
    Released CIFAR-100 settings (experiments/base_experiments/*/params.json): ResNet18 α = 0.1,
    τ = 20, multiplier 100; MobileNetV2 α = 0.95, τ = 40, multiplier 1; ShuffleNetV2 α = 0.95,
    τ = 10, multiplier 1; GoogLeNet α = 0.1, τ = 40, multiplier 50.
    """
    z_s = compute_dtype(student_logits)
    num_classes = z_s.shape[1]
    p_d = virtual_teacher_logits(target, num_classes, correct_prob, dtype=z_s.dtype).exp()
    log_q = F.log_softmax(p_d / temperature, dim=1)
    kl = F.kl_div(F.log_softmax(z_s, dim=1), log_q, reduction="batchmean", log_target=True)
    return multiplier * kl / num_classes


# ---------------------------------------------------------------------------------------
# Annealing KD
# ---------------------------------------------------------------------------------------


def annealing_temperature_index(epoch: int, epochs: int, max_temperature: int = 10) -> int:
    """Annealing index k ∈ {1, …, τ_max} for 0-based ``epoch`` of a phase-1 of ``epochs`` epochs.

    The phase is split into τ_max equal chunks: k = ⌊epoch · τ_max / epochs⌋ + 1, so k = 1
    in the first chunk and τ_max in the last (Jafari et al. 2021 anneal the teacher's
    temperature T from τ_max down to 1, i.e. the multiplier 1 − (T − 1)/τ_max = k/τ_max
    rises). Epochs at or past ``epochs`` return τ_max.
    """
    if epochs < 1 or max_temperature < 1:
        raise ValueError("epochs and max_temperature must be >= 1")
    if epoch < 0:
        raise ValueError("epoch must be >= 0 (0-based)")
    return min(epoch * max_temperature // epochs + 1, max_temperature)


def annealing_mse(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature_index: int,
    max_temperature: int = 10,
) -> torch.Tensor:
    """Annealing KD's phase-1 loss at index k: mean((z_s − (k / τ_max) · z_t)²), k = ``temperature_index``
    ∈ 1..τ_max (see ``annealing_temperature_index``). Regression on raw logits: no softmax, no τ² factor.

    Reduction: mean over all B·C elements (``F.mse_loss`` default). Phase 2 (CE only) is
    the flow's business.
    """
    if not 1 <= temperature_index <= max_temperature:
        raise ValueError(f"temperature_index must be in 1..{max_temperature}, got {temperature_index}")
    scale = temperature_index / max_temperature
    return F.mse_loss(compute_dtype(student_logits), scale * compute_dtype(teacher_logits))


@criterion()
def annealing_kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, epoch: int, epochs: int, max_temperature: int = 10
) -> torch.Tensor:
    """Jafari, Rezagholizadeh, Sharma and Ghodsi 2021, "Annealing Knowledge Distillation" (EACL).

    Phase 1 at 0-based `epoch` of a stage of `epochs`: `annealing_mse` at k = `annealing_temperature_index`,
    the teacher's logits scaled by k/τ_max with k rising 1..τ_max over the stage."""
    k = annealing_temperature_index(epoch, epochs, max_temperature)
    return annealing_mse(student_logits, teacher_logits, k, max_temperature)


# ---------------------------------------------------------------------------------------
# Label smoothing
# ---------------------------------------------------------------------------------------


@supervision()
def label_smoothing(student_logits: torch.Tensor, target: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """Szegedy, Vanhoucke, Ioffe, Shlens and Wojna 2016, "Rethinking the Inception
    Architecture for Computer Vision" (label-smoothing regularisation).

    CE(z, q) = −Σ_c q_c log softmax(z)_c with q = (1 − ε)·onehot(y) + ε/C (the uniform
    part includes the true class). No temperature. Reduction: mean over the batch.
    """
    log_p = F.log_softmax(compute_dtype(student_logits), dim=1)
    nll = -log_p.gather(1, target.long().unsqueeze(1)).squeeze(1)
    uniform = -log_p.mean(dim=1)
    return ((1.0 - epsilon) * nll + epsilon * uniform).mean()
