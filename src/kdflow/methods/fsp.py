"""`fsp`: Yim, Joo, Bae and Kim 2017, "A Gift from Knowledge Distillation: Fast Optimization,
Network Minimization and Transfer Learning" (CVPR).

The FSP matrix of two layers, G_ij = mean_hw F1_i·F2_j (the larger map pooled to the smaller
size), summarises how one layer flows into the next. Stage `init` trains the student on
λ·Σ_k mean((G_s,k − G_t,k)²) over the consecutive layer pairs k of the tapped list only
(`kdflow.losses.fsp`, λ=1); stage `main` then trains it on γ·CE only (the paper's two steps; the
CIFAR-100 benchmark's 30-epoch init stage). Defaults: the stem and every stage (`[stem,
all_stages]`, the benchmark's feature list without the embedding), init_epochs=30, γ=1.
FSP needs equal channel counts at each tapped layer of teacher and student: the Flow's build
says so (one line naming the transfer) before anything trains.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "fsp",
    citation="Yim, Joo, Bae, Kim 2017. A Gift from Knowledge Distillation: Fast Optimization, Network "
    "Minimization and Transfer Learning. CVPR",
    knowledge="features",
)
def fsp(
    teacher: str = "teacher",
    student: str = "student",
    taps: list[str] = ("stem", "all_stages"),
    weight: float = 1.0,
    ce_weight: float = 1.0,
    init_epochs: int = 30,
) -> Graph:
    taps = list(taps)
    if len(taps) < 2 and not any("all_stages" in tap for tap in taps):
        raise ValueError("fsp needs at least two taps (one pair of consecutive layers)")
    return teacher_student(
        teacher,
        student,
        {"weight": ce_weight, "stages": ["main"]},
        transfers=[
            {
                "from": {"group": [f"{teacher}.{tap}" for tap in taps]},
                "to": {"group": [f"{student}.{tap}" for tap in taps]},
                "criterion": "fsp",
                "weight": weight,
                "stages": ["init"],
            }
        ],
        stages=[{"name": "init", "train": [student], "epochs": init_epochs}, {"name": "main", "train": [student]}],
    )
