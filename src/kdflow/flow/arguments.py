"""A recipe's arguments to a function (a method, a criterion, a supervision loss) checked against its annotations.

Strict: a YAML value must already be of the annotated type (an int passes for a float; a string, a list or a
bool does not pass for a number), so a wrong type is one line naming the argument instead of a traceback from
inside the function. Annotations pydantic cannot check (a tensor, a module) are not checked.
"""
from __future__ import annotations

import functools
import typing
from typing import Any, Callable

from pydantic import TypeAdapter, ValidationError


@functools.cache
def _adapters(fn: Callable[..., Any]) -> dict[str, TypeAdapter]:
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: nothing of this function is checked
        return {}
    out = {}
    for name, hint in hints.items():
        try:
            out[name] = TypeAdapter(hint)
        except Exception:  # a type pydantic has no schema for
            continue
    return out


def argument_error(fn: Callable[..., Any], key: str, value: Any) -> str | None:
    """`KEY: problem` when `value` is not of the type `fn` annotates for its parameter `key`, else None."""
    adapter = _adapters(fn).get(key)
    if adapter is None:
        return None
    try:
        adapter.validate_python(value, strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        return ".".join([key, *(str(p) for p in first["loc"])]) + f": {first['msg']}, got {value!r}"
    return None
