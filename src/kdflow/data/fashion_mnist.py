"""Fashion-MNIST and MNIST from their published IDX files (gzipped or not)."""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdflow.data.base import ArrayDataset, DatasetError, register_dataset

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class _IdxSpec:
    name: str
    default_root: str
    env_var: str
    how_to_get: str
    mean: float
    std: float


def read_idx(path: Path, magic: int, hint: str = "") -> np.ndarray:
    """Read one IDX file of unsigned bytes, checking the magic number and the size against the header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"cannot read {path}: {e}{hint}") from None
    if len(raw) < 4:
        raise DatasetError(f"{path} is too short to be an IDX file{hint}")
    (got,) = struct.unpack(">I", raw[:4])
    if got != magic:
        raise DatasetError(f"{path}: bad IDX magic number 0x{got:08x}, expected 0x{magic:08x}{hint}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header{hint}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path}: header says {dims} = {expected} bytes of data, file has {len(raw) - header}{hint}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, stem: str, hint: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"missing {root / (stem + '.gz')} (or {root / stem}){hint}")


def _load_idx_dataset(spec: _IdxSpec, split: str, root: str | os.PathLike | None) -> ArrayDataset:
    if split not in _FILES:
        raise DatasetError(f"split must be 'train' or 'test', not {split!r}")
    base = Path(root if root is not None else os.environ.get(spec.env_var) or spec.default_root)
    hint = f"; {spec.name}: {spec.how_to_get}"
    img_stem, lbl_stem = _FILES[split]
    img_path, lbl_path = _find(base, img_stem, hint), _find(base, lbl_stem, hint)
    images = read_idx(img_path, IDX_IMAGES_MAGIC, hint)
    labels = read_idx(lbl_path, IDX_LABELS_MAGIC, hint)
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{img_path}: images are {images.shape[1:]}, expected 28x28{hint}")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels{hint}"
        )
    if labels.size and labels.max() >= 10:
        raise DatasetError(f"{lbl_path}: label {int(labels.max())} out of range 0..9{hint}")
    return ArrayDataset(
        name=spec.name,
        x=torch.from_numpy(images.copy()).unsqueeze(1),
        y=torch.from_numpy(labels.astype(np.int64)),
        num_classes=10,
        mean=(spec.mean,),
        std=(spec.std,),
    )


_FASHION = _IdxSpec(
    name="fashion_mnist",
    default_root="/usr/share/datasets/fashion-mnist",
    env_var="KDFLOW_FASHION_MNIST",
    how_to_get=(
        "get it with `apt-get install -y dataset-fashion-mnist`, or download the four *-ubyte.gz files "
        "from https://github.com/zalandoresearch/fashion-mnist into a folder and pass data.root=<folder> "
        "or set KDFLOW_FASHION_MNIST=<folder>"
    ),
    mean=0.2860,
    std=0.3530,
)

_MNIST = _IdxSpec(
    name="mnist",
    default_root="/usr/share/datasets/mnist",
    env_var="KDFLOW_MNIST",
    how_to_get=(
        "download the four *-ubyte.gz files from http://yann.lecun.com/exdb/mnist/ (or a mirror) "
        "into a folder and pass data.root=<folder> or set KDFLOW_MNIST=<folder>"
    ),
    mean=0.1307,
    std=0.3081,
)


@register_dataset("fashion_mnist")
def fashion_mnist(split: str, root: str | os.PathLike | None = None) -> ArrayDataset:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747): 70k 28×28 grey clothing images, 10 classes.

    root: folder with the IDX files; default $KDFLOW_FASHION_MNIST, else /usr/share/datasets/fashion-mnist.
    """
    return _load_idx_dataset(_FASHION, split, root)


@register_dataset("mnist")
def mnist(split: str, root: str | os.PathLike | None = None) -> ArrayDataset:
    """MNIST (LeCun, Bottou, Bengio & Haffner 1998, "Gradient-based learning applied to document recognition").

    root: folder with the IDX files; default $KDFLOW_MNIST, else /usr/share/datasets/mnist.
    """
    return _load_idx_dataset(_MNIST, split, root)
