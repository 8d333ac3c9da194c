"""`sp`: Tung and Mori 2019, "Similarity-Preserving Knowledge Distillation" (ICCV).

Student loss γ·CE + β·‖G̃_s − G̃_t‖²_F / B², G̃ the row-L2-normalised B×B Gram matrix of the
flattened feature maps (`kdflow.losses.sp`). Defaults: β=3000, γ=1, and each model's last
stage (``last_stage``), the benchmark's choice on the CIFAR zoo (RepDistiller's ``feat[-2]``,
``-b 3000``). The two maps may differ in shape: only the batch sizes must agree.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "sp",
    citation="Tung, Mori 2019. Similarity-Preserving Knowledge Distillation. ICCV",
    knowledge="relations",
)
def sp(
    teacher: str = "teacher",
    student: str = "student",
    teacher_tap: str = "last_stage",
    student_tap: str = "last_stage",
    weight: float = 3000.0,
    ce_weight: float = 1.0,
) -> Graph:
    return teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[{"from": f"{teacher}.{teacher_tap}", "to": f"{student}.{student_tap}", "criterion": "sp", "weight": weight}],
    )
