"""CIFAR-10 and CIFAR-100 from the published "python version" pickle directories."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from kdflow.data.base import ArrayDataset, DatasetError, register_dataset

_HOW = (
    "download the CIFAR {kind} 'python version' from https://www.cs.toronto.edu/~kriz/cifar.html "
    "and extract it under a folder (giving <folder>/{dirname}/), then pass data.root=<folder> "
    "or set KDFLOW_CIFAR=<folder>"
)


def _batches_dir(root: str | os.PathLike | None, dirname: str, marker: str, hint: str) -> Path:
    """`root` may be the extracted directory itself or the folder that holds it."""
    base = Path(root if root is not None else os.environ.get("KDFLOW_CIFAR") or "./data")
    if (base / dirname).is_dir():
        return base / dirname
    if (base / marker).is_file():
        return base
    raise DatasetError(f"missing {base / dirname} (nor {base / marker}); {hint}")


# What a CIFAR pickle holds besides plain containers: numpy arrays (the `data` rows), their dtypes and, in files
# re-pickled by Python 3, the byte strings of protocol 2 (_codecs.encode) and the array buffers of protocol 5
# (_frombuffer). numpy 2 renamed numpy.core to numpy._core; a file names the one it was written by. Each of these
# only builds arrays or bytes from data.
_ALLOWED = {
    *((f"{core}.multiarray", name) for core in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")),
    *((f"{core}.numeric", "_frombuffer") for core in ("numpy.core", "numpy._core")),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global outside `_ALLOWED`."""


class CifarUnpickler(pickle.Unpickler):
    """Reads plain containers, strings, numbers and numpy arrays; any other global (a function or class a
    crafted file would call: os.system, builtins.eval, ...) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED:
            raise RefusedGlobal(f"refused global {module}.{name} (a CIFAR batch holds only arrays and lists)")
        return super().find_class(module, name)


def _unpickle(path: Path, keys: tuple[bytes, ...], hint: str) -> dict:
    if not path.is_file():
        raise DatasetError(f"missing {path}; {hint}")
    try:
        with open(path, "rb") as f:
            # The published CIFAR files are Python pickles (that is the distribution format): read through
            # CifarUnpickler, so a file that carries code is refused rather than run.
            d = CifarUnpickler(f, encoding="bytes").load()
    except RefusedGlobal as e:
        raise DatasetError(f"{path}: not a plain CIFAR pickle: {e}; {hint}") from None
    except Exception as e:  # unpickling garbage can raise almost anything
        first = str(e).splitlines()[0] if str(e) else ""
        raise DatasetError(f"cannot unpickle {path}: {type(e).__name__}: {first}; {hint}") from None
    if not isinstance(d, dict) or any(k not in d for k in keys):
        want = ", ".join(repr(k) for k in keys)
        raise DatasetError(f"{path} is not a CIFAR batch (needs a dict with keys {want}); {hint}")
    return d


def _load_batches(
    paths: list[Path], label_key: bytes, num_classes: int, hint: str
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for p in paths:
        d = _unpickle(p, (b"data", label_key), hint)
        try:
            data = np.asarray(d[b"data"])
            labels = np.asarray(d[label_key], dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{p}: unreadable data or labels ({e}); {hint}") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
            raise DatasetError(
                f"{p}: b'data' is {data.dtype} {data.shape}, expected uint8 N×3072; {hint}"
            )
        if labels.shape != (data.shape[0],):
            raise DatasetError(f"{p}: {data.shape[0]} images but {labels.shape} labels; {hint}")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DatasetError(f"{p}: labels outside 0..{num_classes - 1}; {hint}")
        xs.append(data)
        ys.append(labels)
    # Each row is the R plane, then G, then B, each 32×32 row-major.
    x = np.concatenate(xs).reshape(-1, 3, 32, 32)
    return torch.from_numpy(x), torch.from_numpy(np.concatenate(ys))


def _check_meta(path: Path, key: bytes, num_classes: int, hint: str) -> None:
    """The meta file is optional for loading, but if present it must agree on the class count."""
    if path.is_file():
        names = _unpickle(path, (key,), hint)[key]
        if len(names) != num_classes:
            raise DatasetError(f"{path}: {len(names)} {key.decode()}, expected {num_classes}; {hint}")


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', not {split!r}")


@register_dataset("cifar10")
def cifar10(split: str, root: str | os.PathLike | None = None) -> ArrayDataset:
    """CIFAR-10 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images"): 32×32 RGB, 10 classes.

    root: `cifar-10-batches-py/` or its parent; default $KDFLOW_CIFAR, else ./data.
    """
    _check_split(split)
    hint = _HOW.format(kind="-10", dirname="cifar-10-batches-py")
    d = _batches_dir(root, "cifar-10-batches-py", "test_batch", hint)
    _check_meta(d / "batches.meta", b"label_names", 10, hint)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    x, y = _load_batches([d / n for n in names], b"labels", 10, hint)
    return ArrayDataset(
        name="cifar10",
        x=x,
        y=y,
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )


@register_dataset("cifar100")
def cifar100(split: str, root: str | os.PathLike | None = None, label_kind: str = "fine") -> ArrayDataset:
    """CIFAR-100 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images"): 32×32 RGB.

    label_kind: "fine" (100 classes) or "coarse" (20 superclasses).
    root: `cifar-100-python/` or its parent; default $KDFLOW_CIFAR, else ./data.
    """
    _check_split(split)
    if label_kind not in ("fine", "coarse"):
        raise DatasetError(f"cifar100: label_kind must be 'fine' or 'coarse', not {label_kind!r}")
    num_classes = 100 if label_kind == "fine" else 20
    label_key = f"{label_kind}_labels".encode()
    hint = _HOW.format(kind="-100", dirname="cifar-100-python")
    d = _batches_dir(root, "cifar-100-python", "test", hint)
    _check_meta(d / "meta", f"{label_kind}_label_names".encode(), num_classes, hint)
    x, y = _load_batches([d / split], label_key, num_classes, hint)
    return ArrayDataset(
        name="cifar100" if label_kind == "fine" else "cifar100_coarse",
        x=x,
        y=y,
        num_classes=num_classes,
        mean=(0.5071, 0.4867, 0.4408),
        std=(0.2675, 0.2565, 0.2761),
    )
