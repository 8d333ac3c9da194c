"""The model zoo: architectures registered by name."""
from kdflow.models import small  # noqa: F401  (fills the registry)
from kdflow.models.registry import MODELS, build_model, count_parameters, register_model

__all__ = ["MODELS", "build_model", "count_parameters", "register_model"]
