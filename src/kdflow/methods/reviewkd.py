"""`reviewkd`: Chen, Liu, Zhao and Jia 2021, "Distilling Knowledge via Knowledge Review" (CVPR).

The student's stages, shallow → deep, are fused from deep to shallow by attention-based
fusion blocks (ABF: each level mixes its own 1×1-projected feature with the deeper level's
by two learned spatial attention maps, then a 3×3 conv + BN maps it to the teacher's
channels; `kdflow.losses.ReviewFusion`, a trainable helper of the student), and each fused
level is compared with the teacher's matching stage by the hierarchical context loss
(`kdflow.losses.hcl`: MSE at full size and pooled to 4×4, 2×2, 1×1 with halving weights),
summed over levels. Student loss γ·CE + β·w(e)·HCL, w the warm-up factor below.
One grouped transfer: every student stage, post-activation, and the pooled embedding (as a 1×1
map, the deepest level) against the teacher's stages before their last activation and its pooled
embedding: `all_stages, embedding` vs `all_stages_pre, embedding`, i.e. the benchmark's
`feats[1:]` + pooled vs `preact_feats[1:]` + pooled (mdistiller's ReviewKD with STU_PREACT
False; 4 levels on the CIFAR ResNets, 5 on VGG / MobileNetV2). Each fused level takes the
teacher level's channels and spatial size. Defaults: β=5 (mdistiller's configs/cifar100/
reviewkd.yaml) with a 20-epoch linear warm-up min((e+1)/20, 1) for the 0-based epoch e (mdistiller
counts epochs from 1), γ=1, ABF width min(512, channels of the student's embedding).
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "reviewkd",
    citation="Chen, Liu, Zhao, Jia 2021. Distilling Knowledge via Knowledge Review. CVPR",
    knowledge="features",
)
def reviewkd(
    teacher: str = "teacher",
    student: str = "student",
    student_taps: list[str] = ("all_stages", "embedding"),
    teacher_taps: list[str] = ("all_stages_pre", "embedding"),
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
    return teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[transfer],
    )
