"""`dkd`: Zhao, Cui, Song, Qiu and Liang 2022, "Decoupled Knowledge Distillation" (CVPR).

Student loss CE(z_s, y) + w(e)·[α·TCKD + β·NCKD], with p = softmax(z/τ) and y the label:

* TCKD = τ²·KL(b_t ‖ b_s), b = [p_y, 1 − p_y] (target vs. all non-target classes together);
* NCKD = τ²·KL(p̂_t ‖ p̂_s), p̂ the softmax over the non-target classes only;
* w(e) = min(e / 20, 1) for 1-based epochs e (the paper's linear warm-up over 20 epochs).

The warm-up is a weight schedule ``{value: 1, warmup_epochs: 20}``: the flow's WeightSchedule
gives min((epoch + 1) / 20, 1) for its 0-based epochs, which is the paper's min(e / 20, 1) with
e = epoch + 1 — the same ramp (1/20 in the first epoch, full weight from the 20th on).

Defaults (CIFAR-100, the paper / mdistiller configs): τ = 4, α = 1, β = 8, CE weight 1.0.
β is tuned per pair (mdistiller configs/cifar100/dkd/*.yaml): β = 2 for resnet56→resnet20 and
resnet110→resnet32; β = 6 for vgg13→vgg8, wrn40-2→wrn16-2, wrn40-2→wrn40-1 and vgg13→MobileNetV2;
β = 8 otherwise (wrn40-2→ShuffleV1, the resnet32x4 pairs, ResNet50→MobileNetV2). The CIFAR-100
pair files carry these as presets; elsewhere set it with ``method: {name: dkd, beta: 6}``.

`logit_standardization: true` is DKD with logit standardization (Sun et al. 2024, CVPR): logits z-scored before
the temperature. The authors multiply α and β by their KD weight 9 and set τ=2; here that is
``kd_weight: 9`` (it scales α·TCKD + β·NCKD alike, so the per-pair β presets still apply):
recipes/methods/dkd+ls.yaml.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "dkd",
    citation="Zhao, Cui, Song, Qiu, Liang 2022. Decoupled Knowledge Distillation (CVPR)",
    knowledge="logits",
)
def dkd(
    teacher: str = "teacher",
    student: str = "student",
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    warmup_epochs: int = 20,
    logit_standardization: bool = False,
) -> Graph:
    return teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[
            {
                "from": f"{teacher}.logits",
                "to": f"{student}.logits",
                "criterion": "dkd",
                "alpha": alpha,
                "beta": beta,
                "temperature": temperature,
                **({"logit_standardization": True} if logit_standardization else {}),  # absent when off: recipes as before
                "weight": {"value": kd_weight, "warmup_epochs": warmup_epochs},
            }
        ],
    )
