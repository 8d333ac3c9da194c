"""`reviewkd`: Chen, Liu, Zhao and Jia 2021, "Distilling Knowledge via Knowledge Review" (CVPR).

The student's stages, shallow → deep, are fused from deep to shallow by attention-based
fusion blocks (ABF: each level mixes its own 1×1-projected feature with the deeper level's
by two learned spatial attention maps, then a 3×3 conv + BN maps it to the teacher's
channels; `kdflow.losses.ReviewFusion`, a trainable helper of the student), and each fused
level is compared with the teacher's matching stage by the hierarchical context loss
(`kdflow.losses.hcl`: MSE at full size and pooled to 4×4, 2×2, 1×1 with halving weights),
summed over levels. Student loss γ·CE + β·min(epoch/20, 1)·HCL.
One grouped transfer: student taps `stage1, stage2, embedding` (post-ReLU, as the authors)
against the teacher's `stage1_pre, stage2_pre, embedding` (pre-ReLU; the pooled embedding
is the 1×1 deepest level, as in the authors' code). Defaults: β=5 with a 20-epoch linear
warm-up, γ=1, ABF width min(512, deepest student channels). On the 3-stage CIFAR zoo pass
the three stages (`student_taps: [stage1, stage2, stage3, embedding]`, teacher likewise).
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method(
    "reviewkd",
    citation="Chen, Liu, Zhao, Jia 2021. Distilling Knowledge via Knowledge Review. CVPR",
    knowledge="features",
)
def reviewkd(
    teacher: str = "teacher",
    student: str = "student",
    student_taps: list[str] = ("stage1", "stage2", "embedding"),
    teacher_taps: list[str] = ("stage1_pre", "stage2_pre", "embedding"),
    mid_channels: int | None = None,
    weight: float = 5.0,
    warmup_epochs: int = 20,
    ce_weight: float = 1.0,
) -> Graph:
    if len(student_taps) != len(teacher_taps):
        raise ValueError(f"reviewkd: {len(student_taps)} student taps but {len(teacher_taps)} teacher taps")
    transfer = {
        "from": {"group": [f"{teacher}.{tap}" for tap in teacher_taps]},
        "to": {"group": [f"{student}.{tap}" for tap in student_taps]},
        "criterion": "reviewkd",
        "weight": {"value": weight, "warmup_epochs": warmup_epochs} if warmup_epochs else weight,
    }
    if mid_channels is not None:
        transfer["mid_channels"] = mid_channels
    return {
        "nodes": {teacher: {"role": "frozen"}, student: {"role": "trainable"}},
        "supervise": {student: ce_weight},
        "transfers": [transfer],
    }
