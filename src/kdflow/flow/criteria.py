"""The criterion registry: the losses a transfer can name, and what each needs.

A criterion is called as ``fn(target_tap, source_tap, **params)`` (student side first, the
same order as the public losses), plus ``target=labels`` when it needs the labels.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from kdflow import losses


@dataclass(frozen=True)
class Criterion:
    name: str
    fn: Callable[..., torch.Tensor]
    same_shape: bool = True  # target and source taps must have equal shapes (after the connector)
    needs_labels: bool = False
    params: tuple[str, ...] = field(default=())

    def call(self, target_tap: torch.Tensor, source_tap: torch.Tensor, labels: torch.Tensor, params: dict) -> torch.Tensor:
        if self.needs_labels:
            return self.fn(target_tap, source_tap, target=labels, **params)
        return self.fn(target_tap, source_tap, **params)


CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, fn: Callable[..., torch.Tensor], *, same_shape: bool = True, needs_labels: bool = False) -> Criterion:
    """Register `fn`; its keyword parameters after the two taps (and `target`) are what a transfer may set."""
    sig = list(inspect.signature(fn).parameters.values())[2:]
    params = tuple(p.name for p in sig if p.name != "target")
    CRITERIA[name] = Criterion(name, fn, same_shape, needs_labels, params)
    return CRITERIA[name]


def hint_mse(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements (FitNet's hint loss, Romero et al. 2015)."""
    return torch.nn.functional.mse_loss(student_feature.float(), teacher_feature.float())


register_criterion("kl", losses.kd)
register_criterion("hint_mse", hint_mse)
