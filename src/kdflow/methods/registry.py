"""The method registry: a method is a function returning a flow graph with a paper's defaults.

The graph is plain data in the recipe's shape: ``{"nodes": {name: {"role": ...}},
"supervise": {...}, "transfers": [...]}``. A recipe names methods under ``method:`` and
supplies the architectures; its own fields override the method's.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from kdflow.flow.arguments import argument_error
from kdflow.flow.errors import RecipeError

Graph = dict[str, Any]

# the most nodes a method makes from a count (SLKD's SL-Ts, Born-Again's generations): each is a model to train, and
# a count like 2**31 would fill the memory before validation ends
MAX_MADE_NODES = 100


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Graph]
    citation: str
    knowledge: str  # logits, features, relations, or none


METHODS: dict[str, Method] = {}


def register_method(name: str, citation: str, knowledge: str) -> Callable[[Callable[..., Graph]], Callable[..., Graph]]:
    def wrap(fn: Callable[..., Graph]) -> Callable[..., Graph]:
        METHODS[name] = Method(name, fn, citation, knowledge)
        return fn

    return wrap


def teacher_student(teacher: str, student: str, ce_weight: float | dict[str, Any], transfers: list[dict[str, Any]], **fields: Any) -> Graph:
    """The graph most methods are: a frozen teacher, a trainable student with CE on the labels at
    `ce_weight` (a weight, or `{weight, stages}` for a staged method), and the method's `transfers` (plus any
    other recipe fields: `stages`, ...)."""
    return {
        "nodes": {teacher: {"role": "frozen"}, student: {"role": "trainable"}},
        "supervise": {student: ce_weight},
        "transfers": transfers,
        **fields,
    }


def method_graph(name: str, **args: Any) -> Graph:
    """The graph of method `name` with its defaults, overridden by `args`."""
    if name not in METHODS:
        raise RecipeError(f"method: unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    fn = METHODS[name].fn
    accepted = inspect.signature(fn).parameters
    for key in args:
        if key not in accepted:
            raise RecipeError(f"method.{name}: unknown field {key!r}; {name} takes {', '.join(accepted)}")
        problem = argument_error(fn, key, args[key])
        if problem:
            raise RecipeError(f"method.{name}.{problem}")
    try:
        return fn(**args)
    except (TypeError, ValueError) as e:  # a value the method refuses (dml with one peer)
        raise RecipeError(f"method.{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _method_entries(spec: Any) -> list[tuple[str, dict]]:
    items = spec if isinstance(spec, list) else [spec]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, {}))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            out.append((item["name"], {k: v for k, v in item.items() if k != "name"}))
        else:
            raise RecipeError(f"method: expected a name or {{name: ..., args...}}, got {item!r}")
    return out


PRESET_FIELDS = ("args", "train")


def apply_presets(raw: dict) -> dict:
    """Apply the recipe's `presets` (usually from a protocol or pair file) for the methods it names.

    ``presets: {METHOD: {args: {...}, train: {...}}}``: `args` are METHOD's arguments, under the ones the
    recipe gives explicitly (so ``--set method.beta=6`` still wins); `train` merges over the recipe's
    `train` (a benchmark's per-method batch size and learning rate). Presets of methods the recipe does
    not use are ignored; the key is removed.
    """
    if "presets" not in raw:
        return raw
    raw = copy.deepcopy(raw)
    presets = raw.pop("presets") or {}
    if not isinstance(presets, dict):
        raise RecipeError(f"presets: expected a mapping of method names, got {type(presets).__name__}")
    for name, preset in presets.items():
        if name not in METHODS:
            raise RecipeError(f"presets.{name}: unknown method; known: {', '.join(sorted(METHODS))}")
        if not isinstance(preset, dict):
            raise RecipeError(f"presets.{name}: expected a mapping with {' and/or '.join(PRESET_FIELDS)}")
        for key, value in preset.items():
            if key not in PRESET_FIELDS:
                raise RecipeError(f"presets.{name}: expected a mapping with {' and/or '.join(PRESET_FIELDS)}; unknown field {key!r}")
            if value is not None and not isinstance(value, dict):
                raise RecipeError(f"presets.{name}.{key}: expected a mapping, got {type(value).__name__}")
    if "method" not in raw:
        return raw
    entries = []
    for name, args in _method_entries(raw["method"]):
        preset = presets.get(name, {})
        entries.append({"name": name, **(preset.get("args") or {}), **args})
        for key, value in preset.items():
            if key != "args" and value:
                if not isinstance(raw.get(key) or {}, dict):
                    raise RecipeError(f"{key}: expected a mapping, got {type(raw[key]).__name__}")
                raw[key] = _merged(raw.get(key) or {}, value)
    raw["method"] = entries if isinstance(raw["method"], list) else entries[0]
    return raw


def _merged(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def expand_methods(raw: dict) -> dict:
    """Merge the graphs of the recipe's `method:` entries into the recipe (recipe fields win).

    Nodes merge field by field; the first method sets a node's supervision; transfers add up;
    the first method that has stages sets them, unless the recipe gives its own; `drop` and
    `ensembles` merge by key.
    """
    raw = apply_presets(raw)
    if "method" not in raw:
        return raw
    raw = copy.deepcopy(raw)
    nodes: dict[str, dict] = {}
    supervise: dict[str, Any] = {}
    transfers: list[dict] = []
    stages: list[dict] = []
    extras: dict[str, dict] = {"drop": {}, "ensembles": {}}
    for name, args in _method_entries(raw.pop("method")):
        graph = method_graph(name, **args)
        for node, fields in graph.get("nodes", {}).items():
            nodes.setdefault(node, {}).update(fields)
        for node, weight in graph.get("supervise", {}).items():
            supervise.setdefault(node, weight)  # the first method sets a node's CE weight
        transfers += graph.get("transfers", [])
        stages = stages or list(graph.get("stages", []))  # the first method with stages sets them
        for key in extras:
            extras[key].update(graph.get(key, {}))
    for node, fields in _own(raw, "nodes", dict).items():
        if not isinstance(fields or {}, dict):
            raise RecipeError(f"nodes.{node}: expected a mapping of node fields, got {type(fields).__name__}")
        nodes.setdefault(node, {}).update(fields or {})
    raw["nodes"] = nodes
    raw["supervise"] = {**supervise, **_own(raw, "supervise", dict)}
    # the recipe's own transfers first, so an error's index matches the recipe file
    raw["transfers"] = list(_own(raw, "transfers", list)) + transfers
    if stages and not raw.get("stages"):
        raw["stages"] = stages
    for key, values in extras.items():
        if values:
            raw[key] = {**values, **_own(raw, key, dict)}
    return raw


def _own(raw: dict, key: str, kind: type) -> Any:
    """The recipe's own `key` (empty if absent), which the methods' graphs merge with: a mapping or a list."""
    value = raw.get(key) or kind()
    if not isinstance(value, kind):
        raise RecipeError(f"{key}: expected a {'mapping' if kind is dict else 'list'}, got {type(value).__name__}")
    return value
