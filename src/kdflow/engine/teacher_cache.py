"""A teacher-output cache: a frozen node's logits computed once per (sample, view) and memory-mapped.

Keyed by the teacher's weights (a SHA-256 of its state dict), the data set and its subset, the
augmentation, the number of views, the seed and the storage format, so every epoch and every
run that uses the same teacher on the same views reads it instead of running the teacher. The
file is written to a temporary name and renamed; a sidecar JSON holds its SHA-256, checked when
the cache is opened: a stale or corrupted file is rebuilt, never used. A build holds an flock on
DIGEST.lock: builders of one cache take turns (the one that waited finds it built), and the
temporary files of a build that was killed are removed by the next build.
Storage: float16 (default) or float32 logits, N×V×C; or the top-k logits and their class indices
(exact when k is the number of classes; otherwise the other classes get the k-th largest logit
minus log(k·C), a documented approximation).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from kdflow.data.base import ArrayDataset
from kdflow.data.loader import load_inputs
from kdflow.data.views import ViewTable, apply_views
from kdflow.checkpoint import sha256_of, write_text_atomic
from kdflow.flow.taps import model_logits

try:
    import fcntl
except ImportError:  # not POSIX: builds do not take turns, and a killed build's temporary files stay
    fcntl = None


def state_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes), independent of where it came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 1-d: 0-d tensors cannot be viewed as bytes
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextmanager
def build_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (created if missing), waiting for it; yields whether it is held (False
    where the platform or file system has no flock). The kernel releases it when its process dies, kill -9 too."""
    if fcntl is None:
        yield False
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # ENOLCK: a file system without locks
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


class TeacherCache:
    """Cached logits of one frozen node on every (sample, view) of the training split."""

    def __init__(self, directory: Path, key: dict, num_classes: int, dtype: str = "float16", topk: int | None = None) -> None:
        self.key = key
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        self.dir = Path(directory)
        self.num_classes = num_classes
        self.dtype = np.float16 if dtype == "float16" else np.float32
        self.topk = topk if topk and topk < num_classes else None
        self.values: np.ndarray | None = None
        self.indices: np.ndarray | None = None

    @property
    def files(self) -> list[Path]:
        base = self.dir / self.digest
        return [base.with_suffix(".values.npy")] + ([base.with_suffix(".indices.npy")] if self.topk else [])

    @property
    def meta_path(self) -> Path:
        return self.dir / f"{self.digest}.json"

    def open(self) -> str:
        """Map a valid cache; 'ok', or why it cannot be used ('missing', 'corrupted')."""
        if not self.meta_path.exists() or not all(f.exists() for f in self.files):
            return "missing"
        meta = json.loads(self.meta_path.read_text())
        if meta.get("key") != self.key or meta.get("sha256") != sha256_of(*self.files):
            return "corrupted"
        self.values = np.load(self.files[0], mmap_mode="r", allow_pickle=False)
        self.indices = np.load(self.files[1], mmap_mode="r", allow_pickle=False) if self.topk else None
        return "ok"

    def build(
        self, teacher: nn.Module, ds: ArrayDataset, table: ViewTable, batch_size: int, progress: bool,
        log: Callable[[str], None] = print,
    ) -> None:
        """Run the teacher (eval, inference mode) on every view of every sample and store the logits. Under the
        cache's build lock: when another process built the cache meanwhile, it is opened instead; the temporary
        files a killed build left (as large as the cache) are removed first."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with build_lock(self.dir / f"{self.digest}.lock") as locked:
            if locked and self.open() == "ok":
                log(f"teacher cache: {self.meta_path} was built by another process meanwhile")
                return
            if locked:  # every build of this cache holds the lock: these temporary files belong to no live build
                for stale in self.dir.glob(f".{self.digest}.*.tmp"):
                    stale.unlink(missing_ok=True)
            self._build(teacher, ds, table, batch_size, progress, log)

    def _build(
        self, teacher: nn.Module, ds: ArrayDataset, table: ViewTable, batch_size: int, progress: bool,
        log: Callable[[str], None],
    ) -> None:
        n, v, c = len(ds), table.views, self.num_classes
        width = self.topk or c
        tmp = [f.with_name(f".{f.name}.{os.getpid()}.tmp") for f in self.files]
        values = np.lib.format.open_memmap(tmp[0], mode="w+", dtype=self.dtype, shape=(n, v, width))
        indices = np.lib.format.open_memmap(tmp[1], mode="w+", dtype=np.int32, shape=(n, v, width)) if self.topk else None
        teacher.eval()
        log(f"teacher cache: computing {n}×{v} views ({np.dtype(self.dtype).name}{f', top-{self.topk}' if self.topk else ''}) into {self.dir}")
        bar = tqdm(total=n * v, desc="teacher cache", leave=False, disable=not progress, unit="view")
        with torch.inference_mode():
            for view in range(v):
                for start in range(0, n, batch_size):
                    idx = torch.arange(start, min(start + batch_size, n))
                    x = apply_views(load_inputs(ds, idx.to(ds.y.device)), idx, torch.full_like(idx, view), table, ds.mean, ds.std)
                    logits = model_logits(teacher(x)).float().cpu()
                    if self.topk:
                        top = logits.topk(self.topk, dim=1)
                        values[start : start + len(idx), view] = top.values.numpy()
                        indices[start : start + len(idx), view] = top.indices.numpy()
                    else:
                        values[start : start + len(idx), view] = logits.numpy()
                    bar.update(len(idx))
        bar.close()
        values.flush()
        del values
        if indices is not None:
            indices.flush()
            del indices
        for t, f in zip(tmp, self.files):
            os.replace(t, f)
        write_text_atomic(self.meta_path, json.dumps({"key": self.key, "sha256": sha256_of(*self.files)}, indent=2))
        assert self.open() == "ok"

    def lookup(self, indices: torch.Tensor, views: torch.Tensor, device: torch.device) -> torch.Tensor:
        """B×C float32 logits of samples `indices` in views `views`."""
        i, v = indices.cpu().numpy(), views.cpu().numpy()
        vals = torch.from_numpy(np.asarray(self.values[i, v], dtype=np.float32))
        if not self.topk:
            return vals.to(device)
        idx = torch.from_numpy(np.asarray(self.indices[i, v], dtype=np.int64))
        floor = vals[:, -1:] - float(np.log(self.topk * self.num_classes))
        full = floor.expand(len(i), self.num_classes).clone()
        full.scatter_(1, idx, vals)
        return full.to(device)
