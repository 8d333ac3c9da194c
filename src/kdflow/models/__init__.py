"""The model zoo: architectures registered by name."""
# importing the family modules fills the registry
from kdflow.models import (  # noqa: F401
    cifar_mobilenetv2,
    cifar_resnet,
    cifar_shufflenet,
    cifar_vgg,
    cifar_wrn,
    imagenet_mobilenet,
    imagenet_resnet,
    small,
)
from kdflow.models.registry import MODELS, build_model, count_parameters, register_model

__all__ = ["MODELS", "build_model", "count_parameters", "register_model"]
