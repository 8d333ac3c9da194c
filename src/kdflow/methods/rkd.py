"""`rkd`: Park, Kim, Lu and Cho 2019, "Relational Knowledge Distillation" (CVPR).

Student loss γ·CE + β·(w_d·L_dist + w_a·L_angle) on the pooled embeddings (`kdflow.losses.rkd`):
L_dist the Huber loss between pairwise distances divided by their mean, L_angle the Huber
loss between the cosines of the angles of all triplets. Defaults (../shared/methods.md):
w_d=25, w_a=50, β=1, γ=1, the penultimate embedding (the input of the last linear layer).
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "rkd",
    citation="Park, Kim, Lu, Cho 2019. Relational Knowledge Distillation. CVPR",
    knowledge="relations",
)
def rkd(
    teacher: str = "teacher",
    student: str = "student",
    teacher_tap: str = "embedding",
    student_tap: str = "embedding",
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    weight: float = 1.0,
    ce_weight: float = 1.0,
) -> Graph:
    return teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[
            {
                "from": f"{teacher}.{teacher_tap}",
                "to": f"{student}.{student_tap}",
                "criterion": "rkd",
                "distance_weight": distance_weight,
                "angle_weight": angle_weight,
                "weight": weight,
            }
        ],
    )
