"""Speed options (issue 14): torch.compile of the nodes and the Distiller's channels_last switch give the
eager, NCHW results (within float rounding) and leave checkpoints as they were."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from kdflow.checkpoint import read_model_file
from kdflow.engine import train
from kdflow.engine.rundir import read_jsonl
from kdflow.methods.recipe import resolve

QUIET = {"progress": False, "log": lambda s: None}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compiled_nodes_train_like_eager_ones(kd_raw: dict, tmp_path: Path) -> None:
    raw = copy.deepcopy(kd_raw)
    raw["nodes"]["student"] = {"arch": "convnet_s"}  # convolutions and batch norms, compiled in train and eval mode
    raw["train"]["epochs"] = 1
    lines: list[str] = []
    train(resolve(raw), tmp_path / "eager", **QUIET)
    raw["train"]["compile"] = True
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()  # an earlier test (test_dot.py) may have compiled the same code: count this run's graphs
    counters.clear()
    train(resolve(raw), tmp_path / "compiled", progress=False, log=lines.append)
    assert counters["stats"]["unique_graphs"] >= 2  # teacher and student really went through dynamo
    assert any(line.startswith("train.compile:") for line in lines)
    eager, compiled = read_jsonl(tmp_path / "eager" / "metrics.jsonl"), read_jsonl(tmp_path / "compiled" / "metrics.jsonl")
    assert compiled[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=1e-4)
    a = read_model_file(tmp_path / "eager" / "nodes" / "student.pt")["state_dict"]
    b = read_model_file(tmp_path / "compiled" / "nodes" / "student.pt")["state_dict"]
    assert set(a) == set(b)  # the original module's keys (no _orig_mod. prefix)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-3
