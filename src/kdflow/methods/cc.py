"""`cc`: Peng, Jin, Liu, Li, Wu, Liu, Zhou and Zhang 2019, "Correlation Congruence for
Knowledge Distillation" (ICCV).

Student loss γ·CE + β·‖ψ(E_s) − ψ(E_t)‖²_F / B², ψ the Gaussian-RBF correlation matrix (its
2nd-order Taylor expansion, γ_rbf=0.4) of L2-normalised 128-d linear embeddings of the pooled
features of each side (`kdflow.losses.cc`; both linear embeddings are trainable helpers of
the student, the `cc` criterion module). Defaults (../shared/methods.md): β=0.02, γ=1,
128-d embedding, the penultimate embedding as input.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


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
    gamma: float = 0.4,
    order: int = 2,
    weight: float = 0.02,
    ce_weight: float = 1.0,
) -> Graph:
    return {
        "nodes": {teacher: {"role": "frozen"}, student: {"role": "trainable"}},
        "supervise": {student: ce_weight},
        "transfers": [
            {
                "from": f"{teacher}.{teacher_tap}",
                "to": f"{student}.{student_tap}",
                "criterion": "cc",
                "embed_dim": embed_dim,
                "gamma": gamma,
                "order": order,
                "weight": weight,
            }
        ],
    }
