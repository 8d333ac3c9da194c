"""Replayable views and the teacher-output cache: equal losses, the teacher not run, corruption detected."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SYNTH
from kdflow.checkpoint import read_model_file
from kdflow.data.views import apply_views, make_view_table, view_of
from kdflow.engine import train
from kdflow.engine.rundir import read_jsonl
from kdflow.engine.teacher_cache import TeacherCache
from kdflow.methods.recipe import resolve

QUIET = {"progress": False, "log": lambda s: None}


def recipe(kd_raw: dict, tmp_path: Path, cache: dict | None) -> dict:
    raw = copy.deepcopy(kd_raw)
    raw["data"] = {**SYNTH, "augment": {"crop_padding": 1, "flip": True}}
    raw["train"].update(epochs=3, views=2)
    if cache is not None:
        raw["train"]["teacher_cache"] = {"enabled": True, "dir": str(tmp_path / "cache"), **cache}
    return raw


def student(run: Path) -> dict[str, torch.Tensor]:
    return read_model_file(run / "nodes" / "student.pt")["state_dict"]


def test_views_are_replayable() -> None:
    a = make_view_table(10, 3, 2, padding=2, flip=True, seed=5)
    b = make_view_table(10, 3, 2, padding=2, flip=True, seed=5)
    assert torch.equal(a.offsets, b.offsets) and torch.equal(a.flips, b.flips)
    idx = torch.tensor([0, 4, 9])
    assert torch.equal(view_of(a, idx, 1), (a.start[idx] + 1) % 3)
    assert sorted(view_of(a, torch.tensor([7]), e).item() for e in range(3)) == [0, 1, 2]  # every view in 3 epochs
    x = torch.randint(0, 255, (3, 1, 6, 6), dtype=torch.uint8)
    v = torch.tensor([0, 2, 1])
    assert torch.equal(apply_views(x, idx, v, a, (0.0,), (1.0,)), apply_views(x, idx, v, b, (0.0,), (1.0,)))


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 5e-3)])
def test_cached_teacher_gives_the_live_teacher_losses(kd_raw: dict, tmp_path: Path, dtype: str, tol: float) -> None:
    train(resolve(recipe(kd_raw, tmp_path, None)), tmp_path / "live", **QUIET)
    logs: list[str] = []
    train(resolve(recipe(kd_raw, tmp_path, {"dtype": dtype})), tmp_path / "cached", progress=False, log=logs.append)
    assert any("teacher cache: computing 96×2 views" in line for line in logs)
    live, cached = read_jsonl(tmp_path / "live" / "metrics.jsonl"), read_jsonl(tmp_path / "cached" / "metrics.jsonl")
    for a, b in zip(live, cached):
        for term, value in a["terms"].items():
            assert b["terms"][term] == pytest.approx(value, rel=tol, abs=tol)
    for k, v in student(tmp_path / "live").items():
        assert torch.allclose(v, student(tmp_path / "cached")[k], atol=50 * tol, rtol=50 * tol), k
    # a second run reads the cache: nothing is computed again
    logs.clear()
    train(resolve(recipe(kd_raw, tmp_path, {"dtype": dtype})), tmp_path / "again", progress=False, log=logs.append)
    assert not any("computing" in line for line in logs)


def test_teacher_does_not_run_with_the_cache(kd_raw: dict, tmp_path: Path, monkeypatch) -> None:
    from kdflow.flow.graph import Flow

    calls = {"teacher": 0}
    real = Flow.run_nodes

    def spy(self, x, stage, cached=None, only=None):
        values = real(self, x, stage, cached, only)
        calls["teacher"] += "teacher.logits" not in (cached or {})
        return values

    monkeypatch.setattr(Flow, "run_nodes", spy)
    train(resolve(recipe(kd_raw, tmp_path, {})), tmp_path / "run", **QUIET)
    assert calls["teacher"] == 0


def test_corrupted_or_stale_cache_is_rebuilt(kd_raw: dict, tmp_path: Path) -> None:
    train(resolve(recipe(kd_raw, tmp_path, {})), tmp_path / "a", **QUIET)
    files = sorted((tmp_path / "cache").glob("*.values.npy"))
    assert len(files) == 1
    data = bytearray(files[0].read_bytes())
    data[-1] ^= 0xFF
    files[0].write_bytes(bytes(data))
    logs: list[str] = []
    train(resolve(recipe(kd_raw, tmp_path, {})), tmp_path / "b", progress=False, log=logs.append)
    assert any("checksum mismatch, rebuilding" in line for line in logs)
    assert metrics_equal(tmp_path / "a", tmp_path / "b")
    other = recipe(kd_raw, tmp_path, {})
    other["nodes"]["teacher"]["checkpoint"] = str(make_other_teacher(tmp_path))
    train(resolve(other), tmp_path / "c", **QUIET)  # other weights: another key, another file
    assert len(list((tmp_path / "cache").glob("*.values.npy"))) == 2


def metrics_equal(a: Path, b: Path) -> bool:
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time_s", "images_per_sec")} for r in rows]  # noqa: E731
    return strip(read_jsonl(a / "metrics.jsonl")) == strip(read_jsonl(b / "metrics.jsonl"))


def make_other_teacher(tmp_path: Path) -> Path:
    from conftest import make_teacher

    return make_teacher(tmp_path / "other.pt", seed=99)


def test_topk_storage(tmp_path: Path) -> None:
    from kdflow.data import load_dataset
    from kdflow.models import build_model

    ds = load_dataset("synthetic", "train", num_samples=20, num_classes=4, shape=(1, 8, 8))
    table = make_view_table(len(ds), 2, 2, 1, True, 0)
    torch.manual_seed(0)
    teacher = build_model("convnet_s", 4, (1, 8, 8))
    full = TeacherCache(tmp_path, {"k": "full"}, 4, "float32")
    full.build(teacher, ds, table, 8, False, lambda s: None)
    exact = TeacherCache(tmp_path, {"k": "top4"}, 4, "float32", topk=4)  # k = C: stored in full
    exact.build(teacher, ds, table, 8, False, lambda s: None)
    top2 = TeacherCache(tmp_path, {"k": "top2"}, 4, "float32", topk=2)
    top2.build(teacher, ds, table, 8, False, lambda s: None)
    idx, v = torch.arange(6), torch.tensor([0, 1, 0, 1, 0, 1])
    ref = full.lookup(idx, v, torch.device("cpu"))
    assert torch.equal(exact.lookup(idx, v, torch.device("cpu")), ref)
    approx = top2.lookup(idx, v, torch.device("cpu"))
    top = ref.topk(2, dim=1)
    assert torch.equal(approx.gather(1, top.indices), top.values)
    rest = approx.scatter(1, top.indices, float("inf"))
    assert torch.allclose(rest[rest.isfinite()], (top.values[:, 1:] - float(np.log(8))).expand(-1, 2).reshape(-1))
