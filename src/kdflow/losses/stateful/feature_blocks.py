"""Feature-distillation helpers with parameters: small ``nn.Module``s.

They are trainable helpers in the sense of the framework's conventions: they belong to the
node they help (the student) and join its optimizer; the teacher stays frozen. Pure loss
formulas live in ``kdflow.losses.features``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdflow.losses.features import match_spatial
from kdflow.losses.precision import compute_dtype

__all__ = ["ABF", "Paraphraser", "Regressor", "ReviewFusion", "Translator", "VIDLoss"]

# ---------------------------------------------------------------------------------------
# VID
# ---------------------------------------------------------------------------------------


class VIDLoss(nn.Module):
    """Ahn, Hu, Damianou, Lawrence and Dai 2019, "Variational Information Distillation for
    Knowledge Transfer" (CVPR).

    The teacher feature t is modelled as Gaussian given the student feature s:
    q(t | s) = Π_{c,h,w} N(t_{c,h,w}; μ_{c,h,w}(s), σ_c²), with

    * μ(s) = a regressor of three 1×1 convolutions with ReLU between them:
      Conv1×1(C_s → C_h) → ReLU → Conv1×1(C_h → C_h) → ReLU → Conv1×1(C_h → C_t), without
      biases (as in the CIFAR-100 benchmark's code), C_h = ``hidden_channels`` (default: C_t,
      as there);
    * σ_c² = softplus(a_c) + eps, one learned a_c per teacher channel, initialised to
      a_c = log(exp(init_variance − eps) − 1) so that σ² starts at ``init_variance``.

    Per element, −log q = (t − μ)² / (2σ_c²) + ½ log σ_c² (+ ½ log 2π, a constant left out).

    Reduction [check]: ``reduction="mean"`` (default) averages over all B·C·H·W elements,
    as the benchmark code does, and goes with its β = 1; ``reduction="sum"`` gives the
    paper's / methods table's Σ_{c,h,w}, averaged over the batch (C·H·W × the mean).
    Spatial sizes [check]: if the student and teacher maps differ, the larger one is
    adaptive-average-pooled to the smaller size (before the regressor for the student).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        hidden_channels: int | None = None,
        init_variance: float = 5.0,
        eps: float = 1e-5,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if init_variance <= eps:
            raise ValueError("init_variance must be larger than eps")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        hidden = teacher_channels if hidden_channels is None else hidden_channels
        self.eps = float(eps)
        self.reduction = reduction
        self.regressor = nn.Sequential(
            nn.Conv2d(student_channels, hidden, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, teacher_channels, kernel_size=1, bias=False),
        )
        init = math.log(math.expm1(init_variance - eps))
        self.variance_param = nn.Parameter(torch.full((teacher_channels,), init))

    def variance(self) -> torch.Tensor:
        """σ_c² = softplus(a_c) + eps, shape (C_t,)."""
        return F.softplus(self.variance_param) + self.eps

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(compute_dtype(student_feature), compute_dtype(teacher_feature))
        mu = self.regressor(s)
        if mu.shape != t.shape:
            raise ValueError(f"regressor output {tuple(mu.shape)} does not match teacher {tuple(t.shape)}")
        var = self.variance().view(1, -1, 1, 1)
        nll = 0.5 * ((t - mu).pow(2) / var + torch.log(var))
        if self.reduction == "mean":
            return nll.mean()
        return nll.sum() / nll.shape[0]


# ---------------------------------------------------------------------------------------
# FT: paraphraser and translator
# ---------------------------------------------------------------------------------------


