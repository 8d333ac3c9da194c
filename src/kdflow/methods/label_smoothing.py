"""`label_smoothing`: Szegedy, Vanhoucke, Ioffe, Shlens and Wojna 2016, "Rethinking the Inception
Architecture for Computer Vision" (CVPR) — label-smoothing regularisation, the baseline Tf-KD
(Yuan et al. 2020) compares its virtual teacher with.

Student only: CE(z, q) with q = (1 − ε)·onehot(y) + ε/C, ε = 0.1. The uniform part covers every
class, the true one included (Szegedy et al.'s definition); the Tf-KD code instead puts ε/(C − 1)
on the other classes only — the same target up to ε/C, which matters little for C = 100.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method(
    "label_smoothing",
    citation="Szegedy, Vanhoucke, Ioffe, Shlens, Wojna 2016. Rethinking the Inception Architecture for Computer Vision (CVPR)",
    knowledge="logits",
)
def label_smoothing(student: str = "student", epsilon: float = 0.1, weight: float = 1.0) -> Graph:
    return {
        "nodes": {student: {"role": "trainable"}},
        "supervise": {student: {"loss": "label_smoothing", "epsilon": epsilon, "weight": weight}},
        # only the student trains, even when the recipe (a pair file) also declares a teacher node
        "stages": [{"name": "main", "train": [student]}],
    }
