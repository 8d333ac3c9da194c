"""kdflow: knowledge distillation as a flow graph."""
__version__ = "0.1.0"

from kdflow import methods  # noqa: E402  (kdflow.methods.kd(...) and the others)
from kdflow.api import Distiller, FlowGraph  # noqa: E402

__all__ = ["Distiller", "FlowGraph", "methods", "__version__"]
