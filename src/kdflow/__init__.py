"""kdflow: knowledge distillation as a flow graph.

`kdflow.methods`, `kdflow.Distiller` and `kdflow.FlowGraph` load on first use, so that importing
one layer (``import kdflow.losses``) loads that layer and the ones below it, nothing above.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {"methods": ("kdflow.methods", None), "Distiller": ("kdflow.api", "Distiller"), "FlowGraph": ("kdflow.methods.binding", "FlowGraph")}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'kdflow' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)


__all__ = ["Distiller", "FlowGraph", "methods", "__version__"]
