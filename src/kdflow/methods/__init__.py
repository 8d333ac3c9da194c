"""Named methods: each a function returning a flow graph with its paper's defaults."""
from kdflow.methods import ce, kd  # noqa: F401  (fills the registry)
from kdflow.methods.registry import (
    METHODS,
    Method,
    expand_methods,
    method_graph,
    register_method,
)

__all__ = ["METHODS", "Method", "expand_methods", "method_graph", "register_method"]
