"""The one error type for a bad recipe: a single line naming the place."""


class RecipeError(Exception):
    """A recipe that cannot run. The message names the field, file, node or layer at fault."""
