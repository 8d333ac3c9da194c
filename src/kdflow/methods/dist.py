"""`dist`: Huang, You, Wang, Qian and Xu 2022, "Knowledge Distillation from A Stronger Teacher" (NeurIPS).

Student loss CE(z_s, y) + τ²·[β·(1 − mean_i ρ(p_s,i, p_t,i)) + γ·(1 − mean_c ρ(p_s,:c, p_t,:c))],
p = softmax(z/τ), ρ the Pearson correlation: the first term matches each sample's class
distribution (inter-class relation), the second each class's profile across the batch
(intra-class relation).

CIFAR-100 setting of the authors' released config: CE weight 1 (``ori_loss_weight: 1``), the
DIST term with β = γ = 1 and τ = 4 (``kd: dist_t4``, which includes the τ² factor) and KD weight
2 (``kd_loss_weight: 2``). That is β = γ = 2, τ = 4, transfer weight 1 here. (ImageNet: τ = 1,
β = γ = 1, CE 1.) The standard protocol (../shared/methods.md) supplies the optimiser.
`logit_standardization: true` z-scores both logits first (Sun et al. 2024), as for every logit transfer.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "dist",
    citation="Huang, You, Wang, Qian, Xu 2022. Knowledge Distillation from A Stronger Teacher (NeurIPS)",
    knowledge="logits",
)
def dist(
    teacher: str = "teacher",
    student: str = "student",
    beta: float = 2.0,
    gamma: float = 2.0,
    temperature: float = 4.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
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
                "criterion": "dist",
                "beta": beta,
                "gamma": gamma,
                "temperature": temperature,
                "weight": kd_weight,
                **({"logit_standardization": True} if logit_standardization else {}),
            }
        ],
    )
