"""Named methods: each a function returning a flow graph with its paper's defaults, one file per method."""
import importlib
import pkgutil

from kdflow.methods.registry import METHODS, Method, apply_presets, expand_methods, method_graph, register_method

# every module in this package registers its methods on import
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("registry", "binding"):
        importlib.import_module(f"{__name__}.{_info.name}")

# the public callables: kdflow.methods.kd(teacher=<nn.Module>, student=<nn.Module>, ...) -> FlowGraph
from kdflow.methods.binding import FlowGraph, method_api  # noqa: E402

for _name in list(METHODS):
    globals()[_name] = method_api(_name)

__all__ = ["FlowGraph", "METHODS", "Method", "apply_presets", "expand_methods", "method_graph", "register_method", *METHODS]
