"""kdflow's `mnist1d` is the data set the pinned `mnist1d` package generates, cached as .npz."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import mnist1d.data
import numpy as np
import pytest
import torch

from kdflow.data import DatasetError, load_dataset
from kdflow.data import mnist1d as kd_mnist1d


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mnist1d-cache")


@pytest.fixture(scope="module")
def reference() -> dict:
    """The package's own data set with its default arguments (make_dataset, never get_dataset)."""
    state = random.getstate(), np.random.get_state()
    try:
        return mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


def test_pinned_package_and_defaults() -> None:
    assert kd_mnist1d.package_version() == kd_mnist1d.PINNED_VERSION == "0.0.2.post1"
    defaults = mnist1d.data.get_dataset_args(as_dict=True)
    defaults.pop("url")
    assert defaults == kd_mnist1d.DEFAULTS


def test_splits_equal_the_package(cache: Path, reference: dict) -> None:
    train, test = load_dataset("mnist1d", "train", str(cache)), load_dataset("mnist1d", "test", str(cache))
    assert train.x.shape == (4000, 1, 40) and test.x.shape == (1000, 1, 40)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert np.array_equal(train.x[:, 0].numpy(), reference["x"].astype(np.float32))
    assert np.array_equal(test.x[:, 0].numpy(), reference["x_test"].astype(np.float32))
    assert np.array_equal(train.y.numpy(), reference["y"]) and np.array_equal(test.y.numpy(), reference["y_test"])
    assert train.num_classes == 10 and train.mean == test.mean and train.std == test.std
    assert train.mean[0] == pytest.approx(float(reference["x"].astype(np.float32).mean()), abs=1e-6)
    assert train.std[0] == pytest.approx(float(reference["x"].astype(np.float32).std()), rel=1e-6)


def test_cache_is_one_npz_and_is_reused(cache: Path, reference: dict, monkeypatch) -> None:
    load_dataset("mnist1d", "train", str(cache))
    files = sorted(p.name for p in cache.iterdir())
    assert files == [kd_mnist1d.cache_path(kd_mnist1d.dataset_args(), cache).name]
    assert files[0].startswith("mnist1d-0.0.2.post1-") and files[0].endswith(".npz")
    with np.load(cache / files[0], allow_pickle=False) as f:
        assert sorted(f.files) == ["x", "x_test", "y", "y_test"]
        assert np.array_equal(f["y_test"], reference["y_test"])

    def no_generation(*args, **kwargs):
        raise AssertionError("make_dataset called although the cache is there")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    again = load_dataset("mnist1d", "test", str(cache))
    assert np.array_equal(again.y.numpy(), reference["y_test"])
    with pytest.raises(DatasetError, match="although the cache"):  # other arguments: another file
        load_dataset("mnist1d", "test", str(cache), seed=7)


def test_default_cache_dir_and_no_import_when_cached(cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("KDFLOW_CACHE", str(cache.parent / "elsewhere"))
    assert kd_mnist1d.cache_dir() == cache.parent / "elsewhere" / "mnist1d"
    monkeypatch.delenv("KDFLOW_CACHE")
    assert kd_mnist1d.cache_dir() == Path(".kdflow-cache") / "mnist1d"
    load_dataset("mnist1d", "train", str(cache))
    code = (
        "import sys; from kdflow.data import load_dataset; "
        f"d = load_dataset('mnist1d', 'test', {str(cache)!r}); "
        "assert len(d) == 1000; assert 'mnist1d' not in sys.modules and 'scipy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_global_rng_states_unchanged(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(3)
    py_state, np_state = random.getstate(), np.random.get_state()
    load_dataset("mnist1d", "train", str(tmp_path), num_samples=200)  # generated
    load_dataset("mnist1d", "test", str(tmp_path), num_samples=200)  # cached
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(after, np_state))


def test_options(tmp_path: Path) -> None:
    args = mnist1d.data.get_dataset_args()
    args.num_samples, args.seed = 100, 7
    ref = mnist1d.data.make_dataset(args)
    train = load_dataset("mnist1d", "train", str(tmp_path), num_samples=100, seed=7)
    test = load_dataset("mnist1d", "test", str(tmp_path), num_samples=100, seed=7)
    assert train.x.shape == (80, 1, 40) and test.x.shape == (20, 1, 40)
    assert np.array_equal(train.x[:, 0].numpy(), ref["x"].astype(np.float32))
    assert np.array_equal(test.y.numpy(), ref["y_test"])
    other = load_dataset("mnist1d", "train", str(tmp_path), num_samples=100)
    assert not torch.equal(train.x, other.x)
    with pytest.raises(DatasetError, match=r"^mnist1d: unknown option\(s\) templates; known: num_samples") as e:
        load_dataset("mnist1d", "train", str(tmp_path), templates=3)
    assert "\n" not in str(e.value)
    with pytest.raises(DatasetError, match="empty split"):
        load_dataset("mnist1d", "train", str(tmp_path), num_samples=5)


def test_unreadable_cache_is_rebuilt(tmp_path: Path) -> None:
    path = kd_mnist1d.cache_path(kd_mnist1d.dataset_args(num_samples=100), tmp_path)
    path.write_bytes(b"not an npz")
    assert len(load_dataset("mnist1d", "test", str(tmp_path), num_samples=100)) == 20
    with np.load(path, allow_pickle=False) as f:
        assert f["x"].shape == (80, 40)


def test_logistic_regression_reaches_the_reference_level(cache: Path) -> None:
    """The package README: logistic regression ~32 % test accuracy (the earlier look-alike gave 16-18 %)."""
    train, test = load_dataset("mnist1d", "train", str(cache)), load_dataset("mnist1d", "test", str(cache))
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 10)
    opt = torch.optim.Adam(linear.parameters(), lr=0.01)
    x, y = train.x.flatten(1), train.y
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(linear(x), y).backward()
        opt.step()
    with torch.no_grad():
        acc = (linear(test.x.flatten(1)).argmax(1) == test.y).float().mean().item()
    assert 0.25 <= acc <= 0.40, acc
