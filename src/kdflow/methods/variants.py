"""What `kdflow describe METHOD` prints beside the graph: the method's arguments with their defaults, and
the variants the recipes define (method files that set its arguments, protocol and pair presets)."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml

from kdflow.methods.registry import METHODS


def arguments(name: str) -> list[tuple[str, Any, str]]:
    """(argument, default, type) of method `name`, in its signature's order."""
    out = []
    for p in inspect.signature(METHODS[name].fn).parameters.values():
        kind = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
        out.append((p.name, p.default, kind))
    return out


def _entries(method_field: Any) -> list[dict[str, Any]]:
    entries = method_field if isinstance(method_field, list) else [method_field]
    return [e if isinstance(e, dict) else {"name": e} for e in entries if isinstance(e, (dict, str))]


def recipe_variants(name: str, root: Path) -> list[tuple[str, dict[str, Any]]]:
    """(file, the arguments it sets) for every recipe under `root` that names method `name` with arguments,
    or carries a preset for it; files that do not parse are skipped (`kdflow train` reports them)."""
    found = []
    for path in sorted(root.rglob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(raw, dict):
            continue
        where = str(path.relative_to(root.parent))
        for entry in _entries(raw.get("method")):
            args = {k: v for k, v in entry.items() if k != "name"}
            if entry.get("name") == name and args:
                found.append((where, args))
        preset = (raw.get("presets") or {}).get(name) if isinstance(raw.get("presets"), dict) else None
        if isinstance(preset, dict):
            changes = {**(preset.get("args") or {}), **{f"train.{k}": v for k, v in (preset.get("train") or {}).items()}}
            if changes:
                found.append((f"{where} (preset)", changes))
    return found
