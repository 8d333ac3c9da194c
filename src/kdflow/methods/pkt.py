"""`pkt`: Passalis and Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge
Transfer" (ECCV).

Student loss γ·CE + β·KL(P_t ‖ P_s) between the conditional distributions
p_{j|i} ∝ (cos(e_i, e_j) + 1)/2 of the pooled embeddings (`kdflow.losses.pkt`: the KL
summed over j and averaged over the anchors i, the framework's `batchmean` convention).
Defaults: γ=1, the penultimate embedding, and β = 30000/64 = 468.75: the methods table's
β=30000 is the benchmark's, whose loss averages over all B² entries, i.e. is our loss / B;
at its batch size B=64 that weight is 30000/64 on our scale (see `kdflow.losses.pkt`).
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "pkt",
    citation="Passalis, Tefas 2018. Learning Deep Representations with Probabilistic Knowledge Transfer. ECCV",
    knowledge="relations",
)
def pkt(
    teacher: str = "teacher",
    student: str = "student",
    teacher_tap: str = "embedding",
    student_tap: str = "embedding",
    weight: float = 30000.0 / 64,
    ce_weight: float = 1.0,
) -> Graph:
    return teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[{"from": f"{teacher}.{teacher_tap}", "to": f"{student}.{student_tap}", "criterion": "pkt", "weight": weight}],
    )
