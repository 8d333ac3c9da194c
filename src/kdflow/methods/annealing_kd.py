"""`annealing_kd`: Jafari, Rezagholizadeh, Sharma and Ghodsi 2021, "Annealing Knowledge
Distillation" (EACL).

Two stages, both training the student:

* ``anneal`` — no labels: MSE(z_s, (k/τ_max)·z_t) on raw logits (mean over B·C), with
  k = ⌊epoch·τ_max / E⌋ + 1 rising 1..τ_max in equal chunks of the stage's E epochs (the
  teacher's temperature T = τ_max − k + 1 annealed from τ_max down to 1);
* ``finetune`` — CE on the labels only.

Defaults: τ_max = 10. The stages' lengths are recipe fields (``stages: [{name: anneal, epochs:
N1}, {name: finetune, epochs: N2}]``) or the arguments `anneal_epochs` / `finetune_epochs`;
otherwise each stage runs ``train.epochs``. Each stage starts a fresh optimizer and learning-rate
schedule (the engine's per-stage rule); the paper also restarts training for phase 2.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "annealing_kd",
    citation="Jafari, Rezagholizadeh, Sharma, Ghodsi 2021. Annealing Knowledge Distillation (EACL)",
    knowledge="logits",
)
def annealing_kd(
    teacher: str = "teacher",
    student: str = "student",
    max_temperature: int = 10,
    anneal_epochs: int | None = None,
    finetune_epochs: int | None = None,
    ce_weight: float = 1.0,
) -> Graph:
    anneal = {"name": "anneal", "train": [student]}
    finetune = {"name": "finetune", "train": [student]}
    if anneal_epochs is not None:
        anneal["epochs"] = anneal_epochs
    if finetune_epochs is not None:
        finetune["epochs"] = finetune_epochs
    return teacher_student(
        teacher,
        student,
        {"weight": ce_weight, "stages": ["finetune"]},
        transfers=[
            {
                "from": f"{teacher}.logits",
                "to": f"{student}.logits",
                "criterion": "annealing_kd",
                "max_temperature": max_temperature,
                "stages": ["anneal"],
            }
        ],
        stages=[anneal, finetune],
    )
