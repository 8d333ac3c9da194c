"""`kd`: Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network".

Student loss γ·CE(z_s, y) + α·τ²·KL(p_t ‖ p_s), defaults τ=4, γ=0.1, α=0.9 (the CIFAR-100
benchmark's settings, ../shared/methods.md).
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method("kd", citation="Hinton, Vinyals, Dean 2015. Distilling the Knowledge in a Neural Network", knowledge="logits")
def kd(
    teacher: str = "teacher",
    student: str = "student",
    temperature: float = 4.0,
    ce_weight: float = 0.1,
    kd_weight: float = 0.9,
) -> Graph:
    return {
        "nodes": {teacher: {"role": "frozen"}, student: {"role": "trainable"}},
        "supervise": {student: ce_weight},
        "transfers": [
            {
                "from": f"{teacher}.logits",
                "to": f"{student}.logits",
                "criterion": "kl",
                "temperature": temperature,
                "weight": kd_weight,
            }
        ],
    }
