"""Feature criteria whose helpers need more than the tap shapes: AB, OFD, FT and ReviewKD.

Each factory builds an nn.Module at flow build time; the module belongs to the target node
(the student): it joins that node's optimizer and checkpoint.

- ``ab`` (grouped): per stage pair, the benchmark's connector on the student (none where the
  shapes already agree) and the activation-boundary loss, the deepest pair weighted 1, halving
  toward the input.
- ``ofd`` (grouped): per stage pair, the student connector (1×1 conv + BN) and the per-channel
  margin, a buffer computed once from the teacher's batch norm that produces the tapped pre-ReLU
  value; the deepest pair weighted 1, halving toward the input.
- ``ft``: the paraphraser (on the teacher's feature) and the translator (on the student's);
  in the paraphraser's stage it trains the paraphraser by reconstruction, elsewhere it
  compares the factors with the paraphraser frozen.
- ``reviewkd`` (grouped): the attention-based fusion of the student's stages and the
  hierarchical context loss against the teacher's stages.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdflow.losses import features as feature_losses
from kdflow.losses.precision import compute_dtype
from kdflow.losses.registry import BuildInfo, criterion
from kdflow.losses.stateful.feature_blocks import Paraphraser, ReviewFusion, Translator, VIDLoss
from kdflow.losses.stateful.feature_blocks import Regressor

__all__: list[str] = []  # the factories are registered criteria; the modules they build are in feature_blocks

_BatchNorm = nn.modules.batchnorm._BatchNorm


# ---------------------------------------------------------------------------------------
# OFD
# ---------------------------------------------------------------------------------------


def batch_norm_before(model: nn.Module, module_name: str) -> tuple[str, nn.Module]:
    """The batch norm that produces the pre-ReLU value of module `module_name`: the module itself
    if it is a batch norm, else the last batch norm among its parent block's direct children
    registered before it (a batch norm inside a shortcut branch is not the main path's)."""
    modules = dict(model.named_modules())
    tapped = modules[module_name]
    if isinstance(tapped, _BatchNorm):
        return module_name, tapped
    parent_name = module_name.rpartition(".")[0]
    parent = modules[parent_name] if parent_name else model
    found: tuple[str, nn.Module] | None = None
    for name, child in parent.named_children():
        if child is tapped:
            break
        if isinstance(child, _BatchNorm):
            found = (f"{parent_name}.{name}" if parent_name else name, child)
    if found is None:
        where = f"block {parent_name!r}" if parent_name else "the model's top level"
        raise ValueError(
            f"ofd: no batch norm before {module_name!r} in {where}; tap the teacher's pre-ReLU value "
            "(a batch norm, or the module right after it in the same block, e.g. stageK_pre)"
        )
    return found


def _depth_weights(n: int) -> list[float]:
    """2^(k+1−n) for k = 0..n−1: the deepest of n stage pairs weighs 1, each shallower one half the next."""
    return [2.0 ** (k + 1 - n) for k in range(n)]


def _as_lists(target_shape, source_shape, what: str, signals: bool = False) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The two sides' shape lists; every shape a feature map C×H×W (or, with `signals`, also C×L)."""
    targets = [tuple(s) for s in target_shape]
    sources = [tuple(s) for s in source_shape]
    for shape in [*targets, *sources]:
        if len(shape) != 3 and not (signals and len(shape) == 2):
            raise ValueError(f"{what} taps feature maps C×H×W{' or C×L' if signals else ''}, got {shape}")
    return targets, sources


# ---------------------------------------------------------------------------------------
# AB
# ---------------------------------------------------------------------------------------


class AB(nn.Module):
    """Heo et al. 2019 (AB): Σ_k 2^(k+1−n) · ab(c_k(s_k), t_k) over the n stage pairs, c_k the connector
    (the identity where the student's map already has the teacher's channels and size). With more taps on
    one side, the deepest ones are paired (the lists' ends)."""

    def __init__(self, student_shapes: list[tuple[int, ...]], teacher_shapes: list[tuple[int, ...]], margin: float) -> None:
        super().__init__()
        self.connectors = nn.ModuleList(
            nn.Identity() if s[:2] == t[:2] else Regressor(s, t, relu=False) for s, t in zip(student_shapes, teacher_shapes)
        )
        self.weights = _depth_weights(len(student_shapes))
        self.margin = float(margin)

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
        n = len(self.connectors)
        students, teachers = list(students)[-n:], list(teachers)[-n:]
        total = students[0].new_zeros(())
        for conn, w, s, t in zip(self.connectors, self.weights, students, teachers):
            total = total + w * feature_losses.ab(conn(s), t, self.margin)
        return total


@criterion(module=True, same_shape=False, grouped=True)
def ab(target_shape: list[tuple[int, ...]], source_shape: list[tuple[int, ...]], build: BuildInfo, margin: float = 1.0) -> nn.Module:
    """AB (Heo et al. 2019): the student's stages (pre-ReLU) against the teacher's, paired from the deepest.

    Connector per pair as the CIFAR-100 benchmark builds it: none when channels and height agree,
    else the `regressor` connector without its ReLU (conv with bias + BN)."""
    targets, sources = _as_lists(target_shape, source_shape, "ab", signals=True)
    n = min(len(targets), len(sources))
    return AB(targets[-n:], sources[-n:], margin)


# ---------------------------------------------------------------------------------------
# OFD
# ---------------------------------------------------------------------------------------


def _ofd_connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
    bn = nn.BatchNorm2d(teacher_channels)
    # OFD's initialisation: He-normal over the output fan, unit-scale zero-shift BN
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_channels))
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


