"""`nst`: Huang and Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer" (arXiv:1707.01219).

Student loss γ·CE + Σ_k β·MMD²_k: per stage pair k, the squared maximum mean discrepancy with
the polynomial kernel k(x, y) = (xᵀy)² between the sets of L2-normalised per-channel spatial
maps of student and teacher (`kdflow.losses.nst`). Defaults: β=50 for every stage pair
(summed), γ=1, and every stage (``all_stages``: one transfer per stage, paired in order, from the
deepest where the counts differ), the
benchmark's choice on the CIFAR zoo (RepDistiller's ``feat[1:-1]``, ``-b 50``). Other pairings
are listed, e.g. ``stages: [stage1, stage2]``.
"""
from __future__ import annotations

from collections.abc import Sequence

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "nst",
    citation="Huang, Wang 2017. Like What You Like: Knowledge Distill via Neuron Selectivity Transfer. arXiv:1707.01219",
    knowledge="features",
)
def nst(
    teacher: str = "teacher",
    student: str = "student",
    stages: Sequence[str] = ("all_stages",),
    weight: float = 50.0,
    ce_weight: float = 1.0,
) -> Graph:
    return teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[
            {"from": f"{teacher}.{tap}", "to": f"{student}.{tap}", "criterion": "nst", "weight": weight} for tap in stages
        ],
    )
