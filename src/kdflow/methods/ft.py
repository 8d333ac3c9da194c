"""`ft`: Kim, Park and Kwak 2018, "Paraphrasing Complex Network: Network Compression via
Factor Transfer" (NeurIPS).

A paraphraser P (a convolutional autoencoder, factor rate k=0.5) on the teacher's last
feature map and a translator T on the student's (the `ft` criterion module, both trainable
helpers of the student). Stage `paraphrase` trains P alone by reconstruction,
|P_dec(P_enc(F_t)) − F_t| (L1, mean over elements); stage `main` trains the student and T on
γ·CE + β·‖T(F_s)/‖T(F_s)‖ − P_enc(F_t)/‖P_enc(F_t)‖‖₁ / D with P frozen (eval mode, no
gradient), D the factor size (the benchmark's mean over elements, for its β=200).
Defaults: β=200, γ=1, taps stage2 on both sides (the last stage of `convnet_s`; the
benchmark's last stage, stage3, on the CIFAR zoo), paraphrase_epochs=30.
The transfer's weight β also multiplies the paraphrase stage's term, so that term is the
reconstruction loss times 1/β: the paraphraser trains on a unit-weight reconstruction loss.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method(
    "ft",
    citation="Kim, Park, Kwak 2018. Paraphrasing Complex Network: Network Compression via Factor Transfer. NeurIPS",
    knowledge="features",
)
def ft(
    teacher: str = "teacher",
    student: str = "student",
    teacher_tap: str = "stage2",
    student_tap: str = "stage2",
    rate: float = 0.5,
    reconstruction_p: int = 1,
    weight: float = 200.0,
    ce_weight: float = 1.0,
    paraphrase_epochs: int = 30,
) -> Graph:
    return {
        "nodes": {teacher: {"role": "frozen"}, student: {"role": "trainable"}},
        "supervise": {student: {"weight": ce_weight, "stages": ["main"]}},
        "transfers": [
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
        "stages": [
            {"name": "paraphrase", "train": [student], "epochs": paraphrase_epochs},
            {"name": "main", "train": [student]},
        ],
    }
