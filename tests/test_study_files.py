"""Every run of the shipped study files builds: a method default that no longer fits a pair (a stage
count, a tap the model lacks) fails here, not hours into a study."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kdflow.checkpoint import model_file, save_atomic
from kdflow.methods.recipe import resolve
from kdflow.flow.graph import Flow
from kdflow.models import build_model
from kdflow.study.grid import expand
from kdflow.study.spec import load_study

STUDIES = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.yaml"))
SHAPES = {"mnist1d": (1, 40), "fashion_mnist": (1, 28, 28)}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_student_run_builds(path: Path, tmp_path: Path) -> None:
    study, _ = load_study(path)
    seen = set()
    for run in expand(study, tmp_path / "study").runs:
        key = (run.labels["dataset"], run.labels["pair"], run.labels["method"])
        if run.role != "student" or key in seen:
            continue
        seen.add(key)
        raw, shape = copy.deepcopy(run.recipe), SHAPES[run.labels["dataset"]]
        for name, node in raw["nodes"].items():
            if "checkpoint" in node:  # a random teacher in the run's architecture stands in for the trained one
                model = build_model(node["arch"], 10, shape, **node.get("args", {}))
                node["checkpoint"] = str(tmp_path / f"{name}-{len(seen)}.pt")
                save_atomic(model_file(node["arch"], node.get("args", {}), 10, shape, model.state_dict()), node["checkpoint"])
        torch.manual_seed(0)
        Flow(resolve(raw), 10, shape, torch.randn(2, *shape), num_data=64, train_labels=torch.arange(64) % 10)
    assert seen