class OFD(nn.Module):
    """Heo et al. 2019 (OFD): per stage pair k, connector_k(F_s) against the teacher's pre-ReLU F_t
    (average-pooled to the student's size where they differ), margin ReLU and partial L2; the pairs
    weighted 2^(k+1−n). With more taps on one side, the deepest ones are paired (the lists' ends)."""

    def __init__(self, student_channels: list[int], teacher_channels: list[int], margins: list[torch.Tensor]) -> None:
        super().__init__()
        self.connectors = nn.ModuleList(_ofd_connector(s, t) for s, t in zip(student_channels, teacher_channels))
        for k, m in enumerate(margins):
            self.register_buffer(f"margin{k}", m.detach().clone())
        self.weights = _depth_weights(len(margins))

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
        n = len(self.connectors)
        students, teachers = list(students)[-n:], list(teachers)[-n:]
        total = students[0].new_zeros(())
        for k, (conn, w, s, t) in enumerate(zip(self.connectors, self.weights, students, teachers)):
            s = conn(s)
            if t.shape[-2:] != s.shape[-2:]:
                t = F.adaptive_avg_pool2d(t, s.shape[-2:])
            total = total + w * feature_losses.ofd(s, t, getattr(self, f"margin{k}").to(s.dtype))
        return total


@criterion(module=True, same_shape=False, grouped=True)
def ofd(
    target_shape: list[tuple[int, ...]],
    source_shape: list[tuple[int, ...]],
    build: BuildInfo,
    margin_fallback_prob: float | None = 0.001,
) -> nn.Module:
    """OFD (Heo et al. 2019): student connectors and the margins from the teacher's batch norms.

    `margin_fallback_prob`: a channel whose negative-response probability is at most this gets the
    margin −3σ, as the authors' code and the CIFAR-100 benchmark do (None: the paper's formula
    everywhere, see `kdflow.losses.ofd_margin`)."""
    targets, sources = _as_lists(target_shape, source_shape, "ofd")
    if build.source_model is None or len(build.source_modules) != len(sources) or None in build.source_modules:
        raise ValueError("ofd needs the teacher's module taps (their batch norms give the margins)")
    n = min(len(targets), len(sources))
    modules = build.source_modules[-n:]
    margins = []
    for module_name, shape in zip(modules, sources[-n:]):
        bn_name, bn = batch_norm_before(build.source_model, module_name)
        if bn.num_features != shape[0] or not bn.affine:
            raise ValueError(
                f"ofd: batch norm {bn_name!r} has {bn.num_features} channels{'' if bn.affine else ' and no affine parameters'}, "
                f"the tapped {module_name!r} has {shape[0]}"
            )
        margins.append(feature_losses.ofd_margin(bn.weight, bn.bias, fallback_prob=margin_fallback_prob))
    return OFD([s[0] for s in targets[-n:]], [s[0] for s in sources[-n:]], margins)


# ---------------------------------------------------------------------------------------
# FT
# ---------------------------------------------------------------------------------------


class FT(nn.Module):
    """Kim et al. 2018 (FT): paraphraser on the teacher's feature, translator on the student's.

    ``forward(student, teacher, stage)``: in stage ``paraphrase_stage`` it returns
    ``reconstruction_weight`` × the paraphraser's reconstruction loss on the (detached) teacher
    feature, and only the paraphraser gets a gradient. In every other stage it returns
    ``kdflow.losses.factor_transfer`` between translator(F_s) and the paraphraser's factor of F_t, the
    paraphraser in eval mode and without gradient (frozen).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        rate: float,
        paraphrase_stage: str,
        reconstruction_p: int,
        reconstruction_weight: float,
    ) -> None:
        super().__init__()
        if reconstruction_p not in (1, 2):
            raise ValueError("ft: reconstruction_p must be 1 or 2")
        self.paraphraser = Paraphraser(teacher_channels, rate=rate)
        self.translator = Translator(student_channels, self.paraphraser.factor_channels)
        self.paraphrase_stage = paraphrase_stage
        self.reconstruction_p = reconstruction_p
        self.reconstruction_weight = float(reconstruction_weight)

    def teacher_factor(self, teacher: torch.Tensor) -> torch.Tensor:
        """The frozen paraphraser's factor of the teacher feature (eval mode, no gradient)."""
        was_training = self.paraphraser.training
        self.paraphraser.eval()
        try:
            with torch.no_grad():
                return self.paraphraser.encode(compute_dtype(teacher))
        finally:
            self.paraphraser.train(was_training)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, stage: str) -> torch.Tensor:
        if stage == self.paraphrase_stage:
            recon = self.paraphraser.reconstruction_loss(compute_dtype(teacher.detach()), p=self.reconstruction_p)
            return self.reconstruction_weight * recon
        factor_t = self.teacher_factor(teacher)
        factor_s = self.translator(compute_dtype(student))
        return feature_losses.factor_transfer(factor_s, factor_t)


