"""Two processes with gloo on the CPU (torchrun) against one process over the same global batches.

With `train.sync_bn` a student with batch norms (and a connector with a batch norm) ends with the
weights and running statistics of one process, also when the shards are uneven (batch 25 over 2
ranks); without it the ranks normalise by their shards' statistics and the weights differ. CRD's
memory banks are all-gathered (every sample's row reaches every rank) and batch-norm running means
averaged over the ranks.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from conftest import SYNTH
from kdflow.checkpoint import read_model_file
from kdflow.engine import train
from kdflow.engine.rundir import read_jsonl
from kdflow.engine.sync_bn import SyncedBatchNorm2d, convert_batch_norms
from kdflow.methods.recipe import load_recipe
from kdflow.models import build_model

PORT = 29517


def _recipe(teacher_ckpt: Path, **train_fields) -> dict:
    return {
        "name": "ddp",
        "seed": 2,
        "data": {**SYNTH, "augment": {"crop_padding": 1, "flip": True}},
        "nodes": {"teacher": {"arch": "convnet_s", "checkpoint": str(teacher_ckpt)},
                  "student": {"arch": "convnet_s", "args": {"width": 8}}},
        "method": "kd",
        # a helper with a batch norm (conv1x1 connector), on a tap that is a batch norm (stage1_pre)
        "transfers": [{"from": "teacher.stage1", "to": "student.stage1_pre", "criterion": "hint", "connector": "conv1x1"}],
        # batch 25: every batch splits 12/13 (the last 10/11), so uneven shards are covered
        "train": {"epochs": 2, "batch_size": 25, "optim": {"lr": 0.1}, **train_fields},
    }


def _torchrun(recipe: dict, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    global PORT
    PORT += 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={PORT}",
           "-m", "kdflow", "train", str(path), "--out", str(tmp_path / name), "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # rank 0 alone reports and writes
    return tmp_path / name


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_two_processes_match_one_with_sync_bn(teacher_ckpt: Path, tmp_path: Path) -> None:
    recipe = _recipe(teacher_ckpt, sync_bn=True)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train(load_recipe(path), tmp_path / "one", progress=False, log=lambda s: None)  # sync_bn: no effect in one process
    synced = _torchrun(recipe, tmp_path, "two")
    unsynced = _torchrun(_recipe(teacher_ckpt, sync_bn=False), tmp_path, "unsynced")

    one = read_model_file(tmp_path / "one" / "nodes" / "student.pt")["state_dict"]
    two = read_model_file(synced / "nodes" / "student.pt")["state_dict"]
    assert any("running_var" in k for k in one)
    assert _max_diff(one, two) < 1e-5, _max_diff(one, two)  # weights and running statistics
    last_one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["flow"]
    last_two = torch.load(synced / "last.pt", weights_only=True)["flow"]
    conn = {k: last_one[k] for k in last_one if k.startswith("connectors.")}
    assert any("running_mean" in k for k in conn)
    assert _max_diff(conn, last_two) < 1e-5
    m1, m2 = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(synced / "metrics.jsonl")
    assert [r["test_top1"] for r in m1] == [r["test_top1"] for r in m2]
    assert [round(r["train_loss"], 4) for r in m1] == [round(r["train_loss"], 4) for r in m2]

    # without sync_bn each rank normalises by its shard's statistics: not the single-process run
    three = read_model_file(unsynced / "nodes" / "student.pt")["state_dict"]
    assert _max_diff(one, three) > 1e-3, _max_diff(one, three)


def test_buffers_equal_on_ranks(teacher_ckpt: Path, tmp_path: Path) -> None:
    """Without sync_bn: CRD's banks hold every rank's row updates (all-gathered) and batch-norm running means
    are averaged over the ranks: with equal shards and (all but) frozen weights, the first one's is one process's."""
    recipe = {
        "name": "ddp-crd", "seed": 1, "data": SYNTH, "method": "ce",
        "nodes": {"teacher": {"arch": "convnet_s", "checkpoint": str(teacher_ckpt)},
                  "student": {"arch": "convnet_s", "args": {"width": 8}}},
        "transfers": [{"from": "teacher.embedding", "to": "student.embedding", "criterion": "crd",
                       "feat_dim": 16, "num_negatives": 32}],
        "train": {"epochs": 1, "batch_size": 32, "optim": {"lr": 1e-9, "momentum": 0, "weight_decay": 0}},
    }
    path = tmp_path / "crd.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train(load_recipe(path), tmp_path / "one", progress=False, log=lambda s: None)
    out = _torchrun(recipe, tmp_path, "crd")
    flow = torch.load(out / "last.pt", weights_only=True)["flow"]
    banks = [v for k, v in flow.items() if k.endswith("memory_s") or k.endswith("memory_t")]
    assert len(banks) == 2
    for bank in banks:
        # an updated row is normalised; the initial rows are uniform draws, never of unit norm to 1e-5.
        # One epoch visits every sample once, half of them on rank 1: rank 0's banks hold those rows too.
        norms = bank.norm(dim=1)
        assert bool(((norms - 1).abs() < 1e-5).all()), int(((norms - 1).abs() >= 1e-5).sum())
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["flow"]
    # the first batch norm sees the data itself (deeper ones see activations normalised by shard statistics)
    k = "models.student.stem.1.running_mean"
    diff = float((one[k] - flow[k]).abs().max())
    assert diff < 1e-5, diff  # rank 0's own running mean (DDP's buffer broadcast) differs by 2e-3 here


def test_convert_keeps_hooks_weights_and_plain_behaviour() -> None:
    torch.manual_seed(0)
    model = build_model("convnet_s", 4, (1, 8, 8))
    ref = build_model("convnet_s", 4, (1, 8, 8))
    ref.load_state_dict(model.state_dict())
    seen = []
    bn = model.stage1[2]
    bn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    keys = list(model.state_dict())
    assert convert_batch_norms(model) == 3 and convert_batch_norms(model) == 0
    assert type(bn) is SyncedBatchNorm2d and isinstance(bn, nn.BatchNorm2d) and list(model.state_dict()) == keys
    x = torch.randn(6, 1, 8, 8)
    assert torch.equal(model(x), ref(x))  # no process group: the ordinary batch norm (train mode)
    assert seen and torch.equal(model.stage1[2].running_mean, ref.stage1[2].running_mean)
