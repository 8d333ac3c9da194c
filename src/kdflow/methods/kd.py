"""`kd`: Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network".

Student loss γ·CE(z_s, y) + α·τ²·KL(p_t ‖ p_s), defaults τ=4, γ=0.1, α=0.9 (the CIFAR-100
benchmark's settings, ../shared/methods.md).

`logit_standardization: true` is KD with logit standardization (Sun, Ren, Li, Wang, Cao 2024, "Logit
Standardization in Knowledge Distillation", CVPR): both models' logits z-scored before the
temperature (`kdflow.losses.standardize`). The authors' KD+LS runs use τ=2 and a KD weight of 9
with CE 0.1 (their README's `--logit-stand --base-temp 2 --kd-weight 9`): recipes/methods/kd+ls.yaml.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method("kd", citation="Hinton, Vinyals, Dean 2015. Distilling the Knowledge in a Neural Network", knowledge="logits")
def kd(
    teacher: str = "teacher",
    student: str = "student",
    temperature: float = 4.0,
    ce_weight: float = 0.1,
    kd_weight: float = 0.9,
    logit_standardization: bool = False,
) -> Graph:
    return teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[
            {
                "from": f"{teacher}.logits",
                "to": f"{student}.logits",
                "criterion": "kd",
                "temperature": temperature,
                **({"logit_standardization": True} if logit_standardization else {}),  # absent when off: recipes as before
                "weight": kd_weight,
            }
        ],
    )