@criterion(module=True, same_shape=False, context=("stage",), stage_params=("paraphrase_stage",))
def ft(
    target_shape: tuple[int, ...],
    source_shape: tuple[int, ...],
    build: BuildInfo,
    rate: float = 0.5,
    paraphrase_stage: str = "paraphrase",
    reconstruction_p: int = 2,
    reconstruction_weight: float = 1.0 / 200.0,
) -> nn.Module:
    """FT (Kim et al. 2018). `reconstruction_weight` scales the paraphraser's loss so that, times the
    transfer's weight (β = 200), the paraphraser trains on a unit-weight reconstruction loss (MSE, p = 2,
    the benchmark's). Factors of different spatial sizes are pooled to the smaller one."""
    if len(target_shape) != 3 or len(source_shape) != 3:
        raise ValueError(f"ft taps feature maps C×H×W, got {target_shape} and {source_shape}")
    return FT(target_shape[0], source_shape[0], rate, paraphrase_stage, reconstruction_p, reconstruction_weight)


# ---------------------------------------------------------------------------------------
# ReviewKD
# ---------------------------------------------------------------------------------------


def _as_map(x: torch.Tensor) -> torch.Tensor:
    """B×D (a pooled embedding) as a B×D×1×1 map; feature maps unchanged."""
    return x.view(*x.shape, 1, 1) if x.dim() == 2 else x


class ReviewKD(nn.Module):
    """Chen et al. 2021 (ReviewKD): ``ReviewFusion`` of the student's stages, then ``hcl`` against the teacher's.

    The levels pair from the deepest: with n = the shorter list's length, the last n taps of each side."""

    def __init__(self, student_channels: list[int], teacher_channels: list[int], out_sizes: list[tuple[int, int]], mid_channels: int) -> None:
        super().__init__()
        self.fusion = ReviewFusion(student_channels, teacher_channels, mid_channels)
        self.out_sizes = [tuple(s) for s in out_sizes]
        self.levels = len(student_channels)

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
        n = self.levels
        fused = self.fusion([_as_map(compute_dtype(s)) for s in students[-n:]], self.out_sizes)
        return feature_losses.hcl(fused, [_as_map(compute_dtype(t)) for t in teachers[-n:]])


@criterion(module=True, same_shape=False, grouped=True)
def reviewkd(
    target_shape: list[tuple[int, ...]],
    source_shape: list[tuple[int, ...]],
    build: BuildInfo,
    mid_channels: int | None = None,
) -> nn.Module:
    """ReviewKD (Chen et al. 2021): student stages shallow → deep against the teacher's matching stages.

    A 1-d tap (the pooled embedding) counts as a 1×1 map. When one side lists more taps (a teacher
    with more stages than the student), the levels pair from the deepest and the other side's
    shallowest extra taps are not used (the benchmark pairs have equal counts). `mid_channels`
    defaults to min(512, channels of the deepest student tap), as in the authors' code.
    """
    n = min(len(target_shape), len(source_shape))
    target_shape, source_shape = list(target_shape)[-n:], list(source_shape)[-n:]
    for shape in [*target_shape, *source_shape]:
        if len(shape) not in (1, 3):
            raise ValueError(f"reviewkd taps feature maps C×H×W or embeddings D, got {shape}")
    s_channels = [s[0] for s in target_shape]
    t_channels = [s[0] for s in source_shape]
    sizes = [tuple(s[1:]) if len(s) == 3 else (1, 1) for s in source_shape]
    mid = mid_channels if mid_channels is not None else min(512, s_channels[-1])
    return ReviewKD(s_channels, t_channels, sizes, mid)


# ---------------------------------------------------------------------------------------
# VID
# ---------------------------------------------------------------------------------------


@criterion(module=True, same_shape=False)
def vid(target_shape: tuple[int, ...], source_shape: tuple[int, ...], build: BuildInfo, init_variance: float = 5.0, eps: float = 1e-5) -> nn.Module:
    """VID (Ahn et al. 2019): a Gaussian with a learned mean regressor and learned per-channel variance."""
    if len(target_shape) != 3 or len(source_shape) != 3:
        raise ValueError(f"vid taps feature maps C×H×W, got {target_shape} and {source_shape}")
    return VIDLoss(target_shape[0], source_shape[0], init_variance=init_variance, eps=eps)
