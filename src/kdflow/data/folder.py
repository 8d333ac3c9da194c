"""ImageNet-style image folders, decoded batch by batch (a split of JPEGs does not fit in memory).

Layout: ``<root>/train/<class>/*.jpg|jpeg|png`` and ``<root>/val/<class>/...`` (image files may sit in
sub-folders of a class folder; extensions are case-insensitive; folders whose name starts with '.'
are skipped). The classes are the sorted names of the ``train`` sub-folders, label = position in that
list; every ``val`` class folder must be one of them. Split ``train`` reads ``train``, split ``test``
reads ``val``.

`ImageFolderSource` holds the file list and labels, and `load` decodes a batch (Pillow, RGB, a few
threads) into uint8 B×3×S×S:

* train: RandomResizedCrop to S×S (scale (0.08, 1), aspect ratio (3/4, 4/3) log-uniform, 10 attempts,
  then the central-crop fallback; bilinear). Draw order (part of the contract): ONE
  ``torch.randint(0, 2**62, (B,), generator=g)`` call gives a seed per sample, in `indices` order; each
  sample's crop parameters come from a CPU generator seeded with its seed (see
  `random_resized_crop_params`), so a batch is reproducible however the threads interleave.
* val: resize the short side to round(S·256/224) (bilinear; the long side truncated as in the usual
  Resize(256)), then centre-crop S×S (224: Resize(256) + CenterCrop(224)).

Horizontal flips and normalisation are left to the batched `kdflow.data.augment.augment_batch`.

Bad images (`bad_images`): by default every image of the split is decoded once (JPEGs at reduced scale)
before training starts, and a file that does not decode stops the run with one line naming it
(`error`); `skip` leaves such files out and counts them (the engine writes them to data.json);
`unchecked` skips the check (a bad file then stops the run when its batch is decoded). A clean check is
remembered in $KDFLOW_CACHE/image-checks (default .kdflow-cache), keyed by every file's path, size and
modification time, so a folder is checked once.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from kdflow.data.base import ArrayDataset, DatasetError, register_dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
BAD_IMAGES = ("error", "skip", "unchecked")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LAYOUT = (
    "expected layout: <root>/train/<class>/*.jpg|jpeg|png and <root>/val/<class>/*.jpg|jpeg|png "
    "(one folder per class, val classes named as in train); pass data.root=<root> or set KDFLOW_IMAGE_FOLDER=<root>"
)


def decode_threads() -> int:
    """Threads used by `ImageFolderSource.load`: min(4, CPU count)."""
    return max(1, min(4, os.cpu_count() or 1))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted((p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_under(folder: Path) -> list[str]:
    """Image files under `folder` (recursively), in a fixed order: sorted names, a folder's files first."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return found


def _split_dir(root: Path, name: str, why: str = "") -> Path:
    path = root / name
    if not path.is_dir():
        raise DatasetError(f"image_folder: missing split folder {path}{why}; {_LAYOUT}")
    return path


