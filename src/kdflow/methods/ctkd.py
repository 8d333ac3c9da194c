"""`ctkd`: Li, Li, Yang, Zhao, Song, Luo, Li and Yang 2023, "Curriculum Temperature for Knowledge
Distillation" (AAAI).

Student loss γ·CE(z_s, y) + α·τ²·KL(p_t ‖ p_s), p = softmax(z / τ), where the temperature is learned:
τ = 1 + 20·sigmoid(θ), θ a single parameter (the global temperature, initialised to 1, so τ₀ ≈ 15.62)
that joins the student's optimizer behind a gradient reversal layer. θ therefore ascends the KD loss
while the student descends it; the reversal strength λ rises on a cosine curriculum from ≈0.02 in the
first epoch to 1 at the tenth (`kdflow.losses.stateful.temperature`, which gives every formula).

Defaults, from the authors' code (zhengli97/CTKD@7d52522): γ = 0.1, α = 0.9 (`-r 0.1 -a 0.9 -b 0`),
λ from 0 to 1 over 10 epochs (`--cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10`), all in
scripts/run_cifar_distill.sh; τ's range (1, 21) from train_student.py's `--t_start 1 --t_end 20` defaults
and helper/loops.py `train_distill`; θ's initial value 1 from models/temp_global.py `Global_T`.
The base loss is vanilla KD (distiller_zoo/KD.py `DistillKL`, batchmean × τ²); the authors also plug
the learned τ into other losses (DKD, PKT, ...), which this method does not. Only the global temperature
is built: the instance-wise variant's module is not in the repository.

Protocol. The authors' CIFAR-100 runs (scripts/run_cifar_distill.sh with train_student.py's defaults) are
kdflow's benchmark protocol: 240 epochs, batch 64, SGD lr 0.05 (0.01 for MobileNetV2 / ShuffleNet
students), momentum 0.9, weight decay 5e-4 (θ included: it is in the same optimizer), lr ×0.1 at
150/180/210; the script logs the best test accuracy over epochs. Reported top-1 (README, KD → +CTKD):
resnet56→resnet20 70.66 → 71.19, resnet110→resnet32 73.08 → 73.52, resnet110→resnet20 70.66 → 70.99,
wrn_40_2→wrn_16_2 74.92 → 75.45, wrn_40_2→wrn_40_1 73.54 → 73.93, vgg13→vgg8 72.98 → 73.52.
ImageNet (scripts/run_imagenet_distill.sh) differs: 120 epochs, batch 256 over 8 GPUs, lr 0.1 ×0.1 at
30/60/90, weight decay 1e-4, CE 1 and KD 1, λ's curriculum over 5 epochs; reported ResNet34→ResNet18
top-1 KD 70.83 → 71.32 (DKD 71.13 → 71.51 with the learned τ in DKD, not built here).

`logit_standardization: true` z-scores both logits first (Sun et al. 2024), as for every logit transfer;
the learned τ then divides the standardized logits. The authors did not publish this combination.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "ctkd",
    citation="Li, Li, Yang, Zhao, Song, Luo, Li, Yang 2023. Curriculum Temperature for Knowledge Distillation (AAAI)",
    knowledge="logits",
)
def ctkd(
    teacher: str = "teacher",
    student: str = "student",
    ce_weight: float = 0.1,
    kd_weight: float = 0.9,
    theta_init: float = 1.0,
    min_temperature: float = 1.0,
    temperature_range: float = 20.0,
    loops: int = 10,
    lambda_min: float = 0.0,
    lambda_max: float = 1.0,
    logit_standardization: bool = False,
) -> Graph:
    """τ = `min_temperature` + `temperature_range`·sigmoid(θ), θ starting at `theta_init`; the reversal
    strength rises from `lambda_min` to `lambda_max` over the first `loops` epochs of the stage."""
    return teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[
            {
                "from": f"{teacher}.logits",
                "to": f"{student}.logits",
                "criterion": "ctkd",
                "theta_init": theta_init,
                "min_temperature": min_temperature,
                "temperature_range": temperature_range,
                "loops": loops,
                "lambda_min": lambda_min,
                "lambda_max": lambda_max,
                "weight": kd_weight,
                **({"logit_standardization": True} if logit_standardization else {}),
            }
        ],
    )
