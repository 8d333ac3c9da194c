"""The flow graph: nodes, taps, transfers, fusion, stages, and the recipe schema."""
from kdflow.flow.errors import RecipeError
from kdflow.flow.recipe import apply_overrides, dump_recipe, load_recipe, resolve
from kdflow.flow.spec import Recipe

__all__ = ["Recipe", "RecipeError", "apply_overrides", "dump_recipe", "load_recipe", "resolve"]
