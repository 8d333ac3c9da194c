"""`eskd`: Cho and Hariharan 2019, "On the Efficacy of Knowledge Distillation" (ICCV).

Hinton KD from an early-stopped teacher: the teacher's checkpoint is one of the teacher run's
per-epoch snapshots (`train.save_epochs` keeps `nodes/teacher-epochE.pt`), and the KD term can
itself stop at epoch `stop_kd_epoch` (its weight drops to 0 there; CE continues).
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method("eskd", citation="Cho, Hariharan 2019. On the Efficacy of Knowledge Distillation", knowledge="logits")
def eskd(
    teacher: str = "teacher",
    student: str = "student",
    temperature: float = 4.0,
    ce_weight: float = 0.1,
    kd_weight: float = 0.9,
    stop_kd_epoch: int | None = None,
) -> Graph:
    weight = kd_weight if stop_kd_epoch is None else {"value": kd_weight, "milestones": [stop_kd_epoch], "gamma": 0.0}
    return teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[
            {"from": f"{teacher}.logits", "to": f"{student}.logits", "criterion": "kd", "temperature": temperature, "weight": weight}
        ],
    )