def _scan(root: Path, split: str) -> tuple[list[str], list[str], list[int]]:
    """(classes, image paths, labels) of one split folder of `root`."""
    if not root.is_dir():
        raise DatasetError(f"image_folder: root {root} is not a directory; {_LAYOUT}")
    train_dir = _split_dir(root, "train", "" if split == "train" else " (the class list comes from it)")
    classes = [p.name for p in _class_dirs(train_dir)]
    if not classes:
        raise DatasetError(f"image_folder: no class folders in {train_dir}; {_LAYOUT}")
    split_dir = train_dir if split == "train" else _split_dir(root, split)
    loose = sorted(p.name for p in split_dir.iterdir() if p.is_file() and _is_image(p.name))
    if loose:
        raise DatasetError(
            f"image_folder: {len(loose)} images directly in {split_dir} (e.g. {loose[0]}) "
            f"instead of in class folders; {_LAYOUT}"
        )
    index = {c: k for k, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for d in _class_dirs(split_dir):
        if d.name not in index:
            raise DatasetError(
                f"image_folder: class folder {d} is not a class of {train_dir} (classes: "
                f"{', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); {_LAYOUT}"
            )
        files = _images_under(d)
        if not files:
            empty.append(d.name)
        paths.extend(files)
        labels.extend([index[d.name]] * len(files))
    if not paths:
        raise DatasetError(f"image_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}; {_LAYOUT}")
    if empty and split == "train":
        raise DatasetError(
            f"image_folder: training class folders with no images under {split_dir}: {', '.join(empty[:10])}; {_LAYOUT}"
        )
    return classes, paths, labels


def random_resized_crop_params(
    width: int,
    height: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a random crop covering `scale` of the area with an aspect
    ratio (w/h) log-uniform in `ratio`. Each attempt draws an area fraction, then a log-ratio (two
    ``torch.empty(1).uniform_`` draws), and if the crop fits, its top then left (``torch.randint``). After
    `attempts` misses: the largest central crop whose ratio is clamped into `ratio`."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator).item())
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to round(size·256/224) (bilinear), then take the central size×size crop."""
    short = round(size * 256 / 224)
    width, height = img.size
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def _open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"image_folder: cannot decode {path}: {type(e).__name__}: {e}") from None


def decode_problem(path: str) -> str | None:
    """Why `path` does not decode as an image (None when it does). JPEGs are decoded at reduced scale
    (every byte is still read, so a truncated file is found) to keep the check cheap."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
        return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"


def _check_record(paths: list[str]) -> Path:
    """Where a clean check of these files is remembered: a key over every path, size and mtime."""
    digest = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        digest.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return Path(os.environ.get("KDFLOW_CACHE") or ".kdflow-cache") / "image-checks" / f"{digest.hexdigest()[:32]}.json"


def find_bad_images(paths: list[str], what: str) -> list[tuple[str, str]]:
    """(path, problem) for each file of `paths` that does not decode; a clean result is remembered."""
    record = _check_record(paths)
    if record.is_file():
        return []
    with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
        problems = list(tqdm(pool.map(decode_problem, paths), total=len(paths), desc=f"checking {what}",
                             leave=False, disable=not sys.stderr.isatty() or len(paths) < 1000))
    bad = [(p, why) for p, why in zip(paths, problems) if why is not None]
    if not bad:
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"images": len(paths), "checked": "all decode"}) + "\n")
        except OSError:
            pass  # a read-only cache only means checking again next time
    return bad


