"""Checkpoint files: written atomically, read without unpickling arbitrary objects."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

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


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def read_model_file(path: str | Path) -> dict:
    """Read a model checkpoint written by `model_file`; a bare state dict is accepted too (no metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        obj = load_safe(path)
    except Exception as e:  # a pickle with arbitrary objects, or not a torch file at all
        raise ValueError(f"{path}: not a loadable weights-only checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        return obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": obj}
    raise ValueError(f"{path}: not a kdflow model checkpoint or a state dict")
