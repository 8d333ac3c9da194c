"""`at`: Zagoruyko and Komodakis 2017, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer" (ICLR).

Student loss γ·CE + Σ_k β·mean((A_s,k − A_t,k)²) over the stage pairs k, with the attention
map A = normalize(flatten(mean_c |F_c|^p)) (`kdflow.losses.at`; the larger map is pooled to
the smaller size). Defaults: p=2, β=1000 for every stage pair (the per-stage terms summed
with equal weights), γ=1, and every stage (``all_stages``: one transfer per stage, the two
models' stages paired in order, from the deepest where their counts differ), which is the benchmark's choice on the CIFAR zoo
(RepDistiller's ``feat[1:-1]``, ``-b 1000``). Other pairings are listed, e.g.
``stages: [stage1, stage2]``.
"""
from __future__ import annotations

from collections.abc import Sequence

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "at",
    citation="Zagoruyko, Komodakis 2017. Paying More Attention to Attention: Improving the Performance of "
    "Convolutional Neural Networks via Attention Transfer. ICLR",
    knowledge="features",
)
def at(
    teacher: str = "teacher",
    student: str = "student",
    stages: Sequence[str] = ("all_stages",),
    p: float = 2.0,
    weight: float = 1000.0,
    ce_weight: float = 1.0,
) -> Graph:
    return teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[
            {"from": f"{teacher}.{tap}", "to": f"{student}.{tap}", "criterion": "at", "p": p, "weight": weight}
            for tap in stages
        ],
    )
