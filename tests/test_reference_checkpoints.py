"""Teachers trained by the reference code bases load as kdflow teachers (safe loading only)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from conftest import SYNTH
from kdflow.checkpoint import read_model_file
from kdflow.engine import train
from kdflow.flow import RecipeError
from kdflow.methods.recipe import resolve
from kdflow.models import build_model

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "repdistiller_state_keys.json").read_text())
QUIET = {"progress": False, "log": lambda s: None}


@pytest.mark.parametrize("arch", sorted(FIXTURE["archs"]))
def test_zoo_state_dicts_have_the_benchmarks_keys_and_shapes(arch: str) -> None:
    """Every key and shape of RepDistiller's model (fixture: its model_dict[arch](num_classes=100).state_dict())."""
    ours = {k: list(v.shape) for k, v in build_model(arch, 100, (3, 32, 32)).state_dict().items()}
    assert ours == FIXTURE["archs"][arch]


def repdistiller_layout(state: dict) -> dict:
    """What RepDistiller's train_teacher.py saves: {'epoch', 'model', 'best_acc', 'optimizer'}."""
    return {"epoch": 240, "model": state, "best_acc": torch.tensor(73.1),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005, "momentum": 0.9, "params": [0, 1]}]}}


@pytest.mark.parametrize("layout", ["repdistiller", "mdistiller-dataparallel", "state_dict", "net"])
def test_foreign_layouts_give_the_weights(tmp_path: Path, layout: str) -> None:
    state = build_model("resnet8", 100, (3, 32, 32)).state_dict()
    obj = {
        "repdistiller": repdistiller_layout(state),
        "mdistiller-dataparallel": {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
        "state_dict": {"state_dict": state, "arch": "resnet8"},
        "net": {"net": state, "acc": 70.0},
    }[layout]
    torch.save(obj, tmp_path / "t.pth")
    got = read_model_file(tmp_path / "t.pth")["state_dict"]
    assert list(got) == list(state) and all(torch.equal(got[k], state[k]) for k in state)


def test_unknown_layout_and_mismatched_keys_are_one_line_errors(tmp_path: Path) -> None:
    torch.save({"weights": {"a": torch.ones(1)}, "epoch": 1}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd\.pth: not a kdflow model checkpoint.*\(found: weights, epoch\)"):
        read_model_file(tmp_path / "odd.pth")


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/kdflow-payload-ran"),))


def test_a_pickle_payload_is_refused_and_does_not_run(tmp_path: Path) -> None:
    marker = Path("/tmp/kdflow-payload-ran")
    marker.unlink(missing_ok=True)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(ValueError, match="not a loadable weights-only checkpoint"):
        read_model_file(tmp_path / "evil.pth")
    assert not marker.exists()


def test_a_repdistiller_layout_teacher_trains_a_student(kd_raw: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = build_model("convnet_s", 4, (1, 8, 8))
    torch.save(repdistiller_layout(teacher.state_dict()), tmp_path / "ckpt_epoch_240.pth")
    raw = {**kd_raw, "train": {**kd_raw["train"], "epochs": 1}}
    raw["nodes"]["teacher"]["checkpoint"] = str(tmp_path / "ckpt_epoch_240.pth")
    train(resolve(raw), tmp_path / "run", **QUIET)
    assert (tmp_path / "run" / "nodes" / "student.pt").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["node"] == "student" for r in records)
    # the teacher in the run is the file's teacher: its logits are the loaded model's
    raw["nodes"]["teacher"]["arch"] = "convnet_m"
    with pytest.raises(RecipeError, match=r"nodes\.teacher\.checkpoint: .*ckpt_epoch_240\.pth does not fit 'convnet_m': \d+ missing keys: "):
        train(resolve(raw), tmp_path / "run2", **QUIET)
