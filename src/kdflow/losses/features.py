"""Losses on intermediate feature maps: knowledge read off what a network computes inside.

Every function here is a plain function of tensors. Trainable helpers (regressors,
connectors, paraphrasers, fusion blocks) are modules owned by the flow, see
``kdflow.losses.stateful``; these functions only compare what they are given.

Feature maps are B×C×H×W. All computations are in fp32. Where a method compares maps of
different spatial sizes, the larger one is reduced with ``adaptive_avg_pool2d`` to the
smaller size (per dimension: the common size is (min H, min W)), which is what the
published benchmark implementations do before computing AT / FSP / NST / VID.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdflow.losses.precision import compute_dtype
from kdflow.losses.registry import criterion

__all__ = [
    "ab",
    "at",
    "attention_map",
    "factor_map",
    "factor_transfer",
    "fsp",
    "fsp_matrix",
    "hcl",
    "hint",
    "match_spatial",
    "nst",
    "ofd",
    "ofd_margin",
]

#: Floor for squared norms before a square root (finite gradient at 0).
_SQ_EPS = 1e-12


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _check_4d(*features: torch.Tensor) -> None:
    for f in features:
        if f.dim() != 4:
            raise ValueError(f"expected a B×C×H×W feature map, got shape {tuple(f.shape)}")


def _check_batches(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a.shape[0]} and {b.shape[0]}")


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student and teacher shapes differ ({tuple(student.shape)} vs {tuple(teacher.shape)}); "
            "put a connector in front of the student"
        )


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool ``a`` and/or ``b`` (B×C×H×W) to their common size (min H, min W).

    A map already at that size is returned unchanged; only the larger one is pooled.
    """
    _check_4d(a, b)
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if tuple(a.shape[-2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[-2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


# ---------------------------------------------------------------------------------------
# FitNet
# ---------------------------------------------------------------------------------------


@criterion()
def hint(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Romero, Ballas, Kahou, Chassang, Gatta and Bengio 2015, "FitNets: Hints for Thin Deep
    Nets" (ICLR).

    loss = mean over all elements of (r(F_s) − F_t)², where ``student_feature`` is already
    r(F_s): the regressor r is a connector owned by the flow, not part of this function.

    Reduction: mean over all B·C·H·W elements (``F.mse_loss`` default; the paper's
    ½‖·‖² differs by a constant factor absorbed in β). Shapes must be equal.
    """
    _check_same_shape(student_feature, teacher_feature, "hint")
    return F.mse_loss(compute_dtype(student_feature), compute_dtype(teacher_feature))


# ---------------------------------------------------------------------------------------
# AT
# ---------------------------------------------------------------------------------------


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention map of Zagoruyko and Komodakis 2017: A = mean_c |F_c|^p, flattened
    per sample (B × H·W) and L2-normalised per sample (``F.normalize``, eps 1e-12, so an
    all-zero map stays zero with a finite gradient).
    """
    _check_4d(feature)
    a = compute_dtype(feature).abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(a, p=2, dim=1)


@criterion(same_shape=False)
def at(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko and Komodakis 2017, "Paying More Attention to Attention: Improving the
    Performance of Convolutional Neural Networks via Attention Transfer" (ICLR).

    Q = mean_c |F_c|^p flattened, A = Q / ‖Q‖₂ (``attention_map``);
    loss = mean over batch and positions of (A_s − A_t)².

    Reduction [check]: the mean of the squared difference over B·H·W, the form of the
    published benchmark code whose β = 1000 the framework's methods table uses (the
    authors' code also averages the squared difference, with weight β/2). The paper
    writes β/2 · ‖A_s − A_t‖_p per sample (a norm, not squared); with that form β = 1000
    would be far too large, so we take the mean of squares.
    One call per stage pair; sum over stages in the flow.
    Channels may differ (the map averages them out). Spatial sizes [check]: if they
    differ, the larger feature is adaptive-average-pooled to the smaller size *before*
    the attention map is computed (as in the benchmark code).
    """
    _check_batches(student_feature, teacher_feature)
    fs, ft = match_spatial(compute_dtype(student_feature), compute_dtype(teacher_feature))
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


# ---------------------------------------------------------------------------------------
# FSP
# ---------------------------------------------------------------------------------------


def fsp_matrix(feature_a: torch.Tensor, feature_b: torch.Tensor) -> torch.Tensor:
    """Flow-of-solution-procedure matrix of Yim et al. 2017: G_ij = 1/(H·W) Σ_{h,w}
    F1_i(h,w)·F2_j(h,w), shape B × C1 × C2.

    If the two maps differ in spatial size, the larger is adaptive-average-pooled to the
    smaller one first (the paper pairs maps of equal size; between stages of different
    resolution this is the benchmark's choice).
    """
    _check_batches(feature_a, feature_b)
    fa, fb = match_spatial(compute_dtype(feature_a), compute_dtype(feature_b))
    hw = fa.shape[-2] * fa.shape[-1]
    return torch.einsum("bihw,bjhw->bij", fa, fb) / hw


@criterion(same_shape=False, grouped=True)
def fsp(student_layers: Sequence[torch.Tensor], teacher_layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Yim, Joo, Bae and Kim 2017, "A Gift from Knowledge Distillation: Fast Optimization,
    Network Minimization and Transfer Learning" (CVPR).

    For each pair of consecutive layers (F_k, F_k+1) of the lists (two layers: one pair),
    G = ``fsp_matrix``(F_k, F_k+1) for the student and the teacher;
    loss = Σ_k mean over B·C_k·C_k+1 of (G_s,k − G_t,k)² (λ = 1 for every pair).

    Reduction: mean over all entries of each matrix, summed over the pairs (the CIFAR-100
    benchmark's; the paper's 1/N Σ_x λ ‖G_s − G_t‖²₂ sums the C1·C2 entries, i.e. C1·C2 × ours
    per pair). Student and teacher must give Gram matrices of the same shape (equal channels
    at every layer); their spatial sizes may differ.
    """
    if len(student_layers) != len(teacher_layers) or len(student_layers) < 2:
        raise ValueError(f"fsp needs two equally long lists of at least two layers, got {len(student_layers)} and {len(teacher_layers)}")
    c_s, c_t = [f.shape[1] for f in student_layers], [f.shape[1] for f in teacher_layers]
    if c_s != c_t:
        raise ValueError(f"fsp needs equal channel counts at every layer: student {c_s}, teacher {c_t}")
    total: torch.Tensor | None = None
    for k in range(len(student_layers) - 1):
        g_s = fsp_matrix(student_layers[k], student_layers[k + 1])
        g_t = fsp_matrix(teacher_layers[k], teacher_layers[k + 1])
        _check_same_shape(g_s, g_t, "fsp (Gram matrices, i.e. channel counts)")
        term = (g_s - g_t).pow(2).mean()
        total = term if total is None else total + term
    assert total is not None
    return total


# ---------------------------------------------------------------------------------------
# NST
# ---------------------------------------------------------------------------------------


@criterion(same_shape=False)
def nst(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Huang and Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity
    Transfer" (arXiv:1707.01219).

    Each channel's spatial map is flattened and L2-normalised: f^i ∈ R^{HW}. With the
    polynomial kernel k(x, y) = (xᵀy)² (d = 2, c = 0, the paper's best variant), the
    squared MMD between the sets of student and teacher channel maps is
    1/C_s² Σ_{i,i'} k(s^i, s^i') + 1/C_t² Σ_{j,j'} k(t^j, t^j') − 2/(C_s·C_t) Σ_{i,j} k(s^i, t^j),
    i.e. means over channel pairs; loss = mean of that over the batch.

    Channel counts may differ. Spatial sizes must match for the inner products; if they do
    not, the larger map is adaptive-average-pooled to the smaller size first [check].
    """
    _check_batches(student_feature, teacher_feature)
    fs, ft = match_spatial(compute_dtype(student_feature), compute_dtype(teacher_feature))
    s = F.normalize(fs.flatten(2), p=2, dim=2)
    t = F.normalize(ft.flatten(2), p=2, dim=2)

    def kernel_mean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, y.transpose(1, 2)).pow(2).mean()

    return kernel_mean(s, s) + kernel_mean(t, t) - 2.0 * kernel_mean(s, t)


# ---------------------------------------------------------------------------------------
# AB
# ---------------------------------------------------------------------------------------


def ab(student_preact: torch.Tensor, teacher_preact: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Heo, Lee, Yun and Choi 2019, "Knowledge Transfer via Distillation of Activation
    Boundaries Formed by Hidden Neurons" (AAAI).

    The paper's differentiable surrogate of the activation-transfer loss, on pre-ReLU
    responses s (student, after its connector) and t (teacher), with ρ(t) = 1[t > 0]:
    ‖ρ(t) ⊙ max(m − s, 0) + (1 − ρ(t)) ⊙ max(m + s, 0)‖²₂,
    i.e. (m − s)² where the teacher neuron is active and s < m, (m + s)² where it is
    inactive (t ≤ 0) and s > −m, 0 elsewhere.

    Reduction: the squared L2 norm is summed over all C·H·W elements of a sample
    (the paper's per-sample loss) and averaged over the batch (sum / B), as the CIFAR-100
    benchmark does before its own factor 3/1000 (the `ab` method's weight). Zero exactly when
    s ≥ m wherever t > 0 and s ≤ −m wherever t ≤ 0. Shapes must be equal.
    """
    _check_same_shape(student_preact, teacher_preact, "ab")
    s, t = compute_dtype(student_preact), compute_dtype(teacher_preact)
    positive = t > 0
    hinge = torch.where(positive, F.relu(margin - s), F.relu(margin + s))
    return hinge.pow(2).sum() / s.shape[0]


# ---------------------------------------------------------------------------------------
# OFD
# ---------------------------------------------------------------------------------------


def ofd_margin(
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    fallback_prob: float | None = None,
) -> torch.Tensor:
    """Per-channel margin of Heo et al. 2019 (OFD) from the teacher's batch norm before ReLU.

    The pre-ReLU response of channel c is modelled as x ~ N(μ = β_c, σ = |γ_c|) (the BN
    affine parameters). The margin is the expected negative response
    m_c = E[x | x < 0] = μ − σ · φ(μ/σ) / Φ(−μ/σ),
    with φ, Φ the standard normal pdf and cdf.

    Tiny negative probability [check]: the paper gives only this formula, and we follow it
    for every channel, evaluated stably in float64 (φ/Φ as exp(log φ − log Φ) with
    ``torch.special.log_ndtr``), so m → 0⁻ as Φ(−μ/σ) → 0. The authors' released code
    instead returns −3σ when Φ(−μ/σ) ≤ 0.001; pass ``fallback_prob=0.001`` to reproduce
    that. A channel with σ = 0 gets m = min(μ, 0) (the limit of the formula).
    Returns a detached tensor with the dtype and device of ``bn_bias``.
    """
    if bn_weight.shape != bn_bias.shape or bn_weight.dim() != 1:
        raise ValueError("bn_weight and bn_bias must be 1-d tensors of the same length")
    mu = bn_bias.detach().double()
    sigma = bn_weight.detach().double().abs()
    degenerate = sigma == 0
    safe_sigma = torch.where(degenerate, torch.ones_like(sigma), sigma)
    alpha = mu / safe_sigma
    log_prob_neg = torch.special.log_ndtr(-alpha)
    log_pdf = -0.5 * alpha * alpha - 0.5 * math.log(2.0 * math.pi)
    margin = mu - safe_sigma * torch.exp(log_pdf - log_prob_neg)
    if fallback_prob is not None:
        margin = torch.where(log_prob_neg.exp() <= fallback_prob, -3.0 * sigma, margin)
    margin = torch.where(degenerate, mu.clamp(max=0.0), margin)
    return margin.to(dtype=bn_bias.dtype, device=bn_bias.device)


def ofd(student_feature: torch.Tensor, teacher_preact: torch.Tensor, margin: torch.Tensor | float) -> torch.Tensor:
    """Heo, Kim, Yun, Park, Kwak and Choi 2019, "A Comprehensive Overhaul of Feature
    Distillation" (ICCV).

    Teacher transform: margin ReLU t' = max(t, m_c) per channel (m from ``ofd_margin``);
    student: connector output s (pre-ReLU position). Partial L2 distance:
    d = Σ_i (s_i − t'_i)² over the elements where NOT (s_i ≤ t'_i and t'_i ≤ 0), i.e. the
    student is not penalised for being below a non-positive teacher target (ReLU would
    cut both anyway).

    Reduction: sum over all C·H·W elements, divided by the batch size B (the methods
    table's β = 1e-3 assumes this sum / B). ``margin`` is a (C,) tensor broadcast over
    channels, or a scalar. Shapes of student and teacher must be equal.
    Zero when s = t' everywhere, and when s ≤ t' wherever t' ≤ 0 with s = t' elsewhere.
    """
    _check_same_shape(student_feature, teacher_preact, "ofd")
    s, t = compute_dtype(student_feature), compute_dtype(teacher_preact)
    m = torch.as_tensor(margin, dtype=t.dtype, device=t.device).detach()
    if m.dim() == 1:
        if m.shape[0] != t.shape[1]:
            raise ValueError(f"margin has {m.shape[0]} entries, teacher has {t.shape[1]} channels")
        m = m.view(1, -1, *([1] * (t.dim() - 2)))
    target = torch.maximum(t, m)
    keep = (s > target) | (target > 0)
    return ((s - target).pow(2) * keep).sum() / s.shape[0]


# ---------------------------------------------------------------------------------------
# FT
# ---------------------------------------------------------------------------------------


def factor_map(factor: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """The compared form of an FT factor (B×C×H×W): mean over channels of F^power, flattened per
    sample (B × H·W) and L2-normalised per sample (``F.normalize``, eps 1e-12)."""
    _check_4d(factor)
    return F.normalize(compute_dtype(factor).pow(power).mean(dim=1).flatten(1), p=2, dim=1)


def factor_transfer(student_factor: torch.Tensor, teacher_factor: torch.Tensor, p: float = 1.0, power: float = 2.0) -> torch.Tensor:
    """Kim, Park and Kwak 2018, "Paraphrasing Complex Network: Network Compression via
    Factor Transfer" (NeurIPS), in the form of the CIFAR-100 benchmark (RepDistiller's
    ``FactorTransfer``, whose defaults are power 2 and p = 1).

    F_T = paraphraser factor of the teacher's feature, F_S = translator output of the student
    (B×C×H×W, equal channels); each is reduced to A = ``factor_map``(F, power), the per-sample
    L2-normalised channel mean of F^power; loss = mean over B·H·W of |A_S − A_T|^p.

    The paper writes the distance ‖F_T/‖F_T‖₂ − F_S/‖F_S‖₂‖_p between whole vectorised
    factors; the benchmark's β = 200 goes with the form here. If the spatial sizes differ,
    the larger factor is adaptive-average-pooled to the smaller size first (as the benchmark
    does). Zero when the two maps are equal, with a finite gradient.
    """
    _check_batches(student_factor, teacher_factor)
    fs, ft = match_spatial(compute_dtype(student_factor), compute_dtype(teacher_factor))
    diff = (factor_map(fs, power) - factor_map(ft, power)).abs()
    return diff.mean() if p == 1 else diff.pow(p).mean()


# ---------------------------------------------------------------------------------------
# ReviewKD: hierarchical context loss
# ---------------------------------------------------------------------------------------

#: Pyramid levels (output sizes) of the hierarchical context loss after the full-size term.
HCL_LEVELS: tuple[int, ...] = (4, 2, 1)


def hcl(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chen, Liu, Zhao and Jia 2021, "Distilling Knowledge via Knowledge Review" (CVPR):
    the hierarchical context loss (HCL).

    For each pair (F_s, F_t) of equal shape B×C×H×W:
    L = Σ_k w_k · MSE(P_k(F_s), P_k(F_t)) / Σ_k w_k,
    with P_0 the identity (full size, w_0 = 1) and P_k adaptive average pooling to the
    pyramid levels 4×4, 2×2, 1×1 (k = 1, 2, 3), the weight halving at each level
    (1, 0.5, 0.25, 0.125) and normalised by the sum of the weights used.
    MSE is the mean over all elements. The loss is summed over the pairs (lists
    shallow→deep or any order, matched by position).

    Levels not smaller than the map [check]: a level whose pooled size (min(l, H),
    min(l, W)) equals (H, W) would repeat the full-size term and is skipped, and the
    halving continues over the levels actually used (as in the authors' code); e.g. a
    4×4 map uses sizes 4×4, 2×2, 1×1 with weights 1, 0.5, 0.25 / 1.75.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(f"{len(student_features)} student features but {len(teacher_features)} teacher features")
    if len(student_features) == 0:
        raise ValueError("hcl needs at least one feature pair")
    total: torch.Tensor | None = None
    for fs, ft in zip(student_features, teacher_features):
        _check_4d(fs, ft)
        _check_same_shape(fs, ft, "hcl")
        fs, ft = compute_dtype(fs), compute_dtype(ft)
        h, w = fs.shape[-2:]
        loss = F.mse_loss(fs, ft)
        weight, weight_sum = 1.0, 1.0
        for level in HCL_LEVELS:
            size = (min(level, h), min(level, w))
            if size == (h, w):
                continue
            weight /= 2.0
            weight_sum += weight
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
        loss = loss / weight_sum
        total = loss if total is None else total + loss
    assert total is not None
    return total
