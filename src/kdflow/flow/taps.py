"""Taps: knowledge read off a model by forward hooks, so any nn.Module works unedited.

Tap names: ``logits`` (the model's output), ``embedding`` (the input of the model's last
nn.Linear, i.e. the pooled penultimate features), a dotted module name (``stage2``,
``features.12``: that module's output), or ``NAME:input`` (that module's first input).
A module that runs more than once in a forward pass must be tapped with the call it means,
``NAME@K`` (the K-th call, from 1). A model may publish stable tap names in a ``tap_names`` dict attribute (alias -> dotted module
name, e.g. ``{"stage3_pre": "layer3.4.preact"}``); an alias resolves before module names.
"""
from __future__ import annotations

import difflib

import torch
import torch.nn as nn

from kdflow.flow.errors import RecipeError


def last_linear_name(model: nn.Module) -> str | None:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def resolve_module(model: nn.Module, node: str, tap: str) -> tuple[str, bool]:
    """(module name, capture input?) for a tap; a name not in the model lists the nearest valid ones."""
    if tap == "embedding":
        name = last_linear_name(model)
        if name is None:
            raise RecipeError(f"tap {node}.embedding: the model has no nn.Linear whose input is the embedding")
        return name, True
    name, _, kind = tap.split("@", 1)[0].partition(":")
    if kind not in ("", "input"):
        raise RecipeError(f"tap {node}.{tap}: suffix must be ':input', not ':{kind}'")
    aliases: dict[str, str] = getattr(model, "tap_names", {})
    name = aliases.get(name, name)
    names = module_names(model)
    if name not in names:
        near = difflib.get_close_matches(name, list(aliases) + names + ["logits", "embedding"], n=5, cutoff=0.3)
        hint = ", ".join(near) if near else ", ".join(names[:8])
        raise RecipeError(f"tap {node}.{tap}: no module {name!r} in {type(model).__name__}; nearest: {hint}")
    return name, kind == "input"


def model_logits(output: object) -> torch.Tensor:
    """The logits of a forward's output: a tensor, the first element of a tuple, or output['logits']."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    raise RecipeError(f"cannot find logits in a model output of type {type(output).__name__}")


class TapRecorder:
    """Hooks on one model's tapped modules; `run` returns every tap's value for one forward pass."""

    def __init__(self, node: str, model: nn.Module, taps: set[str]) -> None:
        self.node = node
        self.model = model
        self.taps = sorted(taps)
        self.values: dict[str, torch.Tensor] = {}
        self.versions: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.recording = False
        self.handles = []
        modules = dict(model.named_modules())
        for tap in self.taps:
            if tap == "logits":
                continue
            name, capture_input = resolve_module(model, node, tap)
            self.handles.append(modules[name].register_forward_hook(self._hook(tap, capture_input)))

    def _hook(self, tap: str, capture_input: bool):
        call = int(tap.rsplit("@", 1)[1]) if "@" in tap else None

        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if not self.recording:
                return
            self.calls[tap] = self.calls.get(tap, 0) + 1
            if call is not None:
                if self.calls[tap] != call:
                    return
            elif tap in self.values:
                raise RecipeError(
                    f"tap {self.node}.{tap}: the module ran twice in one forward pass; say which call with {tap}@K (K from 1)"
                )
            value = inputs[0] if capture_input else output
            if not isinstance(value, torch.Tensor):
                raise RecipeError(f"tap {self.node}.{tap}: the module's {'input' if capture_input else 'output'} is not a tensor")
            self.values[tap] = value
            if not value.is_inference():  # inference tensors have no version counter; the dry run checks them
                self.versions[tap] = value._version

        return hook

    def run(self, x: torch.Tensor, runner: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Every tap's value for one forward pass of the model, or of `runner` (a wrapper such as DDP
        around the same model, whose forward calls the model's)."""
        self.values, self.versions, self.calls = {}, {}, {}
        self.recording = True
        try:
            output = (runner if runner is not None else self.model)(x)
        finally:
            self.recording = False
        values = dict(self.values)
        for tap, version in self.versions.items():
            if values[tap]._version != version:
                # e.g. a pre-activation tap followed by ReLU(inplace=True): the captured value was overwritten
                raise RecipeError(
                    f"tap {self.node}.{tap}: its value was modified in place later in the forward pass "
                    "(an inplace activation?); tap another module or make that activation not inplace"
                )
        values["logits"] = model_logits(output)
        missing = [t for t in self.taps if t not in values]
        if missing:
            tap = missing[0]
            ran = self.calls.get(tap, 0)
            why = f"the module ran {ran} time(s)" if ran else "the module did not run in the forward pass"
            raise RecipeError(f"tap {self.node}.{tap}: {why}")
        return values

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
