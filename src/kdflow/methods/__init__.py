"""Named methods: each a function returning a flow graph with its paper's defaults, one file per method."""
import importlib
import pkgutil

from kdflow.methods.registry import METHODS, Method, expand_methods, method_graph, register_method

# every module in this package registers its methods on import
for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "Method", "expand_methods", "method_graph", "register_method"]
