"""The public callables `kdflow.methods.NAME(...)`: a method's graph with the user's nn.Modules bound to its nodes."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from kdflow.methods.registry import METHODS


@dataclass
class FlowGraph:
    """A method's graph (plain data, the recipe's shape) with the user's models bound to its nodes."""

    method: str
    graph: dict[str, Any]
    models: dict[str, nn.Module] = field(default_factory=dict)


def _bind(name: str, fn: Callable[..., dict], kwargs: dict[str, Any]) -> FlowGraph:
    """Call method `fn` with node names in place of the nn.Modules the user passed."""
    params = inspect.signature(fn).parameters
    args, models = {}, {}
    for key, value in kwargs.items():
        if key not in params:
            raise TypeError(f"{name}() got an unexpected argument {key!r}; it takes {', '.join(params)}")
        if isinstance(value, nn.Module):
            args[key] = key  # the node is named after the argument: teacher=..., student=...
            models[key] = value
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, nn.Module) for v in value):
            default = params[key].default
            names = list(default) if isinstance(default, (list, tuple)) and len(default) == len(value) else [f"{key}{i + 1}" for i in range(len(value))]
            args[key] = names
            models.update(zip(names, value))
        else:
            args[key] = value
    return FlowGraph(name, fn(**args), models)


def method_api(name: str) -> Callable[..., FlowGraph]:
    """The public callable `kdflow.methods.NAME(...)`: node arguments take nn.Modules, the rest the defaults."""
    fn = METHODS[name].fn

    def call(**kwargs: Any) -> FlowGraph:
        return _bind(name, fn, kwargs)

    call.__name__ = name
    call.__doc__ = f"{METHODS[name].citation}.\n\nArguments as in the method's graph; pass nn.Modules for its nodes.\n\n{fn.__doc__ or ''}"
    call.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    return call
