"""Checkpoint files: written atomically, read without unpickling arbitrary objects."""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

MODEL_FORMAT = "kdflow.model/1"


def temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file in `path`'s folder (so the final rename is atomic), with the usual file mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files
    return fd, tmp


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so a rename in it survives a crash (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stray_temps(folder: Path) -> list[Path]:
    """Remove the temporary files (`.NAME.XXXX.tmp`, from `temp_beside`) that an interrupted atomic write
    left in `folder`; returns them."""
    stray = sorted(p for p in Path(folder).glob(".*.tmp") if p.is_file())
    for p in stray:
        p.unlink(missing_ok=True)
    return stray


def write_atomic(path: str | Path, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Call `write` on a temporary file in `path`'s folder, fsync it, rename it over `path`, fsync the
    folder; the temporary file is removed if anything fails."""
    path = Path(path)
    try:
        fd, tmp = temp_beside(path)
    except OSError as e:  # a read-only or missing folder: name the file we meant to write
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk: the error names the target, not the temporary file; the old file stays
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (`write_atomic`)."""
    write_atomic(path, lambda f: f.write(text), "w")


def sha256_of(*paths: str | Path) -> str:
    """The SHA-256 of the files' bytes, read in order (one digest for a multi-file teacher cache)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically (`write_atomic`); a full disk is an OSError naming `path`."""
    write_atomic(path, lambda f: torch.save(obj, f))


def load_safe(path: str | Path) -> Any:
    """Load tensors and plain containers only (`weights_only=True`), onto the CPU."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def model_file(arch: str, args: dict, num_classes: int, input_shape: tuple[int, ...], state_dict: dict, **meta: Any) -> dict:
    """The content of a model checkpoint: weights plus what is needed to rebuild and evaluate the model."""
    return {
        "format": MODEL_FORMAT,
        "arch": arch,
        "args": dict(args),
        "num_classes": num_classes,
        "input_shape": list(input_shape),
        "state_dict": state_dict,
        **meta,
    }


# where other code bases keep the weights in a checkpoint dict: RepDistiller and mdistiller save
# {'model': state_dict, ...}; others use 'state_dict' or 'net'
FOREIGN_WEIGHT_KEYS = ("model", "state_dict", "net")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys saved from a DataParallel / DDP wrapper carry 'module.'; the model's own keys do not."""
    if all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def read_model_file(path: str | Path) -> dict:
    """Read a model checkpoint: kdflow's format (`model_file`), a bare state dict, or another code base's
    checkpoint dict holding the state dict under 'model', 'state_dict' or 'net' (RepDistiller, mdistiller),
    with any 'module.' prefix removed. Read with weights_only loading only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        obj = load_safe(path)
    except Exception as e:  # a pickle with arbitrary objects, or not a torch file at all
        raise ValueError(f"{path}: not a loadable weights-only checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        return obj
    if _is_state_dict(obj):
        return {"state_dict": _strip_module_prefix(obj)}
    if isinstance(obj, dict):
        for key in FOREIGN_WEIGHT_KEYS:
            if _is_state_dict(obj.get(key)):
                return {"state_dict": _strip_module_prefix(obj[key]), "source_key": key}
    keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(
        f"{path}: not a kdflow model checkpoint, a state dict, or a dict with one under "
        f"{', '.join(repr(k) for k in FOREIGN_WEIGHT_KEYS)} (found: {keys})"
    )


def state_dict_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """One line naming the missing, unexpected and wrongly shaped keys of `state` for `model`, or None if it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]

    def listed(what: str, keys: list[str]) -> str:
        more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
        return f"{len(keys)} {what}: {', '.join(keys[:3])}{more}"

    parts = [listed(w, k) for w, k in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if k]
    return "; ".join(parts) if parts else None
