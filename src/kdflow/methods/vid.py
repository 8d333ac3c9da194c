"""`vid`: Ahn, Hu, Damianou, Lawrence and Dai 2019, "Variational Information Distillation for
Knowledge Transfer" (CVPR).

Student loss γ·CE + Σ_k β·NLL_k: per stage pair k, the Gaussian negative log-likelihood of
the teacher's feature t under N(μ(s), σ²), μ a 3-layer 1×1-conv regressor (no biases) of the
student's feature and σ_c² = softplus(a_c) + ε a learned per-channel variance starting at 5
(`kdflow.losses.VIDLoss`, the `vid` criterion module: regressor and variances are trainable
helpers of the student). NLL = mean over elements of (t − μ)²/(2σ²) + ½ log σ² (the
benchmark's reduction, for its β=1). Defaults: β=1 per stage (summed), ε=1e-5, γ=1,
every stage (`all_stages`, the benchmark's feature list without stem and embedding).
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "vid",
    citation="Ahn, Hu, Damianou, Lawrence, Dai 2019. Variational Information Distillation for Knowledge Transfer. CVPR",
    knowledge="features",
)
def vid(
    teacher: str = "teacher",
    student: str = "student",
    stages: list[str] = ("all_stages",),
    init_variance: float = 5.0,
    eps: float = 1e-5,
    weight: float = 1.0,
    ce_weight: float = 1.0,
) -> Graph:
    return teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[
            {
                "from": f"{teacher}.{tap}",
                "to": f"{student}.{tap}",
                "criterion": "vid",
                "init_variance": init_variance,
                "eps": eps,
                "weight": weight,
            }
            for tap in stages
        ],
    )
