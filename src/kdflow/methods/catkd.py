"""`catkd`: Guo, Yan, Li and Lin 2023, "Class Attention Transfer Based Knowledge Distillation" (CVPR).

Student loss γ·CE + β·CAT, where CAT is the mean squared difference between the two models' class
activation maps (`kdflow.losses.class_attention`): CAM_k = Σ_c W[k, c]·F[c] for every class k, F the
feature map a model pools globally before its classifier and W that classifier's weight (each model its
own), both average-pooled to r×r and, with `normalize`, L2-normalised per class map. Criterion ``cat``
(`kdflow.losses.stateful.class_attention`) reads both classifiers' weights; the CAT gradient reaches the
student's classifier weight, as in the authors' code where the student's classifier is the 1×1 conv that
makes its CAMs.

Taps: ``avgpool:input`` on both sides, the map that is pooled into the classifier, i.e. what the authors'
``*_test`` models feed their ``conv_test`` (post-ReLU: the last stage for the ResNets and ShuffleV1,
``relu(bn1(·))`` after the last stage for the WRNs, the 1×1 head for ShuffleV2 and MobileNetV2). The VGGs
name that pool ``pool4``: a VGG node needs ``teacher_tap``/``student_tap: pool4:input`` (the VGG pair
files' presets).

Defaults are the authors' CIFAR-100 config for resnet32x4 → resnet8x4 (GzyAftermath/CAT-KD
configs/cifar100/CAT_KD/res32x4_res8x4.yaml: ``CAT_loss_weight`` β = 15, ``CAM_RESOLUTION`` 2,
``IF_NORMALIZE`` False, ``CE_WEIGHT`` 1, ``onlyCAT`` False). Their other pairs' values (β from 0.7 to
600, resolution 4 and normalisation for the ShuffleNet students, normalisation for the MobileNetV2
students) are pair presets. ``ce_weight: 0`` is the paper's CAT alone (``onlyCAT``; its
configs/cifar100/CAT/ use β = 50 with normalisation, 300 with `binarize`).
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method, teacher_student


@register_method(
    "catkd",
    citation="Guo, Yan, Li, Lin 2023. Class Attention Transfer Based Knowledge Distillation (CVPR)",
    knowledge="features",
)
def catkd(
    teacher: str = "teacher",
    student: str = "student",
    teacher_tap: str = "avgpool:input",
    student_tap: str = "avgpool:input",
    weight: float = 15.0,
    resolution: int = 2,
    normalize: bool = False,
    binarize: bool = False,
    ce_weight: float = 1.0,
) -> Graph:
    return teacher_student(
        teacher,
        student,
        ce_weight,
        transfers=[
            {
                "from": f"{teacher}.{teacher_tap}",
                "to": f"{student}.{student_tap}",
                "criterion": "cat",
                "resolution": resolution,
                "normalize": normalize,
                "binarize": binarize,
                "weight": weight,
            }
        ],
    )
