"""Losses on relations between samples: knowledge read off the geometry of a batch.

Every function here compares a student and a teacher *batch* (B samples each) through
B×B (or B×B×B) relation matrices, so the two may have different feature sizes; only the
batch sizes must agree. Each computes in its input's dtype (half precisions in float32).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdflow.losses.precision import compute_dtype
from kdflow.losses.registry import criterion

__all__ = [
    "cc",
    "cc_benchmark",
    "pkt",
    "rkd",
    "rkd_angle",
    "rkd_distance",
    "sp",
]

#: Floor for squared norms / distances before a square root: keeps the gradient of the
#: square root finite (1 / (2·1e-6)) where two vectors coincide or one is zero.
_SQ_EPS = 1e-12


def _check_batches(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"batch sizes differ: student {student.shape[0]}, teacher {teacher.shape[0]}")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return compute_dtype(x).reshape(x.shape[0], -1)


def _safe_norm(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Euclidean norm with a finite gradient at 0 (value sqrt(1e-12) for a zero vector)."""
    return torch.sqrt((x * x).sum(dim=dim, keepdim=keepdim).clamp_min(_SQ_EPS))


# ---------------------------------------------------------------------------------------
# SP
# ---------------------------------------------------------------------------------------


@criterion(same_shape=False)
def sp(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Tung and Mori 2019, "Similarity-Preserving Knowledge Distillation" (ICCV).

    Q = features flattened per sample (B × CHW), G = Q·Qᵀ (B × B), G̃ = G with each row
    L2-normalised; loss = ‖G̃_s − G̃_t‖²_F / B².

    Reduction: squared Frobenius norm divided by B² (the paper's 1/b²); no temperature.
    Student and teacher may differ in C, H, W; only B must agree. The paper's Eq. sums
    this over layer pairs; call once per pair and sum in the flow.
    """
    _check_batches(student_feature, teacher_feature)
    q_s, q_t = _flat(student_feature), _flat(teacher_feature)
    g_s = F.normalize(q_s @ q_s.t(), p=2, dim=1)
    g_t = F.normalize(q_t @ q_t.t(), p=2, dim=1)
    batch = q_s.shape[0]
    return ((g_s - g_t) ** 2).sum() / batch**2


# ---------------------------------------------------------------------------------------
# RKD
# ---------------------------------------------------------------------------------------


def _pairwise(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diff[i, j] = e_i − e_j (B × B × D) and the Euclidean distances (B × B).

    Distances are sqrt(max(d², 1e-12)), then set to exactly 0 where d² ≤ 1e-12, so
    coinciding embeddings give distance 0 with a finite (zero) gradient.
    """
    diff = e.unsqueeze(1) - e.unsqueeze(0)
    d2 = (diff * diff).sum(dim=2)
    d = torch.sqrt(d2.clamp_min(_SQ_EPS))
    return diff, torch.where(d2 > _SQ_EPS, d, torch.zeros_like(d))


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    """Off-diagonal pairwise distances divided by their mean, flattened (B·(B−1),)."""
    _, d = _pairwise(e)
    batch = e.shape[0]
    off = ~torch.eye(batch, dtype=torch.bool, device=e.device)
    d = d[off]
    return d / d.mean().clamp_min(math.sqrt(_SQ_EPS))


def rkd_distance(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """Distance-wise RKD (Park, Kim, Lu and Cho 2019, "Relational Knowledge Distillation", CVPR).

    ψ_D(e_i, e_j) = ‖e_i − e_j‖₂ / μ, μ = mean of ‖e_i − e_j‖₂ over the pairs i ≠ j;
    loss = mean over ordered pairs i ≠ j of SmoothL1_β=1(ψ_D(s), ψ_D(t)).

    Reduction [check]: mean over the B·(B−1) off-diagonal pairs. The paper writes a sum
    over pairs; the authors' code averages over all B² entries including the zero
    diagonal, which is (B − 1)/B times our value (0.98 at B = 64). No temperature.
    Embeddings are flattened per sample; B ≥ 2.
    """
    _check_batches(student_embedding, teacher_embedding)
    if student_embedding.shape[0] < 2:
        raise ValueError("rkd_distance needs a batch of at least 2")
    psi_s = _normalised_distances(_flat(student_embedding))
    psi_t = _normalised_distances(_flat(teacher_embedding))
    return F.smooth_l1_loss(psi_s, psi_t, beta=1.0, reduction="mean")


def _angles(e: torch.Tensor) -> torch.Tensor:
    """cos[j, i, k] = ⟨u_ij, u_kj⟩ with u_ij = (e_i − e_j)/‖e_i − e_j‖ (angle at the middle e_j).

    A zero difference (coinciding embeddings) gives u = 0, hence cosine 0, with a finite
    gradient.
    """
    diff, _ = _pairwise(e)  # diff[i, j] = e_i − e_j
    u = diff / _safe_norm(diff, dim=2, keepdim=True)
    u = u.transpose(0, 1)  # u[j, i] = unit(e_i − e_j)
    return torch.bmm(u, u.transpose(1, 2))


def _distinct_triplets(batch: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(batch, device=device)
    j, i, k = idx.view(-1, 1, 1), idx.view(1, -1, 1), idx.view(1, 1, -1)
    return (i != j) & (k != j) & (i != k)


def rkd_angle(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """Angle-wise RKD (Park, Kim, Lu and Cho 2019, "Relational Knowledge Distillation", CVPR).

    ψ_A(e_i, e_j, e_k) = cos∠e_i e_j e_k = ⟨u_ij, u_kj⟩, u_ij = (e_i − e_j)/‖e_i − e_j‖₂;
    loss = mean over triplets of SmoothL1_β=1(ψ_A(s), ψ_A(t)).

    Reduction [check]: mean over the B·(B−1)·(B−2) ordered triplets of pairwise distinct
    indices. Degenerate index triplets (i = j, k = j: zero vectors; i = k: cosine 1) have
    equal student and teacher values and add nothing but count; the authors' code averages
    over all B³ of them, which is (B−1)(B−2)/B² times our value (0.95 at B = 64).
    A batch smaller than 3 has no triplet and gives 0. No temperature.
    """
    _check_batches(student_embedding, teacher_embedding)
    e_s, e_t = _flat(student_embedding), _flat(teacher_embedding)
    batch = e_s.shape[0]
    if batch < 3:
        return (e_s.sum() + e_t.sum()) * 0.0
    mask = _distinct_triplets(batch, e_s.device)
    return F.smooth_l1_loss(_angles(e_s)[mask], _angles(e_t)[mask], beta=1.0, reduction="mean")


@criterion(same_shape=False)
def rkd(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """Park, Kim, Lu and Cho 2019, "Relational Knowledge Distillation" (CVPR).

    w_d · ``rkd_distance`` + w_a · ``rkd_angle`` with the paper's w_d = 25, w_a = 50
    (Huber δ = 1 in both terms). See those functions for the formulas and reductions.
    Usually applied to the pooled (penultimate) embedding.
    """
    loss_d = rkd_distance(student_embedding, teacher_embedding)
    loss_a = rkd_angle(student_embedding, teacher_embedding)
    return distance_weight * loss_d + angle_weight * loss_a


# ---------------------------------------------------------------------------------------
# PKT
# ---------------------------------------------------------------------------------------


def _cosine_conditional(e: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows of (cos + 1)/2 normalised to sum 1: p_{j|i} (B × B)."""
    e = e / (_safe_norm(e, dim=1, keepdim=True) + eps)
    k = (e @ e.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


@criterion(same_shape=False)
def pkt(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Passalis and Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge
    Transfer" (ECCV).

    With cosine-similarity kernel K(a, b) = (cos(a, b) + 1)/2 ∈ [0, 1] and the conditional
    probabilities p_{j|i} = K(e_i, e_j) / Σ_k K(e_i, e_k) for the teacher (p) and the
    student (q):  loss = 1/B Σ_i Σ_j p_{j|i} · log((p_{j|i} + eps) / (q_{j|i} + eps)),
    i.e. KL(teacher ‖ student) per anchor i.

    Reduction [check]: summed over j (each row is one distribution) and averaged over the
    anchors i (``batchmean``, the framework's KL convention; the paper's Eq. sums over i
    as well, i.e. B × our value). The authors' code averages over all B² entries, B times
    smaller than ours: its weight β = 30000 corresponds to β = 30000 / B here (≈ 469 at
    B = 64). The j = i term is kept in the normalisation (as in the authors' code; the
    paper's t-SNE-style definition excludes it). Rows are L2-normalised with norm + eps.
    No temperature.
    """
    _check_batches(student_embedding, teacher_embedding)
    q = _cosine_conditional(_flat(student_embedding), eps)
    p = _cosine_conditional(_flat(teacher_embedding), eps)
    kl = p * torch.log((p + eps) / (q + eps))
    return kl.sum() / p.shape[0]


# ---------------------------------------------------------------------------------------
# CC
# ---------------------------------------------------------------------------------------


def _rbf_taylor_correlation(e: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """Σ_{p=0}^{P} e^(−2γ) (2γ)^p / p! · (ê_i·ê_j)^p on L2-normalised rows ê (B × B)."""
    e = e / _safe_norm(e, dim=1, keepdim=True)
    g = e @ e.t()
    out = torch.zeros_like(g)
    for p in range(order + 1):
        out = out + math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) * g**p
    return out


def cc(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    gamma: float = 0.4,
    order: int = 2,
) -> torch.Tensor:
    """Peng, Jin, Liu, Li, Wu, Liu, Zhou and Zhang 2019, "Correlation Congruence for
    Knowledge Distillation" (ICCV).

    ψ(E)_ij = k(ê_i, ê_j), the Gaussian RBF k(a, b) = exp(−γ‖a − b‖²) = e^(−2γ)·e^(2γ aᵀb)
    for unit vectors, replaced by its P-th order Taylor expansion
    Σ_{p=0}^{P} e^(−2γ) (2γ)^p / p! · (aᵀb)^p; loss = ‖ψ(E_s) − ψ(E_t)‖²_F / B².

    Defaults: γ = 0.4, P = 2 (the paper's RBF setting). The embeddings ê are the rows
    L2-normalised here [check]: the expansion exp(−γ‖a−b‖²) = e^(−2γ)e^(2γaᵀb) holds only
    for unit vectors. The 128-d linear embedding in front is a connector owned by the flow.
    Reduction [check]: mean of the squared differences over the B² entries (the paper's
    1/n² normalisation). No temperature.
    """
    _check_batches(student_embedding, teacher_embedding)
    if order < 0:
        raise ValueError("order must be >= 0")
    k_s = _rbf_taylor_correlation(_flat(student_embedding), gamma, order)
    k_t = _rbf_taylor_correlation(_flat(teacher_embedding), gamma, order)
    return ((k_s - k_t) ** 2).mean()


def cc_benchmark(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """The correlation-congruence loss of the CIFAR-100 benchmark (RepDistiller's ``Correlation``,
    which its code says came from the authors of Peng et al. 2019, "Correlation Congruence for
    Knowledge Distillation", ICCV).

    With δ_i = |e_s,i − e_t,i| (element-wise, the i-th sample's embeddings):
    loss = 1/(B − 1) Σ_{i=1}^{B−1} ⟨δ_i, δ_{i+1}⟩, the inner products of neighbouring samples'
    absolute differences in batch order. It is not the paper's kernel form (``cc``); the
    benchmark's weight β = 0.02 is for this one. The embeddings must have the same size
    (both sides go through 128-d linear embeddings first). B ≥ 2. No temperature.
    """
    _check_batches(student_embedding, teacher_embedding)
    e_s, e_t = _flat(student_embedding), _flat(teacher_embedding)
    if e_s.shape != e_t.shape:
        raise ValueError(f"cc_benchmark compares embeddings of one size, got {tuple(e_s.shape)} and {tuple(e_t.shape)}")
    if e_s.shape[0] < 2:
        raise ValueError("cc_benchmark needs a batch of at least 2")
    delta = (e_s - e_t).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()
