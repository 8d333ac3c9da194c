"""The model registry: architectures by name, built for a dataset's input shape and classes."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        MODELS[name] = fn
        return fn

    return wrap


def build_model(arch: str, num_classes: int, input_shape: tuple[int, ...], **args) -> nn.Module:
    """Build `arch` for inputs of shape C×H×W (or C×L) and `num_classes` outputs."""
    if arch not in MODELS:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(sorted(MODELS))}")
    model = MODELS[arch](num_classes=num_classes, input_shape=tuple(input_shape), **args)
    # how it was built, so a fresh model of the same architecture can be built again (the API's same_as nodes)
    model.kdflow_build = {"arch": arch, "num_classes": num_classes, "input_shape": tuple(input_shape), **args}
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
