"""The one error type for a bad recipe: a single line naming the place."""


class RecipeError(Exception):
    """A recipe that cannot run. The message names the field, file, node or layer at fault."""


def yaml_error(source: str, e: Exception) -> RecipeError:
    """A yaml.YAMLError as one line naming the file (or other source), line and column (1-based)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or (str(e).splitlines() or ["unreadable"])[0]
    context = getattr(e, "context", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return RecipeError(f"{source}{where}: not valid YAML: {problem}" + (f" ({context})" if context else ""))
