"""Model cost and tap shapes, measured by forward hooks on one sample.

``count_flops`` counts multiply-accumulates (MACs) of convolutions and linear layers only (no
biases, norms, activations or pooling), the convention of the distillation benchmarks' tables.
``stage_shapes`` gives the per-sample output shape of each ``tap_names`` alias of a model.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def _run_one(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """One eval-mode, no-grad forward pass on a zero sample; the model's mode and device are kept."""
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)


def _macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # every input element is multiplied into out_channels/groups × kernel outputs
        return inputs[0].numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvNd):
        # every output element is a dot product over in_channels/groups × kernel inputs
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, nn.Bilinear):
        return output.numel() * module.in1_features * module.in2_features
    return 0


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the conv and linear layers for one sample of shape `input_shape` (C×H×W)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += _macs(module, inputs, output)

    kinds = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        _run_one(model, tuple(input_shape))
    finally:
        for h in handles:
            h.remove()
    return total


def stage_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The per-sample output shape (no batch dimension) of each alias in the model's ``tap_names``."""
    aliases: dict[str, str] = getattr(model, "tap_names", {})
    modules = dict(model.named_modules())
    missing = [a for a, name in aliases.items() if name not in modules]
    if missing:
        raise KeyError(f"tap_names alias {missing[0]!r} names no module ({aliases[missing[0]]!r})")
    shapes: dict[str, tuple[int, ...]] = {}

    def hook_for(alias: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if alias not in shapes and isinstance(output, torch.Tensor):
                shapes[alias] = tuple(output.shape[1:])

        return hook

    handles = [modules[name].register_forward_hook(hook_for(alias)) for alias, name in aliases.items()]
    try:
        _run_one(model, tuple(input_shape))
    finally:
        for h in handles:
            h.remove()
    return {alias: shapes[alias] for alias in aliases if alias in shapes}
