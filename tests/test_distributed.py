"""Two processes with gloo on the CPU (torchrun) end with the weights of one process over the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from conftest import SYNTH
from kdflow.checkpoint import read_model_file
from kdflow.engine import train
from kdflow.engine.rundir import read_jsonl
from kdflow.flow import load_recipe


def test_two_processes_match_one(teacher_ckpt: Path, tmp_path: Path) -> None:
    recipe = {
        "name": "ddp",
        "seed": 2,
        "data": {**SYNTH, "augment": {"crop_padding": 1, "flip": True}},
        "nodes": {"teacher": {"arch": "convnet_s", "checkpoint": str(teacher_ckpt)},
                  "student": {"arch": "mlp", "args": {"hidden": [16]}}},
        "method": "kd",
        # a helper (a trainable connector) whose gradients are averaged outside DDP
        "transfers": [{"from": "teacher.embedding", "to": "student.stage1", "criterion": "hint_mse", "connector": "linear"}],
        "train": {"epochs": 2, "batch_size": 32, "optim": {"lr": 0.1}},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train(load_recipe(path), tmp_path / "one", progress=False, log=lambda s: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "kdflow", "train", str(path), "--out", str(tmp_path / "two"), "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # rank 0 alone reports and writes
    one = read_model_file(tmp_path / "one" / "nodes" / "student.pt")["state_dict"]
    two = read_model_file(tmp_path / "two" / "nodes" / "student.pt")["state_dict"]
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-4), k
    last_one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["flow"]
    last_two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["flow"]
    conn = [k for k in last_one if k.startswith("connectors.")]
    assert conn and all(torch.allclose(last_one[k], last_two[k], atol=1e-5, rtol=1e-4) for k in conn)
    m1, m2 = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["test_top1"] for r in m1] == [r["test_top1"] for r in m2]
    assert [round(r["train_loss"], 4) for r in m1] == [round(r["train_loss"], 4) for r in m2]
