"""Settled nodes: their weights are final and already in a file, so `last.pt` names the file and its hash
instead of holding the weights again every epoch.

A node is settled from stage `si` on when no stage from `si` on trains it. Its weights are then those of
`nodes/NODE.pt` (written when the last stage that trained it ended), or, for a node no stage trains, its
`checkpoint` file (loaded when the flow is built). Frozen nodes run in eval mode without gradients and
batch-statistics forwards leave the running buffers alone, so the weights in memory stay the file's.
A node that neither trains nor has a checkpoint (a random frozen network) is kept in `last.pt` as before.
On `--resume` each referenced file must still hash to what `last.pt` recorded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kdflow.checkpoint import read_model_file, sha256_of
from kdflow.flow.errors import RecipeError
from kdflow.flow.spec import Recipe, StageSpec
from kdflow.teachers import resolve_checkpoint

_hashes: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> sha256: each file is hashed once


def cached_sha256(path: Path) -> str:
    """`sha256_of(path)`, computed once per (path, mtime, size)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _hashes:
        _hashes[key] = sha256_of(path)
    return _hashes[key]


def settled_files(recipe: Recipe, stages: list[StageSpec], stage_index: int, out: Path) -> dict[str, Path]:
    """The settled nodes from stage `stage_index` on, each with the file that holds its weights."""
    later = {n for s in stages[stage_index:] for n in s.train}
    earlier = {n for s in stages[:stage_index] for n in s.train}
    files = {}
    for name, spec in recipe.nodes.items():
        if name in later:
            continue
        if name in earlier:
            files[name] = out / "nodes" / f"{name}.pt"
        elif spec.checkpoint:
            files[name] = Path(resolve_checkpoint(spec.checkpoint, f"nodes.{name}.checkpoint"))
    return files


def _prefix(node: str) -> str:
    return f"models.{node}."


def without_settled(state: dict[str, Any], files: dict[str, Path], out: Path) -> tuple[dict[str, Any], dict[str, dict]]:
    """The flow's state without the settled nodes' weights, and a reference per settled node: its file
    (relative to the run directory when inside it, so a moved run directory still resumes) and SHA-256."""
    refs = {}
    for node, path in files.items():
        own = path == out / "nodes" / f"{node}.pt"
        refs[node] = {"file": f"nodes/{node}.pt" if own else str(path), "sha256": cached_sha256(path)}
    prefixes = tuple(_prefix(n) for n in files)
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}, refs


def restore_settled(models: nn.ModuleDict, refs: dict[str, dict], files: dict[str, Path], out: Path) -> None:
    """Check that each referenced file still holds what `last.pt` recorded and give its node those weights
    (a checkpoint node has them already: the flow loaded its file when it was built)."""
    if set(refs) != set(files):
        raise RecipeError(
            f"--resume: {out / 'last.pt'} refers to the files of {sorted(refs)}, the recipe settles {sorted(files)}; "
            "resume with the run's own recipe"
        )
    for node, ref in refs.items():
        path = files[node]
        if not path.is_file():
            raise RecipeError(f"--resume: {path} (the weights of node {node}, referenced by last.pt) is missing")
        digest = cached_sha256(path)
        if digest != ref["sha256"]:
            raise RecipeError(
                f"--resume: {path} changed since last.pt referenced it as node {node}'s weights "
                f"(SHA-256 {digest[:12]}…, recorded {ref['sha256'][:12]}…); restore that file or start a new run"
            )
        if path == out / "nodes" / f"{node}.pt":  # written when its stage ended: not loaded at build time
            models[node].load_state_dict(read_model_file(path)["state_dict"])


def check_unchanged(models: nn.ModuleDict, files: dict[str, Path]) -> None:
    """Once at the end of a run: each settled node still holds its file's weights (what `last.pt` promised
    a resume would find). A difference is a bug in kdflow, not in the recipe."""
    for node, path in files.items():
        saved = read_model_file(path)["state_dict"]
        own = models[node].state_dict()
        changed = [k for k, v in saved.items() if not torch.equal(own[k].cpu(), v)]
        if changed:
            raise RuntimeError(f"frozen node {node} no longer equals {path} ({len(changed)} tensors differ, e.g. {changed[0]})")