class Regressor(nn.Module):
    """The convolutional regressor of the CIFAR-100 benchmark's FitNet (Romero et al. 2015,
as built by RepDistiller's and mdistiller's ``ConvReg``): a convolution with bias whose shape follows
the two maps' spatial sizes (1×1 at equal size, 3×3 stride 2 from twice the size, 4×4 stride-2
transposed from half the size, else a valid (1 + ΔH)×(1 + ΔW) kernel), then batch norm, then ReLU
(``relu=False`` leaves the ReLU out: the benchmark's AB connector).

    Conv (with bias, chosen by the spatial sizes) → BN → ReLU (optional); maps C_s×H_s×W_s to C_t×H_t×W_t
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



def _conv_block(cin: int, cout: int, batch_norm: bool, transposed: bool = False) -> list[nn.Module]:
    conv_cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    conv = conv_cls(cin, cout, kernel_size=3, stride=1, padding=1)
    return [conv, nn.BatchNorm2d(cout), nn.LeakyReLU(0.1)] if batch_norm else [conv, nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """Paraphraser of Kim, Park and Kwak 2018, "Paraphrasing Complex Network: Network
    Compression via Factor Transfer" (NeurIPS): a convolutional autoencoder on the teacher's
    feature map whose code is the "factor".

    Encoder: three 3×3 convolutions C → C → k·C → k·C; decoder: three 3×3 transposed
    convolutions k·C → k·C → C → C; each with bias and followed by LeakyReLU(0.1), with batch
    norm before it only if ``batch_norm`` (off by default, as the CIFAR-100 benchmark builds its
    paraphraser); stride 1 and padding 1 throughout, so the spatial size is kept. k is the
    paraphrase rate: ``factor_channels`` defaults to ⌊rate · channels⌋ (at least 1; the paper's
    k = 0.5 on CIFAR); an explicit ``factor_channels`` wins over ``rate``.

    ``forward(x)`` returns the factor (the encoder output) used by ``factor_transfer``;
    ``reconstruction_loss(x)`` is the pretraining objective (decoder(encoder(x)) vs x).
    """

    def __init__(self, channels: int, factor_channels: int | None = None, rate: float = 0.5, batch_norm: bool = False) -> None:
        super().__init__()
        if factor_channels is None:
            factor_channels = max(1, int(rate * channels))
        self.channels = channels
        self.factor_channels = factor_channels
        self.encoder = nn.Sequential(
            *_conv_block(channels, channels, batch_norm),
            *_conv_block(channels, factor_channels, batch_norm),
            *_conv_block(factor_channels, factor_channels, batch_norm),
        )
        self.decoder = nn.Sequential(
            *_conv_block(factor_channels, factor_channels, batch_norm, transposed=True),
            *_conv_block(factor_channels, channels, batch_norm, transposed=True),
            *_conv_block(channels, channels, batch_norm, transposed=True),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, factor: torch.Tensor) -> torch.Tensor:
        return self.decoder(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def reconstruction_loss(self, x: torch.Tensor, p: int = 2) -> torch.Tensor:
        """Pretraining loss: mean over all elements of |decode(encode(x)) − x|^p; p = 2 (MSE, the
        CIFAR-100 benchmark's) by default, p = 1 for L1."""
        if p not in (1, 2):
            raise ValueError("p must be 1 or 2")
        recon = self.decode(self.encode(x))
        x = x.to(recon.dtype)
        return F.l1_loss(recon, x) if p == 1 else F.mse_loss(recon, x)


class Translator(nn.Module):
    """Translator of Kim et al. 2018 (FT): maps the student's feature map to the factor space.

    Three 3×3 convolutions C_s → C_s → F → F (F = ``factor_channels``, the paraphraser's
    factor width), each with bias, batch norm (``batch_norm``, on by default as in the
    benchmark) and LeakyReLU(0.1); stride 1, padding 1.
    """

    def __init__(self, in_channels: int, factor_channels: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(
            *_conv_block(in_channels, in_channels, batch_norm),
            *_conv_block(in_channels, factor_channels, batch_norm),
            *_conv_block(factor_channels, factor_channels, batch_norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---------------------------------------------------------------------------------------
# ReviewKD: attention-based fusion
# ---------------------------------------------------------------------------------------


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="nearest")


class ABF(nn.Module):
    """Attention-based fusion block of Chen, Liu, Zhao and Jia 2021, "Distilling Knowledge via
    Knowledge Review" (CVPR).

    x (student stage, C_in channels) → Conv1×1(C_in → C_mid) + BN = y. If ``fuse``, the
    residual r from the deeper level (C_mid channels) is resized (nearest) to y's spatial
    size, a 1×1 conv on [y, r] (2·C_mid → 2 channels) + sigmoid gives two attention maps
    a₀, a₁, and y ← y·a₀ + r·a₁. y is then resized (nearest) to ``out_size`` if given,
    and Conv3×3(C_mid → C_out) + BN gives the output aligned with the teacher stage.

    ``forward(x, residual=None, out_size=None)`` returns (output, y); y is the residual
    passed to the next (shallower) level. The two main convs are initialised with
    ``kaiming_uniform_(a=1)``, as in the paper's code.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.fuse = bool(fuse)
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channels),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.att_conv: nn.Module | None = None
        if self.fuse:
            self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid())
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        out_size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("this ABF fuses a residual from the deeper level; none was given")
            r = _resize(residual, tuple(y.shape[-2:]))
            att = self.att_conv(torch.cat([y, r], dim=1))
            y = y * att[:, 0:1] + r * att[:, 1:2]
        elif residual is not None:
            raise ValueError("this ABF was built with fuse=False and takes no residual")
        if out_size is not None:
            y = _resize(y, tuple(out_size))
        return self.conv2(y), y


class ReviewFusion(nn.Module):
    """ReviewKD's review mechanism (Chen et al. 2021): one ``ABF`` per student stage.

    ``forward(student_features, out_sizes=None)`` takes the student's stage features
    shallow → deep and processes them deep → shallow: the deepest stage goes through its
    ABF alone (no fusion), every shallower stage fuses the residual of the level below.
    Stage i's output has ``teacher_channels[i]`` channels and spatial size
    ``out_sizes[i]`` (default: the student stage's own size); the list is returned
    shallow → deep, aligned with the teacher's stages for ``hcl``.
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int], mid_channels: int) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels) or len(student_channels) == 0:
            raise ValueError("student_channels and teacher_channels must be non-empty and of the same length")
        n = len(student_channels)
        self.abfs = nn.ModuleList(
            ABF(cs, mid_channels, ct, fuse=i < n - 1)
            for i, (cs, ct) in enumerate(zip(student_channels, teacher_channels))
        )

    def forward(
        self,
        student_features: Sequence[torch.Tensor],
        out_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[torch.Tensor]:
        n = len(self.abfs)
        if len(student_features) != n:
            raise ValueError(f"expected {n} student features, got {len(student_features)}")
        if out_sizes is not None and len(out_sizes) != n:
            raise ValueError(f"expected {n} output sizes, got {len(out_sizes)}")
        outputs: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        residual: torch.Tensor | None = None
        for i in reversed(range(n)):
            size = None if out_sizes is None else out_sizes[i]
            outputs[i], residual = self.abfs[i](student_features[i], residual, size)
        return outputs
