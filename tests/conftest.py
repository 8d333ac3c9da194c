"""Shared helpers: tiny recipes on the synthetic dataset, and teacher checkpoints."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kdflow.checkpoint import model_file, save_atomic
from kdflow.models import build_model

SYNTH = {"name": "synthetic", "options": {"num_samples": 96, "num_classes": 4, "shape": [1, 8, 8]}}


def make_teacher(path: Path, arch: str = "convnet_s", seed: int = 123, **args) -> Path:
    """A teacher checkpoint for the synthetic data (random weights are enough for routing tests)."""
    torch.manual_seed(seed)
    model = build_model(arch, 4, (1, 8, 8), **args)
    save_atomic(model_file(arch, args, 4, (1, 8, 8), model.state_dict()), path)
    return path


@pytest.fixture
def teacher_ckpt(tmp_path: Path) -> Path:
    return make_teacher(tmp_path / "teacher.pt")


@pytest.fixture
def kd_raw(teacher_ckpt: Path) -> dict:
    """A KD recipe as a dict: frozen convnet_s teacher, mlp student, 2 epochs on synthetic data."""
    return copy.deepcopy(
        {
            "name": "tiny-kd",
            "seed": 3,
            "data": SYNTH,
            "nodes": {
                "teacher": {"arch": "convnet_s", "checkpoint": str(teacher_ckpt)},
                "student": {"arch": "mlp", "args": {"hidden": [16]}},
            },
            "method": "kd",
            "train": {"epochs": 2, "batch_size": 32, "optim": {"lr": 0.05}},
        }
    )
