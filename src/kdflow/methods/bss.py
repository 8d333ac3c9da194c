"""`bss`: Heo, Lee, Yun and Choi 2019, "Knowledge Distillation with Adversarial Samples Supporting
Decision Boundary" (AAAI).

Student loss CE(z_s, y) + (1/τ²)·[w_clean(e)·τ²·KL(p_t ‖ p_s) on the batch
                                 + w_adv(e)·τ²·KL(p_t ‖ p_s) on boundary-supporting samples],
w_clean(e) = 3·(1 − e/E) + 1, w_adv(e) = max(2·(1 − 4e/(3E)), 0) with e the 1-based epoch of the
stage and E its length. The boundary-supporting samples come from a targeted attack on the frozen
teacher (10 steps, step 0.3, up to 64 correctly classified samples per batch, target class drawn
from the teacher's non-top-1 probabilities); see `kdflow.losses.stateful.adversarial` for every detail.

Scale: the official code's KD terms are soft cross-entropies without τ²; our KD carries τ²
(the framework's convention), so the transfer weight defaults to 1/τ² = 1/9, which reproduces the
published loss (and gradients) exactly. CE weight 1. τ = 3.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "bss",
    citation="Heo, Lee, Yun, Choi 2019. Knowledge Distillation with Adversarial Samples Supporting Decision Boundary (AAAI)",
    knowledge="logits",
)
def bss(
    teacher: str = "teacher",
    student: str = "student",
    temperature: float = 3.0,
    attack_size: int = 64,
    attack_steps: int = 10,
    step_size: float = 0.3,
    max_norm: float | None = None,
    ce_weight: float = 1.0,
    kd_weight: float | None = None,
) -> Graph:
    """`kd_weight` defaults to 1/τ² (the published scale, see above)."""
    return teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[
            {
                "from": f"{teacher}.logits",
                "to": f"{student}.logits",
                "criterion": "bss",
                "temperature": temperature,
                "attack_size": attack_size,
                "attack_steps": attack_steps,
                "step_size": step_size,
                "max_norm": max_norm,
                "weight": kd_weight if kd_weight is not None else 1.0 / temperature**2,
            }
        ],
    )
