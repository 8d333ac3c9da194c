"""`crd`: Tian, Krishnan and Isola 2020, "Contrastive Representation Distillation" (ICLR).

Student loss γ·CE + β·(L_s + L_t): NCE between 128-d L2-normalised linear projections of the
student's and the teacher's pooled embeddings, each anchored against K negatives read from
a momentum memory bank of the other side's projections over the training set, τ=0.07
(`kdflow.losses.CRDLoss`, the `crd` criterion module: both projections and both banks belong
to the student and travel in its checkpoint). Defaults (../shared/methods.md, RepDistiller's
train_student.py): β=0.8, γ=1, K=16384, τ=0.07, bank momentum 0.5, `mode: exact` (the positive
is the sample itself, the K negatives are drawn from the samples of the other classes, without
replacement when there are at least K of them, as RepDistiller's CIFAR100InstanceSample does);
`relax` draws the positive from the sample's class; `uniform` draws negatives from all samples
(no labels needed). `form` computes the scores against the whole bank (`matmul`, the fast one while
the training set is a few times K, as on CIFAR) or on the gathered contrast rows (`gather`); `auto`
picks (`kdflow.losses.CRDLoss`). CRD+KD: `method: [crd, {name: kd, kd_weight: 1.0}]`.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "crd",
    citation="Tian, Krishnan, Isola 2020. Contrastive Representation Distillation. ICLR",
    knowledge="relations",
)
def crd(
    teacher: str = "teacher",
    student: str = "student",
    teacher_tap: str = "embedding",
    student_tap: str = "embedding",
    feat_dim: int = 128,
    num_negatives: int = 16384,
    temperature: float = 0.07,
    momentum: float = 0.5,
    mode: str = "exact",
    form: str = "auto",
    weight: float = 0.8,
    ce_weight: float = 1.0,
) -> Graph:
    return teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[
            {
                "from": f"{teacher}.{teacher_tap}",
                "to": f"{student}.{student_tap}",
                "criterion": "crd",
                "feat_dim": feat_dim,
                "num_negatives": num_negatives,
                "temperature": temperature,
                "momentum": momentum,
                "mode": mode,
                "form": form,
                "weight": weight,
            }
        ],
    )
