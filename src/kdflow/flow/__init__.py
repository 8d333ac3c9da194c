"""The flow graph: nodes, taps, transfers, fusion, stages, and the recipe schema.

Recipes that name methods are resolved one layer up, by `kdflow.methods.recipe` (`resolve`, `load_recipe`).
"""
from kdflow.flow.errors import RecipeError
from kdflow.flow.recipe import apply_overrides, dump_recipe, validate
from kdflow.flow.spec import Recipe

__all__ = ["Recipe", "RecipeError", "apply_overrides", "dump_recipe", "validate"]