class ImageFolderSource:
    """One split of an image folder: file paths and labels, decoded to uint8 tensors on demand by `load`.

    ``len(source)``, ``source.labels`` (int64, N), ``source.classes`` (sorted train class names),
    ``source.paths``, ``source.shape`` ((N, 3, S, S), what `load` returns for all samples),
    ``source.subset(indices)`` and ``source.load(indices, generator)``.
    """

    dtype = torch.uint8

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int = 224) -> None:
        if split not in ("train", "val"):
            raise DatasetError(f"image_folder: split must be 'train' or 'val', not {split!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise DatasetError(f"image_folder: image_size must be a positive integer, not {image_size!r}")
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.classes, self.paths, labels = _scan(self.root, split)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.skipped: list[tuple[str, str]] = []  # (path, problem) of the files `drop_bad_images` left out

    def drop_bad_images(self, bad_images: str = "error") -> ImageFolderSource:
        """Decode every image once (`bad_images`: error | skip | unchecked, see the module docstring)."""
        if bad_images not in BAD_IMAGES:
            raise DatasetError(f"image_folder: bad_images must be one of {', '.join(BAD_IMAGES)}, not {bad_images!r}")
        if bad_images == "unchecked":
            return self
        where = self.root / self.split
        bad = find_bad_images(self.paths, f"{len(self)} images in {where}")
        if not bad:
            return self
        if bad_images == "error":
            path, why = bad[0]
            raise DatasetError(
                f"image_folder: {len(bad)} of {len(self)} images in {where} do not decode, e.g. {path} ({why}); "
                "remove or replace them, or set data.options.bad_images: skip to leave them out (counted in data.json)"
            )
        broken = {p for p, _ in bad}
        out = self.subset([i for i, p in enumerate(self.paths) if p not in broken])
        if not len(out):
            raise DatasetError(f"image_folder: none of the {len(self)} images in {where} decode, e.g. {bad[0][0]} ({bad[0][1]})")
        out.skipped = bad
        return out

    @property
    def train(self) -> bool:
        """Training split: random resized crops; otherwise resize + centre crop."""
        return self.split == "train"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), 3, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource({str(self.root)!r}, split={self.split!r}, {len(self)} images, "
            f"{len(self.classes)} classes, size {self.image_size})"
        )

    def _indices(self, indices: Sequence[int] | torch.Tensor) -> list[int]:
        idx = indices.reshape(-1).tolist() if isinstance(indices, torch.Tensor) else [int(i) for i in indices]
        n = len(self)
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise IndexError(f"index {bad[0]} out of range for {n} images")
        return [i % n for i in idx]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageFolderSource:
        """The samples at `indices` (in that order), with the same classes, split and image size."""
        idx = self._indices(indices)
        out = copy.copy(self)
        out.paths = [self.paths[i] for i in idx]
        out.labels = self.labels[torch.tensor(idx, dtype=torch.int64)]
        return out

    def _decode(self, path: str, seed: int | None) -> torch.Tensor:
        img = _open_rgb(path)
        size = self.image_size
        if seed is None:
            img = resize_center_crop(img, size)
        else:
            top, left, h, w = random_resized_crop_params(img.width, img.height, torch.Generator().manual_seed(seed))
            img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)

    def load(self, indices: Sequence[int] | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 B×3×S×S images at `indices`: random resized crops (train; drawn from `generator`, or
        torch's global generator when None) or resize + centre crop (val; `generator` is not used)."""
        idx = self._indices(indices)
        size = self.image_size
        if not idx:
            return torch.empty((0, 3, size, size), dtype=torch.uint8)
        if self.train:
            seeds: list[int | None] = torch.randint(0, 2**62, (len(idx),), generator=generator).tolist()
        else:
            seeds = [None] * len(idx)

        def work(k: int) -> torch.Tensor:
            return self._decode(self.paths[idx[k]], seeds[k])

        threads = min(decode_threads(), len(idx))
        if threads == 1:
            images = [work(k) for k in range(len(idx))]
        else:
            # workers only decode; the batch is assembled here, in the caller's thread (and its
            # inference mode, which is per thread)
            with ThreadPoolExecutor(max_workers=threads) as pool:
                images = list(pool.map(work, range(len(idx))))  # list() re-raises a worker's exception
        return torch.stack(images)


@register_dataset("image_folder")
def image_folder(
    split: str, root: str | os.PathLike | None = None, *, image_size: int = 224, bad_images: str = "error"
) -> ArrayDataset:
    """An ImageNet-style folder (see the module docstring); ``x`` is an `ImageFolderSource`, not a tensor.

    Split ``train`` reads ``<root>/train``, ``test`` reads ``<root>/val``. Root defaults to
    $KDFLOW_IMAGE_FOLDER. Images come out as uint8 3×image_size×image_size; mean/std are ImageNet's.
    `bad_images`: error (default) | skip | unchecked, see the module docstring.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', not {split!r}")
    base = root if root is not None else os.environ.get("KDFLOW_IMAGE_FOLDER")
    if not base:
        raise DatasetError(f"image_folder: no root given; {_LAYOUT}")
    source = ImageFolderSource(base, "train" if split == "train" else "val", image_size).drop_bad_images(bad_images)
    return ArrayDataset(
        "image_folder",
        x=source,  # type: ignore[arg-type]  # decoded batch by batch, see ImageFolderSource.load
        y=source.labels,
        num_classes=len(source.classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
