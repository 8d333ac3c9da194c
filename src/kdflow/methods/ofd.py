"""`ofd`: Heo, Kim, Yun, Park, Kwak and Choi 2019, "A Comprehensive Overhaul of Feature
Distillation" (ICCV).

Per stage pair k of n, the partial L2 distance Σ (c_k(F_s) − max(F_t, m))² / B over the elements
where not (student ≤ target ≤ 0) (`kdflow.losses.ofd`), with F_t the teacher's pre-ReLU feature
(average-pooled to the student's size where they differ), m the per-channel margin E[x | x < 0]
of x ~ N(β_c, γ_c²) from the teacher's batch norm before that ReLU (−3|γ_c| where P(x < 0) ≤ 0.001,
as the authors' code does), and c_k a 1×1 conv + BN connector on the student's pre-ReLU feature
(the `ofd` criterion module, owned by the student; the margins are buffers in its checkpoint).
Student loss γ·CE + β·Σ_k 2^(k+1−n)·OFD_k (the deepest pair weighted 1, halving toward the input,
as in the authors' code). Defaults: β=1e-3, γ=1, every stage at its pre-activation
(`all_stages_pre`, as the authors and the CIFAR-100 benchmark take).

The teacher's batch norms use the batch's statistics (`batch_norm: batch` on the teacher node):
the authors' training script puts the teacher in train mode (`t_net.train()`), and so does the
benchmark's OFD distiller (its `train()` sets every child, the teacher included, to train mode).
Unlike there, the teacher's running statistics are not updated.
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
    stages: list[str] = ("all_stages_pre",),
    weight: float = 1e-3,
    ce_weight: float = 1.0,
    teacher_batch_norm: str = "batch",
) -> Graph:
    stages = list(stages)
    return {
        "nodes": {teacher: {"role": "frozen", "batch_norm": teacher_batch_norm}, student: {"role": "trainable"}},
        "supervise": {student: ce_weight},
        "transfers": [
            {
                "from": {"group": [f"{teacher}.{tap}" for tap in stages]},
                "to": {"group": [f"{student}.{tap}" for tap in stages]},
                "criterion": "ofd",
                "weight": weight,
            }
        ],
    }
