"""`ofd`: Heo, Kim, Yun, Park, Kwak and Choi 2019, "A Comprehensive Overhaul of Feature
Distillation" (ICCV).

Per stage k, the partial L2 distance Σ (c(F_s) − max(F_t, m))² / B over the elements where
not (student ≤ target ≤ 0) (`kdflow.losses.ofd`), with F_t the teacher's pre-ReLU feature,
m the per-channel margin E[x | x < 0] of x ~ N(β_c, γ_c²) from the teacher's batch norm
before that ReLU, and c a 1×1 conv + BN connector on the student's pre-ReLU feature (the
`ofd` criterion module, owned by the student; the margin is a buffer in its checkpoint).
Student loss γ·CE + Σ_k β·2^(k−n)·OFD_k for k = 1..n (the deepest stage β, halving toward
the input, as in the authors' code). Defaults: β=1e-3, γ=1, stages stage1 and stage2 at
their pre-activations (`stageK_pre`; the authors take every stage of the CIFAR nets).
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method(
    "ofd",
    citation="Heo, Kim, Yun, Park, Kwak, Choi 2019. A Comprehensive Overhaul of Feature Distillation. ICCV",
    knowledge="features",
)
def ofd(
    teacher: str = "teacher",
    student: str = "student",
    stages: list[str] = ("stage1_pre", "stage2_pre"),
    weight: float = 1e-3,
    ce_weight: float = 1.0,
) -> Graph:
    stages = list(stages)
    n = len(stages)
    return {
        "nodes": {teacher: {"role": "frozen"}, student: {"role": "trainable"}},
        "supervise": {student: ce_weight},
        "transfers": [
            {"from": f"{teacher}.{tap}", "to": f"{student}.{tap}", "criterion": "ofd", "weight": weight * 2.0 ** (k + 1 - n)}
            for k, tap in enumerate(stages)
        ],
    }
