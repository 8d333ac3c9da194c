"""Writers of the published data formats (IDX gz, CIFAR python pickles) for tests."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, compress: bool = True) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    blob = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


def make_idx_dir(root: Path, compress: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    splits = {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, compress=compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress=compress)
        splits["train" if prefix == "train" else "test"] = (images, labels)
    return splits


def dump(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def make_cifar10(parent: Path) -> Path:
    d = parent / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        rows = cifar_rows(2, i)
        if i == 1:
            rows[0, 1024 + 1] = 201  # channel G (plane 1), row 0, col 1
            rows[0, 2048 + 32 * 2 + 3] = 77  # channel B, row 2, col 3
        dump(d / f"data_batch_{i}", {b"data": rows, b"labels": [i, (i + 1) % 10], b"batch_label": b"x"})
    dump(d / "test_batch", {b"data": cifar_rows(3, 9), b"labels": [7, 8, 9]})
    dump(d / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072})
    return d


def make_cifar100(parent: Path, n_train: int = 128, n_test: int = 64, seed: int = 0) -> Path:
    """A small `cifar-100-python/` directory (train, test, meta) with random images and labels."""
    d = parent / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, size=n).tolist()
        dump(d / split, {b"data": cifar_rows(n, seed + n), b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]})
    dump(d / "meta", {b"fine_label_names": [b"f%d" % i for i in range(100)], b"coarse_label_names": [b"c%d" % i for i in range(20)]})
    return d


# (class, file, (width, height), mode) — PNG and JPEG, odd sizes, a grey and an RGBA image
TRAIN = [
    ("cat", "a.png", (40, 30), "RGB"),
    ("cat", "b.jpg", (30, 50), "RGB"),
    ("cat", "nested/c.PNG", (25, 25), "L"),
    ("dog", "d.jpeg", (64, 20), "RGB"),
    ("dog", "e.png", (33, 47), "RGBA"),
    ("eel", "f.JPEG", (50, 50), "RGB"),
    ("eel", "g.png", (20, 90), "RGB"),
]
VAL = [
    ("cat", "v1.png", (45, 35), "RGB"),
    ("dog", "v2.jpg", (30, 60), "RGB"),
    ("dog", "v3.png", (18, 18), "RGB"),
]


def write_image(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(path)


def make_folder(root: Path, train=TRAIN, val=VAL) -> Path:
    for seed, (cls, name, size, mode) in enumerate(train):
        write_image(root / "train" / cls / name, size, mode, seed)
    for seed, (cls, name, size, mode) in enumerate(val, start=100):
        write_image(root / "val" / cls / name, size, mode, seed)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root
