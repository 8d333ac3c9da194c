"""A tiny run on each data format, through the command line: train, then eval the saved model."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from formats import make_cifar10, make_folder, make_idx_dir
from kdflow.checkpoint import read_model_file
from kdflow.cli import main


def run_cli(capsys, *argv: str) -> str:
    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10", "mnist1d", "synthetic", "image_folder"])
def test_teacher_then_kd_student_on_each_format(dataset: str, tmp_path: Path, capsys) -> None:
    data: dict = {"name": dataset}
    if dataset == "fashion_mnist":
        (tmp_path / "fm").mkdir()
        make_idx_dir(tmp_path / "fm")
        data["root"] = str(tmp_path / "fm")
    elif dataset == "cifar10":
        make_cifar10(tmp_path)
        data.update(root=str(tmp_path), augment={"crop_padding": 4, "flip": True})
    elif dataset == "mnist1d":
        data.update(limit=200, test_limit=100)
    elif dataset == "image_folder":
        make_folder(tmp_path / "images")
        data.update(root=str(tmp_path / "images"), options={"image_size": 16}, augment={"flip": True})
    recipe = {
        "name": f"e2e-{dataset}",
        "data": data,
        "nodes": {"teacher": {"arch": "convnet_s"}, "student": {"arch": "mlp", "args": {"hidden": [8]}}},
        "method": "kd",
        "supervise": {"teacher": 1.0},
        "stages": [{"name": "teacher", "train": ["teacher"]}, {"name": "student", "train": ["student"]}],
        "train": {"epochs": 1, "batch_size": 4 if dataset in ("fashion_mnist", "cifar10", "image_folder") else 64},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = run_cli(capsys, "train", str(path), "--out", str(tmp_path / "run"), "--no-progress")
    assert "| teacher | convnet_s |" in out and "| student | mlp |" in out and "0.9·kd(teacher.logits)" in out
    ckpt = tmp_path / "run" / "nodes" / "student.pt"
    assert read_model_file(ckpt)["data"]["dataset"] == dataset
    if dataset != "mnist1d":  # eval re-reads the dataset from where the model was trained
        out = run_cli(capsys, "eval", str(ckpt))
        assert "top-1" in out and dataset in out


def test_methods_and_describe(capsys) -> None:
    out = run_cli(capsys, "methods")
    assert "kd" in out and "Hinton" in out and "ce" in out
    recipes = str(Path(__file__).resolve().parents[1] / "recipes")
    out = run_cli(capsys, "describe", "kd", "--recipes", recipes)
    assert "teacher.logits -> student.logits  via kd  (temperature=4.0; weight 0.9; detached)" in out
    assert "student    ce, weight 0.1" in out
    assert "  temperature            float              4.0\n" in out  # the arguments with their defaults
    # the variants the recipes define, each with what it changes
    assert "recipes/methods/kd+ls.yaml: logit_standardization=True, temperature=2.0, kd_weight=9.0" in out
    assert "recipes/imagenet/protocol.yaml (preset): temperature=1.0, ce_weight=0.5, kd_weight=0.5" in out
    out = run_cli(capsys, "describe", "kd", "--mermaid")
    assert out.startswith("flowchart LR") and 'labels -- "ce ×0.1" --> student' in out
    # a variant's graph: the arguments given are drawn and marked
    out = run_cli(capsys, "describe", "kd", "logit_standardization=true", "temperature=2")
    assert "via kd  (temperature=2; weight 0.9; detached; logit-standardized)" in out
    assert "  temperature            float              2  * (default 4.0)" in out
    assert main(["describe", "nosuch"]) == 2
    assert main(["describe", "kd", "tau=2"]) == 2  # an argument kd does not take: one line naming it
