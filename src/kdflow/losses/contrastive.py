"""Contrastive distillation: CRD with momentum memory banks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CRDLoss(nn.Module):
    """Tian, Krishnan and Isola 2020, "Contrastive Representation Distillation" (ICLR).

    Embeddings: v_s = normalize(W_s·e_s + b_s), v_t = normalize(W_t·e_t + b_t) (linear maps
    of the flattened student / teacher embeddings to ``feat_dim``, then L2 norm). Two memory
    banks of unit-ish vectors, ``memory_s`` and ``memory_t`` (num_data × feat_dim, registered
    buffers, so they are saved in the state_dict / checkpoint), hold one entry per training
    sample, initialised uniformly in [−1/√(d/3), 1/√(d/3)].

    NCE, student side (anchor v_s, samples from the teacher bank): for sample b with dataset
    index i_b, the positive is memory_t[i_b] and the N = ``num_negatives`` negatives are
    memory_t[j], j drawn uniformly with replacement from {0, …, M−1} (M = ``num_data``; the
    noise distribution P_n = 1/M, so a draw may hit i_b). With
    e(v, w) = exp(vᵀw / τ) / Z_s and the critic h(v, w) = e / (e + N/M) (the paper's
    h = exp(·/τ) / (exp(·/τ) + N/M) with the partition function Z made explicit):
    L_s = −1/B Σ_b [ log h(v_s,b, w⁺) + Σ_{k=1}^{N} log(1 − h(v_s,b, w_k⁻)) ].
    The teacher side is the same with anchor v_t and the student bank (same indices), and
    the returned loss is L_s + L_t (two-sided, as in the paper's code).

    Normaliser: Z_s (Z_t) = M · mean of exp(vᵀw / τ) over all B·(N+1) pairs of the first
    batch, computed once (no gradient) and then kept fixed in the buffers ``z_s`` / ``z_t``
    (−1 until estimated; saved with the state_dict). Logs are taken in closed form
    (log h = log e − logaddexp(log e, log(N/M))), so no eps is needed.

    After the loss, and only in training mode, the banks are updated under ``no_grad`` for
    the batch's indices: memory[i] ← normalize(m · memory[i] + (1 − m) · v) with
    m = ``momentum`` (memory_s from v_s, memory_t from v_t). Gradients reach the anchors
    (and so the student, the teacher-side linear head and the student-side head), never
    the banks. Repeated indices within a batch: the last write wins.

    ``forward(student_emb, teacher_emb, indices, generator=None, contrast_indices=None)``:
    ``indices`` (B,) are the samples' dataset indices; negatives are drawn with
    ``torch.randint(0, M, (B, N), generator=generator)`` on the generator's device
    (``sample_negatives``) unless ``contrast_indices`` (B, N) are given.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_data: int,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_data < 1 or num_negatives < 1:
            raise ValueError("num_data and num_negatives must be >= 1")
        self.num_data = int(num_data)
        self.feat_dim = int(feat_dim)
        self.num_negatives = int(num_negatives)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.embed_s = nn.Linear(student_dim, feat_dim)
        self.embed_t = nn.Linear(teacher_dim, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3.0)
        for name in ("memory_s", "memory_t"):
            bank = torch.rand(num_data, feat_dim, generator=generator) * (2.0 * stdv) - stdv
            self.register_buffer(name, bank)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))

    # -- pieces ---------------------------------------------------------------------------

    def embed_student(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed_s(x.float().flatten(1)), p=2, dim=1)

    def embed_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed_t(x.float().flatten(1)), p=2, dim=1)

    def sample_negatives(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch, N) indices drawn uniformly with replacement from {0, …, M−1}."""
        device = generator.device if generator is not None else self.memory_s.device
        idx = torch.randint(0, self.num_data, (batch, self.num_negatives), generator=generator, device=device)
        return idx.to(self.memory_s.device)

    def _side_loss(self, anchor: torch.Tensor, bank: torch.Tensor, contrast: torch.Tensor, z_name: str) -> torch.Tensor:
        weights = bank[contrast]  # (B, N+1, d), a buffer: no gradient
        logits = torch.bmm(weights, anchor.unsqueeze(2)).squeeze(2) / self.temperature  # (B, N+1)
        z = getattr(self, z_name)
        if float(z) <= 0:
            with torch.no_grad():
                z.fill_(float(logits.detach().double().exp().mean() * self.num_data))
        log_e = logits - torch.log(z.to(logits.dtype))
        log_c = math.log(self.num_negatives / self.num_data)
        log_c_t = torch.full_like(log_e, log_c)
        log_denominator = torch.logaddexp(log_e, log_c_t)
        log_h_pos = log_e[:, 0] - log_denominator[:, 0]
        log_one_minus_h_neg = log_c - log_denominator[:, 1:]
        return -(log_h_pos.sum() + log_one_minus_h_neg.sum()) / anchor.shape[0]

    @torch.no_grad()
    def _update(self, bank: torch.Tensor, indices: torch.Tensor, v: torch.Tensor) -> None:
        mixed = bank[indices] * self.momentum + v.detach().to(bank.dtype) * (1.0 - self.momentum)
        bank.index_copy_(0, indices, F.normalize(mixed, p=2, dim=1))

    # -- forward --------------------------------------------------------------------------

    def forward(
        self,
        student_emb: torch.Tensor,
        teacher_emb: torch.Tensor,
        indices: torch.Tensor,
        generator: torch.Generator | None = None,
        contrast_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = student_emb.shape[0]
        if teacher_emb.shape[0] != batch or indices.shape != (batch,):
            raise ValueError("student_emb, teacher_emb and indices must share the batch size (indices 1-d)")
        idx = indices.long().to(self.memory_s.device)
        if contrast_indices is None:
            neg = self.sample_negatives(batch, generator)
        else:
            neg = contrast_indices.long().to(self.memory_s.device)
            if neg.shape != (batch, self.num_negatives):
                raise ValueError(f"contrast_indices must have shape ({batch}, {self.num_negatives})")
        contrast = torch.cat([idx.unsqueeze(1), neg], dim=1)

        v_s = self.embed_student(student_emb)
        v_t = self.embed_teacher(teacher_emb)
        loss = self._side_loss(v_s, self.memory_t, contrast, "z_s") + self._side_loss(v_t, self.memory_s, contrast, "z_t")

        if self.training:
            self._update(self.memory_s, idx, v_s)
            self._update(self.memory_t, idx, v_t)
        return loss
