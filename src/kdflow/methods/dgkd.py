"""`dgkd`: Son, Na, Choi and Hwang 2021, "Densely Guided Knowledge Distillation using Multiple
Teacher Assistants" (ICCV).

The assistants are trained in turn (each from the teacher and every assistant before it), then
the student learns from the teacher and all assistants at once: CE + Σ_guides τ²·KL(p_guide ‖ p_s).
Stochastic DGKD drops `drop` of the student's KD terms at random at every iteration (the pool
`guides`). The paper's λ=1 would turn the CE term off; here the CE weight is explicit
(`ce_weight`, default 1.0) and each KD term has `kd_weight` (default 1.0), τ=5.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method(
    "dgkd",
    citation="Son, Na, Choi, Hwang 2021. Densely Guided Knowledge Distillation using Multiple Teacher Assistants",
    knowledge="logits",
)
def dgkd(
    teacher: str = "teacher",
    assistants: list[str] = ("assistant",),
    student: str = "student",
    temperature: float = 5.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    drop: int = 1,
) -> Graph:
    assistants = list(assistants)
    order = assistants + [student]
    transfers = []
    for i, target in enumerate(order):
        for guide in [teacher] + order[:i]:
            edge = {"from": f"{guide}.logits", "to": f"{target}.logits", "criterion": "kd",
                    "temperature": temperature, "weight": kd_weight}
            if target == student:
                edge["pool"] = "guides"
            transfers.append(edge)
    return {
        "nodes": {teacher: {"role": "frozen"}, **{n: {"role": "trainable"} for n in order}},
        "supervise": {n: ce_weight for n in order},
        "transfers": transfers,
        "stages": [{"name": n, "train": [n]} for n in order],
        "drop": {"guides": drop} if drop else {},
    }
