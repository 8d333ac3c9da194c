"""`nkd`: Yang, Zeng, Li, Zhang, Yuan and Li 2023, "From Knowledge Distillation to Self-Knowledge
Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels" (ICCV).

Student loss CE(z_s, y) + NKD: the teacher's target probability as a weight on the student's target
log-probability, plus γ·τ² times the cross-entropy between the teacher's and the student's softmax over
the non-target classes alone (`kdflow.losses.nkd`). Defaults τ = 3, γ = 3.5 are the authors' CIFAR-100
config (yzd-v/cls_KD configs/distillers/cifar100/res34_distill_res18_cifar.py); their ImageNet configs
use τ = 1, γ = 1.5 (the ImageNet protocol's preset).
`logit_standardization: true` z-scores both logits first (Sun et al. 2024), as for every logit transfer.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "nkd",
    citation="Yang, Zeng, Li, Zhang, Yuan, Li 2023. From Knowledge Distillation to Self-Knowledge Distillation: "
    "A Unified Approach with Normalized Loss and Customized Soft Labels (ICCV)",
    knowledge="logits",
)
def nkd(
    teacher: str = "teacher",
    student: str = "student",
    temperature: float = 3.0,
    gamma: float = 3.5,
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
                "criterion": "nkd",
                "temperature": temperature,
                "gamma": gamma,
                "weight": kd_weight,
                **({"logit_standardization": True} if logit_standardization else {}),
            }
        ],
    )
