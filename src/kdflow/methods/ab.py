"""`ab`: Heo, Lee, Yun and Choi 2019, "Knowledge Transfer via Distillation of Activation
Boundaries Formed by Hidden Neurons" (AAAI).

Per stage k, the squared hinge ‖ρ(t) ⊙ max(m − s, 0) + (1 − ρ(t)) ⊙ max(m + s, 0)‖²₂ / B
(`kdflow.losses.ab`, margin m=1), with t the teacher's pre-ReLU feature, ρ(t) = 1[t > 0], and
s = c(F_s) the student's pre-ReLU feature through a trainable 1×1 conv + BN connector c.
Stage `init` trains the student (and the connectors) on Σ_k w_k·AB_k only; stage `main`
then on γ·CE only (the paper's initialisation, the benchmark's 30 epochs).
Per-stage weights w_k = scale · 2^(k−n) for k = 1..n (the deepest stage 1, halving toward
the input) with scale = 3/1000, the benchmark's constants (its loss is also sum / B).
Defaults: stages stage1 and stage2 at their pre-activations (`stageK_pre`; the benchmark
takes all three stages of the CIFAR nets), margin 1, init_epochs=30, γ=1.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method(
    "ab",
    citation="Heo, Lee, Yun, Choi 2019. Knowledge Transfer via Distillation of Activation Boundaries Formed by "
    "Hidden Neurons. AAAI",
    knowledge="features",
)
def ab(
    teacher: str = "teacher",
    student: str = "student",
    stages: list[str] = ("stage1_pre", "stage2_pre"),
    margin: float = 1.0,
    scale: float = 3.0 / 1000.0,
    connector: str = "conv1x1",
    ce_weight: float = 1.0,
    init_epochs: int = 30,
) -> Graph:
    stages = list(stages)
    n = len(stages)
    return {
        "nodes": {teacher: {"role": "frozen"}, student: {"role": "trainable"}},
        "supervise": {student: {"weight": ce_weight, "stages": ["main"]}},
        "transfers": [
            {
                "from": f"{teacher}.{tap}",
                "to": f"{student}.{tap}",
                "criterion": "ab",
                "margin": margin,
                "connector": connector,
                "weight": scale * 2.0 ** (k + 1 - n),
                "stages": ["init"],
            }
            for k, tap in enumerate(stages)
        ],
        "stages": [{"name": "init", "train": [student], "epochs": init_epochs}, {"name": "main", "train": [student]}],
    }
