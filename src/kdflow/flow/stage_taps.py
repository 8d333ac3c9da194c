"""Stage positions: taps that follow the model, so one method file is right on every family of the zoo.

A model's stage list is its ``stage1``..``stageN`` taps in order (the aliases of ``tap_names``, or
modules of those names), i.e. the benchmark's feature list without the stem and the pooled
embedding. Positions name entries of that list:

* ``NODE.stage[i]``: a Python index into the list (``stage[0]`` the first stage, ``stage[-1]`` the last);
* ``NODE.last_stage``: the same as ``stage[-1]``;
* ``NODE.all_stages``: every stage. In a transfer's ``from`` and ``to`` the transfer is repeated once
  per stage, pairing the two nodes' stages in order. Where one model has more stages than the other
  the stages are paired from the deepest (teacher stage2, stage3 with student stage1, stage2 for 3
  and 2 stages, as the grouped criteria AB, OFD and ReviewKD pair their lists), and the stages left
  out are recorded in ``notes`` (the engine prints them); inside a ``{group: [...]}`` it stands for
  the list of all stages;
* a ``_pre`` suffix on any of them (``last_stage_pre``, ``all_stages_pre``) names the pre-activation
  alias of the same stage (``stageK_pre``).

Positions are resolved when the Flow is built (the models are known then); the recipe file keeps them.
"""
from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

from kdflow.flow.errors import RecipeError
from kdflow.flow.spec import FuseSpec, GroupSpec, Recipe, TransferSpec

_STAGE = re.compile(r"^stage(\d+)$")
_POSITION = re.compile(r"^(?:stage\[(-?\d+)\]|(last_stage)|(all_stages))(_pre)?$")


def stage_list(model: nn.Module) -> list[str]:
    """The model's stage taps in order: ``stage1``..``stageN`` among its aliases and module names."""
    names = set(getattr(model, "tap_names", {})) | {n for n, _ in model.named_modules()}
    numbered = sorted((int(m.group(1)), n) for n in names if (m := _STAGE.match(n)))
    return [n for _, n in numbered]


def is_position(tap_name: str) -> bool:
    return _POSITION.match(tap_name) is not None


def resolve_position(model: nn.Module, node: str, tap_name: str) -> list[str]:
    """The concrete tap names a (possibly positional) tap name stands for: one, or all stages for ``all_stages``."""
    m = _POSITION.match(tap_name)
    if m is None:
        return [tap_name]
    stages = stage_list(model)
    if not stages:
        raise RecipeError(f"tap {node}.{tap_name}: {type(model).__name__} has no stage1..stageN taps to take positions from")
    suffix = m.group(4) or ""
    if m.group(3):
        picked = stages
    else:
        index = -1 if m.group(2) else int(m.group(1))
        if not -len(stages) <= index < len(stages):
            raise RecipeError(f"tap {node}.{tap_name}: {type(model).__name__} has {len(stages)} stages ({', '.join(stages)})")
        picked = [stages[index]]
    return [s + suffix for s in picked]


def _resolve(tap: str, models: dict[str, nn.Module]) -> list[str]:
    node, name = tap.split(".", 1)
    return [f"{node}.{n}" for n in resolve_position(models[node], node, name)]


def _expand(i: int, t: TransferSpec, models: dict[str, nn.Module], notes: list[str]) -> list[dict[str, Any]]:
    data = t.model_dump(by_alias=True, exclude_defaults=True)
    if isinstance(t.source, GroupSpec) or isinstance(t.to, GroupSpec):
        for key, spec in (("from", t.source), ("to", t.to)):
            taps = spec.group if isinstance(spec, GroupSpec) else [spec]
            data[key] = {"group": [c for tap in taps for c in _resolve(tap, models)]}
        return [data]
    if isinstance(t.source, FuseSpec):
        fused = [c for tap in t.source.fuse for c in _resolve(tap, models)]
        if len(fused) != len(t.source.fuse):
            raise RecipeError(f"transfers.{i}.from: all_stages cannot be fused; list the stages")
        data["from"] = {**data["from"], "fuse": fused}
        targets = _resolve(t.to, models)
        if len(targets) != 1:
            raise RecipeError(f"transfers.{i}.to: all_stages needs all_stages in 'from' too")
        return [{**data, "to": targets[0]}]
    sources, targets = _resolve(t.source, models), _resolve(t.to, models)
    if len(sources) != len(targets):
        if not ("all_stages" in t.source and "all_stages" in t.to):
            raise RecipeError(f"transfers.{i}: all_stages must be on both sides ('from' {t.source}, 'to' {t.to})")
        n = min(len(sources), len(targets))
        left_out = sources[:-n] + targets[:-n]
        notes.append(
            f"transfers.{i} ({t.criterion}): {t.source} has {len(sources)} stages and {t.to} {len(targets)}; "
            f"paired from the deepest, leaving out {', '.join(left_out)} (list the stage pairs to choose others)"
        )
        sources, targets = sources[-n:], targets[-n:]
    return [{**data, "from": s, "to": g} for s, g in zip(sources, targets)]


def _expand_at(i: int, t: TransferSpec, models: dict[str, nn.Module], notes: list[str]) -> list[dict[str, Any]]:
    try:
        return _expand(i, t, models, notes)
    except RecipeError as e:
        msg = str(e)
        raise RecipeError(msg if msg.startswith("transfers.") else f"transfers.{i}: {msg}") from None


def expand_stage_taps(recipe: Recipe, models: dict[str, nn.Module]) -> tuple[Recipe, list[int], list[str]]:
    """The recipe with every stage position replaced by concrete taps; for each resulting transfer the
    index of the recipe transfer it came from (for error messages); and notes on stages left out."""
    notes: list[str] = []
    if not any(is_position(tap.split(".", 1)[1]) for t in recipe.transfers for tap in [*t.sources, *t.targets]):
        return recipe, list(range(len(recipe.transfers))), notes
    transfers, origin = [], []
    for i, t in enumerate(recipe.transfers):
        if not any(is_position(tap.split(".", 1)[1]) for tap in [*t.sources, *t.targets]):
            transfers.append(t)
            origin.append(i)
            continue
        for data in _expand_at(i, t, models, notes):
            transfers.append(TransferSpec.model_validate(data))
            origin.append(i)
    return recipe.model_copy(update={"transfers": transfers}), origin, notes
