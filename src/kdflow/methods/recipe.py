"""Recipes with methods: a recipe's `method:` entries and presets expanded into its graph, then validated.

This sits on the methods layer (it needs the method registry); `kdflow.flow.recipe` below it reads,
merges, overrides and validates graphs that are already expanded.
"""
from __future__ import annotations

from pathlib import Path

from kdflow.flow.errors import RecipeError
from kdflow.flow.recipe import apply_overrides, merge, read_yaml, validate
from kdflow.flow.spec import Recipe
from kdflow.methods.registry import apply_presets, expand_methods


def resolve(raw: dict, source: str = "recipe") -> Recipe:
    """Expand methods into the graph and validate; any fault is one RecipeError line naming the place."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping, got {type(raw).__name__}")
    try:
        expanded = expand_methods(raw)
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None
    return validate(expanded, source)


def load_recipe(paths: str | Path | list[str | Path], overrides: list[str] | None = None) -> Recipe:
    """Read one recipe file, or compose several (e.g. a teacher-student pair file, then a method file:
    later files override earlier ones), then apply `--set` overrides and validate."""
    paths = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    raw: dict = {}
    for path in paths:
        raw = merge(raw, read_yaml(path))
    source = " + ".join(str(p) for p in paths)
    try:
        raw = apply_presets(raw)  # before --set, so an override wins over a preset
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None
    return resolve(apply_overrides(raw, overrides or []), source)
