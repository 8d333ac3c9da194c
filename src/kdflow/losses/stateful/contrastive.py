"""Contrastive distillation: CRD with momentum memory banks and class-aware negative sampling."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CRDLoss"]

CRD_MODES = ("exact", "relax", "uniform")
CRD_FORMS = ("auto", "matmul", "gather")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (parity checks); float16/bfloat16 compute in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class CRDLoss(nn.Module):
    """Tian, Krishnan and Isola 2020, "Contrastive Representation Distillation" (ICLR).

    Embeddings: v_s = normalize(W_s·e_s + b_s), v_t = normalize(W_t·e_t + b_t) (linear maps
    of the flattened student / teacher embeddings to ``feat_dim``, then L2 norm). Two memory
    banks, ``memory_s`` and ``memory_t`` (num_data × feat_dim, registered buffers, saved in the
    state_dict / checkpoint), hold one entry per training sample, initialised uniformly in
    [−1/√(d/3), 1/√(d/3)].

    Contrast set of sample b (dataset index i_b, label y_b): one positive and N = ``num_negatives``
    negatives, ``contrast[b] = [positive, n_1 … n_N]`` (column 0 the positive):

    * ``mode="exact"`` (the paper's setting): the positive is i_b itself; the negatives are drawn
      uniformly from the samples of the *other* classes, without replacement when N is at most
      their number and with replacement otherwise;
    * ``mode="relax"``: the positive is a random sample of class y_b (possibly i_b), negatives as in
      ``exact``;
    * ``mode="uniform"``: positive i_b, negatives uniform over all M samples with replacement
      (no labels needed; a draw may hit the positive or its class).

    ``exact`` and ``relax`` need the training split's labels (``train_labels``).

    NCE, student side (anchor v_s, the teacher bank): with e(v, w) = exp(vᵀw / τ) / Z_s,
    c = N / M (N noise samples at the noise probability 1/M) and ε = 1e-7 (``eps``),
    L_s = −1/B Σ_b [ log(e⁺ / (e⁺ + c + ε)) + Σ_k log(c / (e_k⁻ + c + ε)) ].
    The teacher side is the same with anchor v_t and the student bank (same contrast set); the
    loss is L_s + L_t. Z_s (Z_t) = M · the mean of exp(vᵀw / τ) over all B·(N+1) pairs of the
    first batch, computed once without gradient and kept in the buffers ``z_s`` / ``z_t``
    (−1 until set). Logs are taken in closed form (``logaddexp``).

    After the loss, in training mode only, the banks are updated under ``no_grad`` at the batch's
    own indices i_b: memory[i] ← normalize(m · memory[i] + (1 − m) · v), m = ``momentum``
    (memory_s from v_s, memory_t from v_t). Gradients reach the anchors, never the banks.

    Scores: ``form="matmul"`` computes v · bankᵀ for the whole bank (B × M) and picks the contrast
    columns; ``"gather"`` gathers the B·(N+1) bank rows first. They give the same values; matmul is
    the faster one while M is a few times N (CIFAR: M = 50 000, N = 16 384), gather when M ≫ N.
    ``"auto"`` picks matmul when M ≤ 4·(N + 1).

    ``forward(student_emb, teacher_emb, indices, contrast_indices=None, generator=None)``:
    ``indices`` (B,) are the samples' dataset indices; ``contrast_indices`` (B, N+1), positive
    first, replace the drawn set (tests and parity checks; ``use_contrast`` sets them for the next
    call only); otherwise ``sample_contrast`` draws them with ``generator``.
    """

    # rows indexed by dataset index: multi-process runs all-gather each step's rows (engine/distributed.py)
    per_sample_buffers = ("memory_s", "memory_t")

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
        train_labels: torch.Tensor | None = None,
        mode: str = "exact",
        form: str = "auto",
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        if num_data < 1 or num_negatives < 1:
            raise ValueError("num_data and num_negatives must be >= 1")
        if mode not in CRD_MODES:
            raise ValueError(f"mode must be one of {', '.join(CRD_MODES)}, got {mode!r}")
        if form not in CRD_FORMS:
            raise ValueError(f"form must be one of {', '.join(CRD_FORMS)}, got {form!r}")
        self.num_data = int(num_data)
        self.feat_dim = int(feat_dim)
        self.num_negatives = int(num_negatives)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.mode = mode
        self.eps = float(eps)
        self.form = form if form != "auto" else ("matmul" if num_data <= 4 * (num_negatives + 1) else "gather")
        self.embed_s = nn.Linear(student_dim, feat_dim)
        self.embed_t = nn.Linear(teacher_dim, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3.0)
        for name in ("memory_s", "memory_t"):
            bank = torch.rand(num_data, feat_dim, generator=generator) * (2.0 * stdv) - stdv
            self.register_buffer(name, bank)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self._set_labels(train_labels)
        self.given_contrast: torch.Tensor | None = None

    def _set_labels(self, labels: torch.Tensor | None) -> None:
        """The per-class index of the training split (data, not state: non-persistent buffers)."""
        if labels is None:
            if self.mode != "uniform":
                raise ValueError(
                    f"crd mode {self.mode!r} draws negatives from the other classes and needs the training "
                    "split's labels (train_labels); or set mode: uniform"
                )
            labels = torch.zeros(0, dtype=torch.long)
        elif labels.shape != (self.num_data,):
            raise ValueError(f"train_labels must have shape ({self.num_data},), got {tuple(labels.shape)}")
        labels = labels.detach().long().cpu()
        counts = torch.bincount(labels) if labels.numel() else torch.zeros(0, dtype=torch.long)
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)  # indices grouped by class
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)

    # -- pieces ---------------------------------------------------------------------------

    def embed_student(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1).to(_compute_dtype(x))
        return F.normalize(self.embed_s(x), p=2, dim=1)

    def embed_teacher(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1).to(_compute_dtype(x))
        return F.normalize(self.embed_t(x), p=2, dim=1)

    def use_contrast(self, contrast: torch.Tensor) -> None:
        """Use `contrast` (B, N+1), positive first, at the next call instead of drawing (tests, parity checks)."""
        self.given_contrast = contrast

    def sample_contrast(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, N+1) dataset indices: the positive, then N negatives, drawn as ``mode`` says."""
        device = self.memory_s.device
        idx = indices.long().to(device)
        batch, n = idx.shape[0], self.num_negatives

        def rand(*shape: int) -> torch.Tensor:
            gen_device = generator.device if generator is not None else device
            return torch.rand(*shape, generator=generator, device=gen_device).to(device)

        if self.mode == "uniform":
            neg = (rand(batch, n) * self.num_data).long().clamp_(max=self.num_data - 1)
            return torch.cat([idx.unsqueeze(1), neg], dim=1)
        cls = self.labels[idx]
        start, count = self.class_start[cls], self.class_count[cls]
        others = self.num_data - count  # how many negatives each sample can draw from
        if bool((others < 1).any()):
            raise ValueError("crd: a sample's class holds the whole training split; there are no negatives")
        if n <= int(others.min()):
            # without replacement: the n smallest of uniform keys over the other classes' samples
            keys = rand(batch, self.num_data)
            keys.masked_fill_(self.labels.unsqueeze(0) == cls.unsqueeze(1), 2.0)
            neg = keys.topk(n, dim=1, largest=False, sorted=False).indices
        else:
            neg = torch.empty(batch, n, dtype=torch.long, device=device)
            few = others < n  # with replacement where a class has too few negatives, as the reference decides per sample
            u = (rand(batch, n) * others.unsqueeze(1)).long().minimum(others.unsqueeze(1) - 1)
            pos_in_order = u + (u >= start.unsqueeze(1)).long() * count.unsqueeze(1)  # skip the own class's block
            neg[few] = self.order[pos_in_order[few]]
            if bool((~few).any()):
                keys = rand(int((~few).sum()), self.num_data)
                keys.masked_fill_(self.labels.unsqueeze(0) == cls[~few].unsqueeze(1), 2.0)
                neg[~few] = keys.topk(n, dim=1, largest=False, sorted=False).indices
        if self.mode == "relax":
            u = (rand(batch) * count).long().minimum(count - 1)
            positive = self.order[start + u]
        else:
            positive = idx
        return torch.cat([positive.unsqueeze(1), neg], dim=1)

    def _scores(self, anchor: torch.Tensor, bank: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
        """vᵀw / τ for every (anchor b, contrast entry k): (B, N+1). The bank is a buffer: no gradient."""
        bank = bank.to(anchor.dtype)
        if self.form == "matmul":
            return (anchor @ bank.t()).gather(1, contrast) / self.temperature
        return torch.bmm(bank[contrast], anchor.unsqueeze(2)).squeeze(2) / self.temperature

    def _side_loss(self, scores: torch.Tensor, z_name: str) -> torch.Tensor:
        z = getattr(self, z_name)
        if float(z) <= 0:
            with torch.no_grad():
                z.fill_(float(scores.detach().double().exp().mean() * self.num_data))
        log_e = scores - math.log(float(z))
        c = self.num_negatives / self.num_data
        log_denominator = torch.logaddexp(log_e, log_e.new_tensor(math.log(c + self.eps)))
        log_h_pos = log_e[:, 0] - log_denominator[:, 0]
        log_one_minus_h_neg = math.log(c) - log_denominator[:, 1:]
        return -(log_h_pos.sum() + log_one_minus_h_neg.sum()) / scores.shape[0]

    @torch.no_grad()
    def _update(self, name: str, indices: torch.Tensor, v: torch.Tensor) -> None:
        bank = getattr(self, name)
        mixed = bank[indices] * self.momentum + v.detach().to(bank.dtype) * (1.0 - self.momentum)
        if self.form == "matmul":
            # the scores' backward reads the whole bank: write a new tensor rather than change that one
            setattr(self, name, bank.index_copy(0, indices, F.normalize(mixed, p=2, dim=1)))
        else:
            bank.index_copy_(0, indices, F.normalize(mixed, p=2, dim=1))

    # -- forward --------------------------------------------------------------------------

    def forward(
        self,
        student_emb: torch.Tensor,
        teacher_emb: torch.Tensor,
        indices: torch.Tensor,
        contrast_indices: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        batch = student_emb.shape[0]
        if teacher_emb.shape[0] != batch or indices.shape != (batch,):
            raise ValueError("student_emb, teacher_emb and indices must share the batch size (indices 1-d)")
        idx = indices.long().to(self.memory_s.device)
        if contrast_indices is None and self.given_contrast is not None:
            contrast_indices, self.given_contrast = self.given_contrast, None
        if contrast_indices is None:
            contrast = self.sample_contrast(idx, generator)
        else:
            contrast = contrast_indices.long().to(self.memory_s.device)
            if contrast.shape != (batch, self.num_negatives + 1):
                raise ValueError(f"contrast_indices must have shape ({batch}, {self.num_negatives + 1}): the positive, then the negatives")

        v_s = self.embed_student(student_emb)
        v_t = self.embed_teacher(teacher_emb)
        loss = self._side_loss(self._scores(v_s, self.memory_t, contrast), "z_s") + self._side_loss(
            self._scores(v_t, self.memory_s, contrast), "z_t"
        )
        if self.training:
            self._update("memory_s", idx, v_s)
            self._update("memory_t", idx, v_t)
        return loss
