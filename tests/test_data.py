"""Data layer: loaders on tiny files written in the published formats, generators, augmentation."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from formats import cifar_rows, dump, make_cifar10, make_idx_dir, write_idx
from kdflow.data import DATASETS, DatasetError, load_dataset
from kdflow.data.augment import (
    augment_batch,
    normalize,
    random_crop,
    random_flip,
    to_float,
)

# ---------------------------------------------------------------- IDX (Fashion-MNIST / MNIST)


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
@pytest.mark.parametrize("compress", [True, False])
def test_idx_loader_exact_values(tmp_path: Path, name: str, compress: bool) -> None:
    expected = make_idx_dir(tmp_path, compress)
    for split, (images, labels) in expected.items():
        ds = load_dataset(name, split, root=str(tmp_path))
        assert ds.x.dtype == torch.uint8 and ds.y.dtype == torch.int64
        assert ds.x.shape == (len(labels), 1, 28, 28)
        assert torch.equal(ds.x[:, 0], torch.from_numpy(images))
        assert ds.y.tolist() == labels.tolist()
        assert ds.num_classes == 10 and len(ds.mean) == len(ds.std) == 1
    assert load_dataset("fashion_mnist", "train", root=str(tmp_path)).mean == (0.2860,)


def test_idx_root_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_idx_dir(tmp_path)
    monkeypatch.setenv("KDFLOW_FASHION_MNIST", str(tmp_path))
    assert len(load_dataset("fashion_mnist", "test")) == 4
    with pytest.raises(DatasetError, match="nowhere"):  # explicit root beats the env var
        load_dataset("fashion_mnist", "test", root=str(tmp_path / "nowhere"))


def test_idx_bad_magic(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(bad, np.zeros(6, np.uint8), magic=0x00000803)
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion_mnist", "train", root=str(tmp_path))
    msg = str(e.value)
    assert str(bad) in msg and "magic" in msg and "\n" not in msg


def test_idx_size_and_count_mismatch(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(DatasetError, match="3 labels"):
        load_dataset("mnist", "test", root=str(tmp_path))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, 4) + b"\x00\x01")  # header says 4, holds 2
    with pytest.raises(DatasetError, match="header"):
        load_dataset("mnist", "test", root=str(tmp_path))


def test_idx_missing_file(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion_mnist", "test", root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg and "KDFLOW_FASHION_MNIST" in msg
    assert "\n" not in msg


# ---------------------------------------------------------------- CIFAR


def test_cifar10(tmp_path: Path) -> None:
    d = make_cifar10(tmp_path)
    for root in (tmp_path, d):  # parent or the batches directory itself
        train = load_dataset("cifar10", "train", root=str(root))
        assert train.x.shape == (10, 3, 32, 32) and train.x.dtype == torch.uint8
        assert train.y.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
        assert train.x[0, 1, 0, 1] == 201 and train.x[0, 2, 2, 3] == 77
        first = cifar_rows(2, 1)[0]
        assert train.x[0, 0, 5, 7] == first[5 * 32 + 7]  # R plane untouched
        test = load_dataset("cifar10", "test", root=str(root))
        assert test.y.tolist() == [7, 8, 9] and train.num_classes == 10 and len(train.mean) == 3


def test_cifar10_missing_and_malformed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDFLOW_CIFAR", str(tmp_path))
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", "train")
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value) and "cifar.html" in str(e.value)
    d = make_cifar10(tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset("cifar10", "train")
    dump(d / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DatasetError, match="3072"):
        load_dataset("cifar10", "train")
    (d / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", "test")


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rows = cifar_rows(4, 0)
    rows[0, 1024 + 1] = 123
    dump(d / "train", {b"data": rows, b"fine_labels": [99, 0, 5, 42], b"coarse_labels": [19, 0, 1, 7]})
    dump(d / "test", {b"data": cifar_rows(2, 1), b"fine_labels": [1, 2], b"coarse_labels": [3, 4]})
    names = {b"fine_label_names": [b"f"] * 100, b"coarse_label_names": [b"c"] * 20}
    dump(d / "meta", names)
    fine = load_dataset("cifar100", "train", root=str(tmp_path))
    assert fine.x.shape == (4, 3, 32, 32) and fine.x[0, 1, 0, 1] == 123
    assert fine.y.tolist() == [99, 0, 5, 42] and fine.num_classes == 100
    coarse = load_dataset("cifar100", "test", root=str(d), label_kind="coarse")
    assert coarse.y.tolist() == [3, 4] and coarse.num_classes == 20
    with pytest.raises(DatasetError, match="label_kind"):
        load_dataset("cifar100", "test", root=str(d), label_kind="medium")


# ---------------------------------------------------------------- synthetic (MNIST-1D: test_mnist1d.py)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 4, 4), (1, 32)])
def test_synthetic(shape: tuple[int, ...]) -> None:
    train = load_dataset("synthetic", "train", shape=shape)
    test = load_dataset("synthetic", "test", shape=shape)
    assert train.x.shape == (512, *shape) and test.x.shape == (128, *shape)
    assert train.x.dtype == (torch.uint8 if len(shape) == 3 else torch.float32)
    assert len(train.mean) == shape[0] and train.mean == test.mean
    x = train.x.float().flatten(1)
    means = torch.stack([x[train.y == c].mean(0) for c in range(4)])
    assert torch.cdist(means, means).triu(1)[torch.ones(4, 4).triu(1).bool()].min() > 0.5 * x.std()
    assert torch.equal(load_dataset("synthetic", "train", shape=shape).x, train.x)


def test_registry() -> None:
    assert {"fashion_mnist", "mnist", "cifar10", "cifar100", "mnist1d", "synthetic"} <= set(DATASETS)


# ---------------------------------------------------------------- augmentation


def test_to_float_and_normalize() -> None:
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)
    assert torch.allclose(to_float(x), x.double().div(255).float())
    f = torch.randn(2, 3)
    assert to_float(f) is f
    rng = np.random.default_rng(0)
    for shape in ((5, 3, 4, 6), (5, 2, 9)):
        a = rng.standard_normal(shape).astype(np.float32)
        mean, std = rng.uniform(-1, 1, shape[1]), rng.uniform(0.5, 2, shape[1])
        bshape = (1, -1) + (1,) * (len(shape) - 2)
        want = (a - mean.reshape(bshape)) / std.reshape(bshape)
        got = normalize(torch.from_numpy(a), tuple(mean), tuple(std))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_random_crop_matches_manual() -> None:
    x = torch.arange(5 * 2 * 6 * 7, dtype=torch.float32).view(5, 2, 6, 7)
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(0)), x)
    p = 2
    got = random_crop(x, p, torch.Generator().manual_seed(3))
    offsets = torch.randint(0, 2 * p + 1, (5, 2), generator=torch.Generator().manual_seed(3))
    for i in range(5):
        padded = torch.zeros(2, 6 + 2 * p, 7 + 2 * p)
        padded[:, p : p + 6, p : p + 7] = x[i]
        dy, dx = offsets[i].tolist()
        assert torch.equal(got[i], padded[:, dy : dy + 6, dx : dx + 7])

    s = torch.arange(4 * 3 * 10, dtype=torch.float32).view(4, 3, 10)
    got1 = random_crop(s, 3, torch.Generator().manual_seed(1))
    offs = torch.randint(0, 7, (4, 1), generator=torch.Generator().manual_seed(1))
    for i in range(4):
        padded = torch.nn.functional.pad(s[i], (3, 3))
        o = int(offs[i, 0])
        assert torch.equal(got1[i], padded[:, o : o + 10])


def test_random_flip_matches_manual() -> None:
    x = torch.randn(16, 2, 3, 5)
    got = random_flip(x, torch.Generator().manual_seed(4))
    chosen = torch.rand(16, generator=torch.Generator().manual_seed(4)) < 0.5
    assert 0 < int(chosen.sum()) < 16
    for i in range(16):
        assert torch.equal(got[i], x[i].flip(-1) if chosen[i] else x[i])


def test_augment_batch() -> None:
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    a = augment_batch(x, mean, std, crop_padding=2, flip=True, generator=torch.Generator().manual_seed(5))
    b = augment_batch(x, mean, std, crop_padding=2, flip=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.float32
    g = torch.Generator().manual_seed(5)
    manual = normalize(random_flip(random_crop(to_float(x), 2, g), g), mean, std)
    assert torch.equal(a, manual)
    plain = augment_batch(x, mean, std)
    assert torch.allclose(plain, normalize(x.float() / 255, mean, std))
    with pytest.raises(ValueError):
        augment_batch(x, mean, std, flip=True)
    with pytest.raises(ValueError):
        augment_batch(x, mean, std, crop_padding=4)
