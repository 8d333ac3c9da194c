"""MNIST-1D (Greydanus 2020, "Scaling down deep learning", arXiv:2011.14439), built by its reference generator.

The data set is what the pinned `mnist1d` package's `make_dataset(get_dataset_args())` returns: 4,000
training and 1,000 test signals of length 40, with the package's default arguments (options override
them). It is generated locally, never downloaded or unpickled, and cached as a .npz file keyed by the
package version and the arguments; later loads read the cache without importing the package.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from kdflow.data.base import ArrayDataset, DatasetError, register_dataset

PACKAGE = "mnist1d"
PINNED_VERSION = "0.0.2.post1"
_INSTALL = f"install it with `pip install {PACKAGE}=={PINNED_VERSION}` (a dependency of kdflow)"

# The package's get_dataset_args() without `url` (only its downloader reads that). Every name is an option;
# the defaults are checked against the package's own when the data set is built.
DEFAULTS: dict[str, object] = {
    "num_samples": 5000,
    "train_split": 0.8,
    "template_len": 12,
    "padding": [36, 60],
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
    "seed": 42,
}


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DatasetError(f"mnist1d: the `{PACKAGE}` package is not installed; {_INSTALL}") from None


def dataset_args(**options) -> dict[str, object]:
    """The package's default arguments with `options` applied, normalised (the cache key is made from them)."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise DatasetError(f"mnist1d: unknown option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    args = {**DEFAULTS, **options}
    try:
        for name in ("num_samples", "template_len", "max_translation", "final_seq_length", "seed"):
            if isinstance(args[name], bool) or int(args[name]) != args[name]:
                raise ValueError(f"{name} must be an integer, not {args[name]!r}")
            args[name] = int(args[name])
        for name in ("train_split", "scale_coeff", "corr_noise_scale", "iid_noise_scale", "shear_scale"):
            args[name] = float(args[name])
        args["padding"] = [int(p) for p in args["padding"]]  # type: ignore[union-attr]
        if len(args["padding"]) != 2:  # type: ignore[arg-type]
            raise ValueError(f"padding must be [low, high], not {args['padding']!r}")
        if not isinstance(args["shuffle_seq"], bool):
            raise ValueError(f"shuffle_seq must be true or false, not {args['shuffle_seq']!r}")
    except (TypeError, ValueError) as e:
        raise DatasetError(f"mnist1d: bad option ({e})") from None
    per_class = args["num_samples"] // 10  # type: ignore[operator]
    n_train = int(per_class * 10 * args["train_split"])  # type: ignore[operator]
    if n_train < 1 or n_train >= per_class * 10:
        raise DatasetError(
            f"mnist1d: num_samples={args['num_samples']} with train_split={args['train_split']} leaves an empty split"
        )
    return args


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """root if given, else $KDFLOW_CACHE/mnist1d, else .kdflow-cache/mnist1d (the teacher cache's convention)."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("KDFLOW_CACHE") or ".kdflow-cache") / "mnist1d"


def cache_path(args: dict[str, object], root: str | os.PathLike | None = None) -> Path:
    version = package_version()
    key = json.dumps({"package": PACKAGE, "version": version, "args": args}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir(root) / f"mnist1d-{version}-{digest}.npz"


def generate(args: dict[str, object]) -> dict[str, np.ndarray]:
    """Run the package's make_dataset on `args`; the global `random` and numpy RNG states are left as they were."""
    # Importing mnist1d imports matplotlib.pyplot (and scipy); pyplot's backend stays unresolved until
    # something plots, so no backend is chosen here and a caller's choice is not disturbed.
    try:
        from mnist1d.data import get_dataset_args, make_dataset
        from mnist1d.utils import ObjectView
    except ImportError as e:
        raise DatasetError(f"mnist1d: cannot import the `{PACKAGE}` package ({e}); {_INSTALL}") from None
    package_defaults = get_dataset_args(as_dict=True)
    package_defaults.pop("url", None)
    if package_defaults != DEFAULTS:
        raise DatasetError(
            f"mnist1d: the installed {PACKAGE} {package_version()} has other default arguments than "
            f"{PINNED_VERSION}, which kdflow pins; {_INSTALL}"
        )
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(ObjectView({**get_dataset_args(as_dict=True), **args}))
    except Exception as e:  # the generator's own errors on odd arguments
        raise DatasetError(f"mnist1d: make_dataset failed with {args}: {type(e).__name__}: {e}") from None
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x": np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def _save_atomic(arrays: dict[str, np.ndarray], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing or unreadable (it is then rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    ok = (
        arrays["x"].dtype == np.float32 and arrays["x_test"].dtype == np.float32
        and arrays["y"].dtype == np.int64 and arrays["y_test"].dtype == np.int64
        and arrays["x"].ndim == arrays["x_test"].ndim == 2
        and len(arrays["x"]) == len(arrays["y"]) and len(arrays["x_test"]) == len(arrays["y_test"])
    )
    return arrays if ok else None


def load_arrays(root: str | os.PathLike | None = None, **options) -> dict[str, np.ndarray]:
    """x, y (training split), x_test, y_test as the package makes them (x cast to float32, y int64), via the cache."""
    args = dataset_args(**options)
    path = cache_path(args, root)
    arrays = _read(path) if path.is_file() else None
    if arrays is None:
        arrays = generate(args)
        try:
            _save_atomic(arrays, path)
        except OSError as e:
            raise DatasetError(f"mnist1d: cannot write the cache {path}: {e}; pass data.root=<writable folder> "
                               "or set KDFLOW_CACHE") from None
    return arrays


@register_dataset("mnist1d")
def mnist1d(split: str, root: str | os.PathLike | None = None, **options) -> ArrayDataset:
    """MNIST-1D as the `mnist1d` package generates it: signals float32 1×40, 10 classes, 4,000 / 1,000 by default.

    options: the package's arguments (num_samples, train_split, seed, template_len, padding, scale_coeff,
    max_translation, corr_noise_scale, iid_noise_scale, shear_scale, shuffle_seq, final_seq_length);
    e.g. num_samples=10000 gives 8,000 / 2,000. root: the cache folder; default $KDFLOW_CACHE/mnist1d,
    else .kdflow-cache/mnist1d. mean/std are taken from the training split.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', not {split!r}")
    arrays = load_arrays(root, **options)
    x, y = (arrays["x"], arrays["y"]) if split == "train" else (arrays["x_test"], arrays["y_test"])
    return ArrayDataset(
        name="mnist1d",
        x=torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1),
        y=torch.from_numpy(np.ascontiguousarray(y)),
        num_classes=10,
        mean=(float(arrays["x"].mean()),),
        std=(float(arrays["x"].std()),),
    )
