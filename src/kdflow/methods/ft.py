"""`ft`: Kim, Park and Kwak 2018, "Paraphrasing Complex Network: Network Compression via
Factor Transfer" (NeurIPS).

A paraphraser P (a convolutional autoencoder without batch norm, factor rate k=0.5) on the
teacher's last feature map and a translator T (with batch norm) on the student's (the `ft`
criterion module, both trainable helpers of the student). Stage `paraphrase` trains P alone by
reconstruction, mean((P_dec(P_enc(F_t)) − F_t)²); stage `main` trains the student and T on
γ·CE + β·mean|A(T(F_s)) − A(P_enc(F_t))| with A(F) the per-sample L2-normalised channel mean of
F² (`kdflow.losses.factor_transfer`, the CIFAR-100 benchmark's form) and P frozen (eval mode,
no gradient). Defaults: β=200, γ=1, the last stage on both sides (`last_stage`, the
benchmark's feat[-2]), paraphrase_epochs=30.
The transfer's weight β also multiplies the paraphrase stage's term, so that term is the
reconstruction loss times 1/β: the paraphraser trains on a unit-weight reconstruction loss.
The transfer names its paraphrase stage (`paraphrase_stage`); a recipe without that stage (say,
`method: [ab, ft]`, where AB's stages win) is rejected when it is validated.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "ft",
    citation="Kim, Park, Kwak 2018. Paraphrasing Complex Network: Network Compression via Factor Transfer. NeurIPS",
    knowledge="features",
)
def ft(
    teacher: str = "teacher",
    student: str = "student",
    teacher_tap: str = "last_stage",
    student_tap: str = "last_stage",
    rate: float = 0.5,
    reconstruction_p: int = 2,
    weight: float = 200.0,
    ce_weight: float = 1.0,
    paraphrase_epochs: int = 30,
) -> Graph:
    return teacher_student(
        teacher,
        student,
        {"weight": ce_weight, "stages": ["main"]},
        transfers=[
            {
                "from": f"{teacher}.{teacher_tap}",
                "to": f"{student}.{student_tap}",
                "criterion": "ft",
                "rate": rate,
                "paraphrase_stage": "paraphrase",
                "reconstruction_p": reconstruction_p,
                "reconstruction_weight": 1.0 / weight,
                "weight": weight,
            }
        ],
        stages=[
            {"name": "paraphrase", "train": [student], "epochs": paraphrase_epochs},
            {"name": "main", "train": [student]},
        ],
    )
