"""`ab`: Heo, Lee, Yun and Choi 2019, "Knowledge Transfer via Distillation of Activation
Boundaries Formed by Hidden Neurons" (AAAI).

Per stage pair k of n, the squared hinge ‖ρ(t) ⊙ max(m − s, 0) + (1 − ρ(t)) ⊙ max(m + s, 0)‖²₂ / B
(`kdflow.losses.ab`, margin m=1), with t the teacher's pre-ReLU feature, ρ(t) = 1[t > 0], and
s = c(F_s) the student's pre-ReLU feature through a trainable connector c (none where the
student's map already has the teacher's channels and size, else a conv with bias + BN: the
`ab` criterion module, the CIFAR-100 benchmark's connector). The pairs are weighted 2^(k+1−n)
(the deepest 1, halving toward the input) and the sum by `scale` = 3/1000, the benchmark's
constants. Stage `init` trains the student (and the connectors) on that sum only; stage `main`
then on γ·CE only (the paper's initialisation, the benchmark's 30 epochs).
Defaults: every stage at its pre-activation (`all_stages_pre`, as the benchmark takes its
feature list's stages with `preact=True`), margin 1, init_epochs=30, γ=1.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "ab",
    citation="Heo, Lee, Yun, Choi 2019. Knowledge Transfer via Distillation of Activation Boundaries Formed by "
    "Hidden Neurons. AAAI",
    knowledge="features",
)
def ab(
    teacher: str = "teacher",
    student: str = "student",
    stages: list[str] = ("all_stages_pre",),
    margin: float = 1.0,
    scale: float = 3.0 / 1000.0,
    ce_weight: float = 1.0,
    init_epochs: int = 30,
) -> Graph:
    stages = list(stages)
    return teacher_student(
        teacher,
        student,
        {"weight": ce_weight, "stages": ["main"]},
        transfers=[
            {
                "from": {"group": [f"{teacher}.{tap}" for tap in stages]},
                "to": {"group": [f"{student}.{tap}" for tap in stages]},
                "criterion": "ab",
                "margin": margin,
                "weight": scale,
                "stages": ["init"],
            }
        ],
        stages=[{"name": "init", "train": [student], "epochs": init_epochs}, {"name": "main", "train": [student]}],
    )
