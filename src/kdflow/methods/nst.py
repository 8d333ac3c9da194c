"""`nst`: Huang and Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer" (arXiv:1707.01219).

Student loss γ·CE + Σ_k β·MMD²_k: per stage pair k, the squared maximum mean discrepancy with
the polynomial kernel k(x, y) = (xᵀy)² between the sets of L2-normalised per-channel spatial
maps of student and teacher (`kdflow.losses.nst`). Defaults: β=50 for every stage pair
(summed, as in the benchmark), γ=1, stages stage1 and stage2 (the benchmark takes every
stage of the 3-stage CIFAR nets: pass `stages: [stage1, stage2, stage3]` there).
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method(
    "nst",
    citation="Huang, Wang 2017. Like What You Like: Knowledge Distill via Neuron Selectivity Transfer. arXiv:1707.01219",
    knowledge="features",
)
def nst(
    teacher: str = "teacher",
    student: str = "student",
    stages: list[str] = ("stage1", "stage2"),
    weight: float = 50.0,
    ce_weight: float = 1.0,
) -> Graph:
    return {
        "nodes": {teacher: {"role": "frozen"}, student: {"role": "trainable"}},
        "supervise": {student: ce_weight},
        "transfers": [
            {"from": f"{teacher}.{tap}", "to": f"{student}.{tap}", "criterion": "nst", "weight": weight} for tap in stages
        ],
    }
