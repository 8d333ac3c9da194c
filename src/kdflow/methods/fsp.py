"""`fsp`: Yim, Joo, Bae and Kim 2017, "A Gift from Knowledge Distillation: Fast Optimization,
Network Minimization and Transfer Learning" (CVPR).

The FSP matrix of two layers, G_ij = mean_hw F1_i·F2_j (the larger map pooled to the smaller
size), summarises how one layer flows into the next. Stage `init` trains the student on
Σ_k λ·mean((G_s,k − G_t,k)²) over consecutive layer pairs k only (`kdflow.losses.fsp`,
λ=1); stage `main` then trains it on γ·CE only (the paper's two steps; the benchmark's
30-epoch init stage). Defaults: pairs (stem, stage1) and (stage1, stage2), which both the
small models and the CIFAR zoo have (the benchmark also takes (stage2, stage3) on the
3-stage CIFAR nets: pass `taps: [stem, stage1, stage2, stage3]`), init_epochs=30, γ=1.
FSP needs equal channel counts at each tapped layer of teacher and student.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method(
    "fsp",
    citation="Yim, Joo, Bae, Kim 2017. A Gift from Knowledge Distillation: Fast Optimization, Network "
    "Minimization and Transfer Learning. CVPR",
    knowledge="features",
)
def fsp(
    teacher: str = "teacher",
    student: str = "student",
    taps: list[str] = ("stem", "stage1", "stage2"),
    weight: float = 1.0,
    ce_weight: float = 1.0,
    init_epochs: int = 30,
) -> Graph:
    taps = list(taps)
    if len(taps) < 2:
        raise ValueError("fsp needs at least two taps (one pair of consecutive layers)")
    return {
        "nodes": {teacher: {"role": "frozen"}, student: {"role": "trainable"}},
        "supervise": {student: {"weight": ce_weight, "stages": ["main"]}},
        "transfers": [
            {
                "from": {"group": [f"{teacher}.{a}", f"{teacher}.{b}"]},
                "to": {"group": [f"{student}.{a}", f"{student}.{b}"]},
                "criterion": "fsp",
                "weight": weight,
                "stages": ["init"],
            }
            for a, b in zip(taps, taps[1:])
        ],
        "stages": [{"name": "init", "train": [student], "epochs": init_epochs}, {"name": "main", "train": [student]}],
    }
