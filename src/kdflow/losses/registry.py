"""The criterion registry: the losses a transfer can name, and what each needs.

A loss becomes a criterion where it is defined, under its own name: ``@criterion()`` above a
plain loss in `kdflow.losses.logits` (and the other family files), or above a module factory in
`kdflow.losses.stateful`. Importing `kdflow.losses` imports every one of those files, so the
registry is full whenever the losses are loaded; nothing else lists them.

A plain criterion is called as ``fn(target_tap, source_tap, **params, **context)``: the
student side first, the same order as the public losses in `kdflow.losses`. Context values
are passed only to criteria whose signature names them:

- ``target``: the batch's labels;
- ``epoch`` / ``epochs``: the epoch (0-based) within the stage and the stage's length;
- ``indices``: the batch's sample indices in the training set (CRD's memory bank);
- ``stage``: the stage's name;
- ``x``: the batch's (augmented, normalised) inputs, for criteria that run a node again on
  inputs of their own (BSS's adversarial samples).

A *module* criterion has trainable parameters or state (VID's variances, CRD's memory bank,
ReviewKD's fusion): it is registered as a factory that builds an nn.Module from the tap
shapes, ``factory(target_shape, source_shape, build, **params)``, where `build` (a
`BuildInfo`) gives the number of training samples, their labels and the source and target models. The
module belongs to the target node: it joins that node's optimizer and checkpoint.

A *grouped* criterion takes lists of taps on both sides (``{group: [...]}``): FSP's pairs of
stages, ReviewKD's stages.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

CONTEXT = ("target", "epoch", "epochs", "indices", "stage", "x")
FACTORY_ARGS = ("target_shape", "source_shape", "build")


@dataclass(frozen=True)
class BuildInfo:
    """What a module criterion's factory may look at when it is built."""

    num_data: int
    source_model: nn.Module | None  # None when the source is fused from several nodes
    target_model: nn.Module
    source_module: str | None  # the dotted module name of the (first) source tap, if it is a module tap
    target_module: str | None
    source_modules: tuple[str | None, ...] = ()  # the module name of every source tap (a grouped criterion's list)
    train_labels: torch.Tensor | None = None  # the training split's labels, by sample index (CRD's class-aware negatives)


@dataclass(frozen=True)
class Criterion:
    name: str
    fn: Callable[..., Any]
    same_shape: bool
    module: bool
    grouped: bool
    params: tuple[str, ...]  # what a recipe may set
    context: tuple[str, ...]  # what the flow passes at call time
    stage_params: tuple[str, ...] = ()  # parameters that name a stage of the recipe (checked at validation)

    def call(self, fn: Callable[..., torch.Tensor], target_tap: Any, source_tap: Any, params: dict, context: dict) -> torch.Tensor:
        wanted = {k: v for k, v in context.items() if k in self.context}
        return fn(target_tap, source_tap, **params, **wanted)


CRITERIA: dict[str, Criterion] = {}


def _keyword_names(fn: Callable[..., Any], skip: int) -> list[str]:
    return [p.name for p in list(inspect.signature(fn).parameters.values())[skip:] if p.kind is not p.VAR_KEYWORD]


def register_criterion(
    name: str,
    fn: Callable[..., Any],
    *,
    same_shape: bool = True,
    module: bool = False,
    grouped: bool = False,
    context: tuple[str, ...] = (),
    stage_params: tuple[str, ...] = (),
) -> Criterion:
    """Register a loss (or, with module=True, a factory of loss modules) under `name`.

    A plain loss's parameters and context come from its signature; a module criterion's
    parameters from the factory's signature, and its context (what its forward takes after the
    two taps) is given here. `stage_params` names the parameters whose value is a stage name
    (FT's paraphrase stage): recipe validation checks that the recipe has that stage.
    """
    if module:
        params = tuple(n for n in _keyword_names(fn, 0) if n not in FACTORY_ARGS)
        unknown = set(context) - set(CONTEXT)
        if unknown:
            raise ValueError(f"criterion {name!r}: unknown context {sorted(unknown)}")
    else:
        names = _keyword_names(fn, 2)
        params = tuple(n for n in names if n not in CONTEXT)
        context = tuple(n for n in names if n in CONTEXT)
    unknown_stage = set(stage_params) - set(params)
    if unknown_stage:
        raise ValueError(f"criterion {name!r}: stage_params {sorted(unknown_stage)} are not among its parameters")
    CRITERIA[name] = Criterion(name, fn, same_shape, module, grouped, params, context, tuple(stage_params))
    return CRITERIA[name]


def criterion(
    name: str | None = None,
    *,
    same_shape: bool = True,
    module: bool = False,
    grouped: bool = False,
    context: tuple[str, ...] = (),
    stage_params: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator form of `register_criterion`: the criterion takes the function's name unless `name` is given."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        register_criterion(
            name or fn.__name__, fn, same_shape=same_shape, module=module, grouped=grouped, context=context, stage_params=stage_params
        )
        return fn

    return register


@dataclass(frozen=True)
class SupervisionLoss:
    """A loss against the labels that a trainable node can be supervised with (`supervise: {node: {loss: NAME}}`)."""

    name: str
    fn: Callable[..., torch.Tensor]  # fn(logits, labels, **params)
    params: tuple[str, ...]


SUPERVISION: dict[str, SupervisionLoss] = {}


def supervision(name: str | None = None) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register `fn(logits, labels, **params)` as a supervision loss, under its own name unless `name` is given."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        key = name or fn.__name__
        SUPERVISION[key] = SupervisionLoss(key, fn, tuple(inspect.signature(fn).parameters)[2:])
        return fn

    return register


# criteria renamed to their loss's name; a recipe that still says the old one gets a one-line error naming the new
RENAMED = {"kl": "kd", "hint_mse": "hint", "annealing_mse": "annealing_kd"}
