"""`at`: Zagoruyko and Komodakis 2017, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer" (ICLR).

Student loss γ·CE + Σ_k β·mean((A_s,k − A_t,k)²) over the stage pairs k, with the attention
map A = normalize(flatten(mean_c |F_c|^p)) (`kdflow.losses.at`; the larger map is pooled to
the smaller size). Defaults (../shared/methods.md): p=2, β=1000 for every stage pair (the
per-stage terms are summed with equal weights, as in the benchmark), γ=1, and "all stages
but the last": stage1 and stage2, which is that on the 3-stage CIFAR zoo and every stage of
the 2-stage `convnet_s`. The benchmark code also transfers at the last stage: pass
`stages: [stage1, stage2, stage3]` for that.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method(
    "at",
    citation="Zagoruyko, Komodakis 2017. Paying More Attention to Attention: Improving the Performance of "
    "Convolutional Neural Networks via Attention Transfer. ICLR",
    knowledge="features",
)
def at(
    teacher: str = "teacher",
    student: str = "student",
    stages: list[str] = ("stage1", "stage2"),
    p: float = 2.0,
    weight: float = 1000.0,
    ce_weight: float = 1.0,
) -> Graph:
    return {
        "nodes": {teacher: {"role": "frozen"}, student: {"role": "trainable"}},
        "supervise": {student: ce_weight},
        "transfers": [
            {"from": f"{teacher}.{tap}", "to": f"{student}.{tap}", "criterion": "at", "p": p, "weight": weight}
            for tap in stages
        ],
    }
