"""`cc`: Peng, Jin, Liu, Li, Wu, Liu, Zhou and Zhang 2019, "Correlation Congruence for
Knowledge Distillation" (ICCV).

Student loss γ·CE + β·L_CC(W_s·e_s, W_t·e_t): both sides' penultimate embeddings (the input
of the last linear layer, the benchmark's ``feat[-1]``) through linear 128-d embeddings W_s,
W_t (trainable helpers of the student: the `cc` criterion module, trained with it).

``form: benchmark`` (the default) is the CIFAR-100 benchmark's loss, `kdflow.losses.cc_benchmark`
(RepDistiller's ``Correlation``: inner products of neighbouring samples' absolute
student−teacher differences), whose weight β=0.02 the defaults take (``-b 0.02``).
``form: rbf`` is the paper's ‖ψ(E_s) − ψ(E_t)‖²_F / B², ψ the Gaussian-RBF correlation matrix
of the L2-normalised embeddings in its 2nd-order Taylor expansion (γ_rbf=0.4,
`kdflow.losses.cc`); β=0.02 was not tuned for it.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "cc",
    citation="Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang 2019. Correlation Congruence for Knowledge Distillation. ICCV",
    knowledge="relations",
)
def cc(
    teacher: str = "teacher",
    student: str = "student",
    teacher_tap: str = "embedding",
    student_tap: str = "embedding",
    embed_dim: int = 128,
    form: str = "benchmark",
    gamma: float = 0.4,
    order: int = 2,
    weight: float = 0.02,
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
                "criterion": "cc",
                "embed_dim": embed_dim,
                "form": form,
                "gamma": gamma,
                "order": order,
                "weight": weight,
            }
        ],
    )
