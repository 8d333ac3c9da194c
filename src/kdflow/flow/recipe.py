"""Loading a recipe: YAML (or a dict), `--set` overrides, method expansion, validation."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdflow.flow.errors import RecipeError, yaml_error
from kdflow.flow.spec import Recipe


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.epochs=1' -> (['train', 'epochs'], 1); the value is read as YAML."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE")
    key, value = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise RecipeError(f"--set {item!r}: empty key")
    try:
        return path, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise yaml_error(f"--set {item!r}", e) from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        cursor = raw
        for i, key in enumerate(path[:-1]):
            nxt = cursor.get(key)
            if nxt is None:
                nxt = cursor[key] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {item!r}: {'.'.join(path[: i + 1])} is not a mapping")
            cursor = nxt
        cursor[path[-1]] = value
    return raw


def format_validation_error(err: ValidationError) -> str:
    """A pydantic error as one line: `field.path: message; ...`, unknown fields named as such."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "function_")))
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`: mappings merge key by key, anything else (lists included) is replaced."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise yaml_error(str(path), e) from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping, got {type(raw).__name__}")
    return raw


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True, exclude_defaults=False), sort_keys=False)


def validate(expanded: dict, source: str = "recipe") -> Recipe:
    """Validate a recipe whose methods are already expanded into its graph; a fault is one RecipeError line."""
    try:
        return Recipe.model_validate(expanded)
    except ValidationError as e:
        raise RecipeError(f"{source}: {format_validation_error(e)}") from None
