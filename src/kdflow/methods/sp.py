"""`sp`: Tung and Mori 2019, "Similarity-Preserving Knowledge Distillation" (ICCV).

Student loss γ·CE + β·‖G̃_s − G̃_t‖²_F / B², G̃ the row-L2-normalised B×B Gram matrix of the
flattened feature maps (`kdflow.losses.sp`). Defaults (../shared/methods.md): β=3000, γ=1,
the last feature map. The default tap `stage2` on both sides is the last stage of the
2-stage `convnet_s` student and the teacher's stage of the same resolution; on the 3-stage
CIFAR zoo pass `teacher_tap: stage3, student_tap: stage3` (the benchmark's last stage).
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method(
    "sp",
    citation="Tung, Mori 2019. Similarity-Preserving Knowledge Distillation. ICCV",
    knowledge="relations",
)
def sp(
    teacher: str = "teacher",
    student: str = "student",
    teacher_tap: str = "stage2",
    student_tap: str = "stage2",
    weight: float = 3000.0,
    ce_weight: float = 1.0,
) -> Graph:
    return {
        "nodes": {teacher: {"role": "frozen"}, student: {"role": "trainable"}},
        "supervise": {student: ce_weight},
        "transfers": [{"from": f"{teacher}.{teacher_tap}", "to": f"{student}.{student_tap}", "criterion": "sp", "weight": weight}],
    }
