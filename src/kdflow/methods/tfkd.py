"""Tf-KD: Yuan, Tay, Li, Wang and Feng 2020, "Revisiting Knowledge Distillation via Label
Smoothing Regularization" (CVPR). Two teacher-free variants.

`tfkd_self` — KD from a pretrained model of the student's own architecture:
    (1 − α)·CE(z_s, y) + α·τ²·KL(p_t ‖ p_s),  p = softmax(z/τ).
The teacher node is declared ``same_as: student`` (its architecture is the student's); the recipe
supplies its checkpoint (e.g. the student trained alone with ``method: ce``). A recipe that names
the teacher's ``arch`` itself (a pair file) keeps that arch.
Published scale: the released code computes ``KLDivLoss()`` — the mean over all B·C elements,
i.e. batchmean / C — times τ²·multiplier, weighted α. With our batchmean·τ² KL the same loss is
    ce weight = 1 − α,   kd weight = α · multiplier / C.
Defaults: the CIFAR-100 ResNet18 self-teacher config, α = 0.95, τ = 6, multiplier = 50, C = 100
→ CE 0.05, KD 0.475. (Other published configs: MobileNetV2/ShuffleNetV2 τ = 20, multiplier 1.)

`tfkd_reg` — KD from a hand-designed virtual teacher, no teacher node:
    (1 − α)·CE(z_s, y) + α·R(z_s, y),
p^d = a on the true class and (1 − a)/(C − 1) elsewhere. Two forms of R (`form`):

* ``paper`` (the default): R = τ²·KL(p^d_τ ‖ p_τ), the student softened at τ and the virtual teacher
  softened as a distribution, p^d_τ = softmax(log p^d / τ) (`kdflow.losses.tfkd_reg`);
* ``released``: the authors' released loss (yuanli2333/Teacher-free-Knowledge-Distillation,
  ``my_loss_function.loss_kd_regularization``): R = multiplier·``KLDivLoss()``(log_softmax(z_s),
  softmax(p^d / τ)) — the student *unsoftened*, the softmax taken of the teacher's probabilities
  divided by τ (close to uniform), averaged over all B·C elements (`kdflow.losses.tfkd_reg_released`).

The two are different functions, not rescalings of one another; ``released`` reproduces the loss
behind the published numbers (checked against the authors' function in tests/test_tfkd_reg.py).
A node has one supervision entry, so the sum is one supervision loss, ``tfkd_reg_ce`` (in
`kdflow.losses.labels`). The graph has one stage training only the student, so a teacher node
that a pair file declares is neither trained nor run.
Defaults: a = 0.99, τ = 20, α = 0.1, multiplier 100 (the released CIFAR-100 ResNet18 config:
reg_alpha 0.1, reg_temperature 20, multiplier 100; MobileNetV2 there uses α = 0.95, τ = 40,
multiplier 1, ShuffleNetV2 α = 0.95, τ = 10, multiplier 1).
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method

CITATION = "Yuan, Tay, Li, Wang, Feng 2020. Revisiting Knowledge Distillation via Label Smoothing Regularization (CVPR)"


@register_method("tfkd_self", citation=CITATION + " — Tf-KD self-training", knowledge="logits")
def tfkd_self(
    teacher: str = "teacher",
    student: str = "student",
    alpha: float = 0.95,
    temperature: float = 6.0,
    multiplier: float = 50.0,
    num_classes: int = 100,
) -> Graph:
    """`num_classes` is the C of the published setting whose scale is converted (not necessarily your data's)."""
    return {
        "nodes": {teacher: {"role": "frozen", "same_as": student}, student: {"role": "trainable"}},
        "supervise": {student: round(1.0 - alpha, 12)},
        "transfers": [
            {
                "from": f"{teacher}.logits",
                "to": f"{student}.logits",
                "criterion": "kd",
                "temperature": temperature,
                "weight": round(alpha * multiplier / num_classes, 12),
            }
        ],
    }


@register_method("tfkd_reg", citation=CITATION + " — Tf-KD with a manually designed (virtual) teacher", knowledge="logits")
def tfkd_reg(
    student: str = "student",
    alpha: float = 0.1,
    correct_prob: float = 0.99,
    temperature: float = 20.0,
    form: str = "paper",
    multiplier: float = 100.0,
) -> Graph:
    if form not in ("paper", "released"):
        raise ValueError(f"tfkd_reg: form must be 'paper' or 'released', not {form!r}")
    supervision = {"loss": "tfkd_reg_ce", "alpha": alpha, "correct_prob": correct_prob, "temperature": temperature, "form": form}
    if form == "released":
        supervision["multiplier"] = multiplier
    return {
        "nodes": {student: {"role": "trainable"}},
        "supervise": {student: supervision},
        # only the student trains, even when the recipe (a pair file) also declares a teacher node
        "stages": [{"name": "main", "train": [student]}],
    }
