"""The teacher registry: trained teachers by key, with the checkpoint's SHA-256, recipe and accuracy.

A registry is a JSON file (default `teachers/registry.json`, or `$KDFLOW_TEACHERS/registry.json`).
A recipe names a registered teacher as ``checkpoint: registry:KEY``; the file is verified
against its recorded SHA-256 before it is loaded, so a changed or truncated file is an error,
never a silent partial load.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kdflow.checkpoint import sha256_of, write_text_atomic
from kdflow.flow.errors import RecipeError

PREFIX = "registry:"


def registry_path() -> Path:
    return Path(os.environ.get("KDFLOW_TEACHERS", "teachers")) / "registry.json"


def read_registry(path: Path | None = None) -> dict[str, dict[str, Any]]:
    path = path or registry_path()
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}: not a valid teacher registry ({e})") from None


def register_teacher(
    key: str, checkpoint: Path, arch: str, data: str, recipe: Path, top1: float | None, path: Path | None = None
) -> dict:
    """Record `checkpoint` under `key` (replacing an older entry of that key)."""
    path = path or registry_path()
    entries = read_registry(path)
    entries[key] = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "sha256": sha256_of(Path(checkpoint)),
        "arch": arch,
        "data": data,
        "recipe": str(Path(recipe).resolve()),
        "top1": top1,
        "registered": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_text_atomic(path, json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return entries[key]


def resolve_checkpoint(spec: str, where: str) -> str:
    """A recipe's checkpoint field: a path as it is, or `registry:KEY` -> the verified registered file."""
    if not spec.startswith(PREFIX):
        return spec
    key = spec[len(PREFIX) :]
    path = registry_path()
    entries = read_registry(path)
    if key not in entries:
        known = ", ".join(sorted(entries)) or "none"
        raise RecipeError(f"{where}: no teacher {key!r} in {path} (registered: {known}); train one with `kdflow teacher train`")
    entry = entries[key]
    file = Path(entry["checkpoint"])
    if not file.is_file():
        raise RecipeError(f"{where}: teacher {key!r} is registered at {file}, which does not exist")
    digest = sha256_of(file)
    if digest != entry["sha256"]:
        raise RecipeError(f"{where}: checksum mismatch for teacher {key!r}: {file} has SHA-256 {digest[:12]}…, the registry records {entry['sha256'][:12]}…")
    return str(file)
