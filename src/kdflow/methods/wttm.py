"""`wttm`: Zheng and Yang 2024, "Knowledge Distillation Based on Transformed Teacher Matching" (ICLR).

Student loss r·CE(z_s, y) + β·WTTM: the teacher's softmax raised to the power γ and renormalised,
matched by the student's softmax at temperature 1, each sample's KL weighted by the power sum
U = Σ_c p_t,c^γ (`kdflow.losses.wttm`). The authors' train_student.py (zkxufo/TTM@fe457b3) sums
``gamma·CE + alpha·KD + beta·WTTM`` (``-r``, ``-a``, ``-b``; KD off with ``-a 0``) on the CIFAR-100 benchmark's
240-epoch protocol. The paper lists γ (as T = 1/γ) and β per pair in its appendix A.4, which this project
has not read: the defaults here, γ = 0.2 and β = 4, are the README's own command for WTTM
(``--add wttm --ttm_l 0.2 ... -a 4``, there added to CRD); set a pair's values with a preset.
`logit_standardization: true` z-scores both logits first, as for every logit transfer.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "wttm",
    citation="Zheng, Yang 2024. Knowledge Distillation Based on Transformed Teacher Matching. ICLR",
    knowledge="logits",
)
def wttm(
    teacher: str = "teacher",
    student: str = "student",
    gamma: float = 0.2,
    weight: float = 4.0,
    ce_weight: float = 1.0,
    logit_standardization: bool = False,
) -> Graph:
    transfer = {"from": f"{teacher}.logits", "to": f"{student}.logits", "criterion": "wttm", "gamma": gamma, "weight": weight}
    if logit_standardization:
        transfer["logit_standardization"] = True
    return teacher_student(teacher, student, ce_weight, transfers=[transfer])
