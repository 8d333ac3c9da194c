"""`fitnet`: Romero, Ballas, Kahou, Chassang, Gatta and Bengio 2015, "FitNets: Hints for Thin
Deep Nets" (ICLR).

Student loss γ·CE(z_s, y) + β·MSE(r(F_s), F_t): the student's guided layer F_s, through a
trainable regressor r (the `regressor` connector owned by the student: a conv with bias whose
shape follows the spatial sizes, 1×1 at equal size, then BN and ReLU, as the CIFAR-100 benchmark
builds it), imitates the teacher's hint layer F_t. Defaults (the benchmark, ../shared/methods.md):
hint and guided layer at stage position 1 (`stage[1]`, the second stage: the benchmark's
`hint_layer=2` in its feature list [stem, stage1, ...]), β=100, γ=1.

The paper first trains the student up to the guided layer on the hint alone, then the whole
student. `hint_epochs > 0` adds that hint stage: stage `hint` trains the student (and r) on
β·MSE only, stage `main` on γ·CE only (the paper's second stage is KD: combine with `kd` and
limit its transfer to `main` in the recipe). With `hint_epochs = 0` (the benchmark's way) the
hint and CE are trained together in one stage.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "fitnet",
    citation="Romero, Ballas, Kahou, Chassang, Gatta, Bengio 2015. FitNets: Hints for Thin Deep Nets. ICLR",
    knowledge="features",
)
def fitnet(
    teacher: str = "teacher",
    student: str = "student",
    teacher_tap: str = "stage[1]",
    student_tap: str = "stage[1]",
    weight: float = 100.0,
    ce_weight: float = 1.0,
    connector: str = "regressor",
    hint_epochs: int = 0,
) -> Graph:
    hint = {
        "from": f"{teacher}.{teacher_tap}",
        "to": f"{student}.{student_tap}",
        "criterion": "hint",
        "connector": connector,
        "weight": weight,
    }
    graph: Graph = teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[hint],
    )
    if hint_epochs > 0:
        hint["stages"] = ["hint"]
        graph["supervise"] = {student: {"weight": ce_weight, "stages": ["main"]}}
        graph["stages"] = [{"name": "hint", "train": [student], "epochs": hint_epochs}, {"name": "main", "train": [student]}]
    return graph
