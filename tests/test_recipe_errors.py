"""Every bad recipe stops before anything starts, with one line naming the place."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from conftest import SYNTH, make_teacher
from kdflow.cli import main
from kdflow.engine import train
from kdflow.flow import RecipeError
from kdflow.methods.recipe import load_recipe, resolve


def fails(raw: dict, tmp_path: Path, pattern: str) -> str:
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=pattern) as info:
        train(resolve(raw), out, progress=False, log=lambda s: None)
    message = str(info.value)
    assert "\n" not in message
    assert not out.exists(), "nothing may start: no run directory"
    return message


def hint_raw(teacher: Path, **transfer) -> dict:
    return {
        "data": SYNTH,
        "nodes": {"teacher": {"arch": "convnet_m", "checkpoint": str(teacher), "role": "frozen"}, "student": {"arch": "convnet_s"}},
        "supervise": {"student": 1.0},
        "transfers": [{"from": "teacher.stage1", "to": "student.stage1", "criterion": "hint", **transfer}],
    }


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda r: r.update(epochz=3), r"^recipe: epochz: unknown field$"),
        (lambda r: r["nodes"]["student"].update(achr="mlp"), r"nodes\.student\.achr: unknown field"),
        (lambda r: r["train"].update(optim={"lr": 0.1, "momentun": 0.9}), r"train\.optim\.momentun: unknown field"),
        (lambda r: r.update(method="kdd"), r"unknown method 'kdd'; known: .*kd"),
        (lambda r: r.update(method={"name": "kd", "temprature": 3}), r"method\.kd: unknown field 'temprature'"),
        (lambda r: r.update(transfers=[{"from": "teacher.logits", "to": "student.logits", "criterion": "kll"}]),
         r"transfers\.0: unknown criterion 'kll'"),
        (lambda r: r.update(transfers=[{"from": "teacher.logits", "to": "student.logits", "criterion": "kd", "tau": 2}]),
         r"transfers\.0: unknown field 'tau': criterion 'kd' takes temperature"),
        (lambda r: r.update(transfers=[{"from": "teacher.logits", "to": "pupil.logits", "criterion": "kd"}]),
         r"transfers\.0\.to: tap 'pupil\.logits' must be NODE\.TAP"),
        (lambda r: r.update(supervise={"pupil": 1.0}), r"supervise\.pupil: no such node"),
        (lambda r: r["nodes"]["student"].update(arch="resnet9000"), r"nodes\.student\.arch: unknown architecture 'resnet9000'"),
        (lambda r: r["nodes"]["teacher"].pop("checkpoint"), r"nodes\.teacher: frozen in stage 'main' but has no checkpoint"),
        (lambda r: r.update(stages=[{"name": "s", "train": ["pupil"]}]), r"stages\.0\.train: no such node 'pupil'"),
    ],
)
def test_bad_recipe_fields(kd_raw: dict, tmp_path: Path, edit, pattern: str) -> None:
    raw = copy.deepcopy(kd_raw)
    edit(raw)
    fails(raw, tmp_path, pattern)


def test_tap_not_in_model_lists_nearest(tmp_path: Path) -> None:
    raw = hint_raw(make_teacher(tmp_path / "t.pt", "convnet_m"))
    raw["transfers"][0]["to"] = "student.stage_1"
    fails(raw, tmp_path, r"transfers\.0\.to: tap student\.stage_1: no module 'stage_1' in ConvNet; nearest: stage1")


def test_shape_mismatch_without_connector(tmp_path: Path) -> None:
    raw = hint_raw(make_teacher(tmp_path / "t.pt", "convnet_m"))
    fails(raw, tmp_path, r"transfers\.0: shape mismatch: student\.stage1 is \(16, 4, 4\), teacher\.stage1 is \(32, 4, 4\); add a connector")


def test_connector_resolves_the_mismatch(tmp_path: Path) -> None:
    raw = hint_raw(make_teacher(tmp_path / "t.pt", "convnet_m"), connector="conv1x1")
    raw["train"] = {"epochs": 1, "batch_size": 32}
    summary = train(resolve(raw), tmp_path / "run", progress=False, log=lambda s: None)
    assert [r["node"] for r in summary] == ["student"]


def test_checkpoint_missing_or_of_another_architecture(kd_raw: dict, tmp_path: Path) -> None:
    raw = copy.deepcopy(kd_raw)
    raw["nodes"]["teacher"]["checkpoint"] = str(tmp_path / "nope.pt")
    fails(raw, tmp_path, r"nodes\.teacher\.checkpoint: .*nope\.pt: no such checkpoint")
    raw["nodes"]["teacher"]["checkpoint"] = str(make_teacher(tmp_path / "m.pt", "convnet_m"))
    fails(raw, tmp_path, r"nodes\.teacher\.checkpoint: .*m\.pt holds a 'convnet_m', the recipe says 'convnet_s'")


def test_checkpoint_with_pickled_objects_is_refused(kd_raw: dict, tmp_path: Path) -> None:
    import torch

    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Path("/etc")}, bad)  # an arbitrary object: weights_only refuses it
    raw = copy.deepcopy(kd_raw)
    raw["nodes"]["teacher"]["checkpoint"] = str(bad)
    fails(raw, tmp_path, r"nodes\.teacher\.checkpoint: .*evil\.pt: not a loadable weights-only checkpoint")


def test_missing_dataset_names_where_it_looked(kd_raw: dict, tmp_path: Path) -> None:
    raw = copy.deepcopy(kd_raw)
    raw["data"] = {"name": "fashion_mnist", "root": str(tmp_path / "nowhere")}
    msg = fails(raw, tmp_path, r"^data: ")
    assert str(tmp_path / "nowhere") in msg and "dataset-fashion-mnist" in msg


def test_yaml_file_overrides_and_cli_exit_code(kd_raw: dict, tmp_path: Path, capsys) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(kd_raw))
    recipe = load_recipe(path, ["train.epochs=5", "data.options.num_samples=64", "nodes.student.args.hidden=[4, 4]"])
    assert recipe.train.epochs == 5 and recipe.data.options["num_samples"] == 64
    assert recipe.nodes["student"].args["hidden"] == [4, 4]
    code = main(["train", str(path), "--set", "train.epohcs=1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0
    assert err.startswith(f"error: {path}: train.epohcs: unknown field")
    assert not (tmp_path / "run").exists()


def test_a_renamed_criterion_is_refused_in_one_line_naming_the_new_name() -> None:
    """kl, hint_mse and annealing_mse were renamed after their losses (kd, hint, annealing_kd)."""
    raw = {"data": {"name": "external"}, "nodes": {"teacher": {"arch": "mlp", "checkpoint": "memory:"}, "student": {"arch": "mlp"}},
           "transfers": [{"from": "teacher.logits", "to": "student.logits", "criterion": "kl"}]}
    with pytest.raises(RecipeError, match=r"^recipe: transfers\.0: criterion 'kl' is now called 'kd' \(the name of its loss\)$"):
        resolve(raw)


def test_study_hashes_did_not_change_with_the_criterion_names() -> None:
    """A run's hash names its results in a study's store: the rename keeps the hash it had before it
    (dabea81bab4d, computed by config_hash at commit 0eb30ad, when the criterion was still called 'kl')."""
    from kdflow.study.grid import config_hash

    raw = {"seed": 0, "data": {"name": "synthetic", "options": {"num_samples": 64, "num_classes": 4, "shape": [1, 8, 8]}},
           "nodes": {"teacher": {"arch": "convnet_s", "checkpoint": "t.pt"}, "student": {"arch": "mlp"}},
           "method": {"name": "kd"}, "train": {"epochs": 1}}
    assert config_hash(raw, "abc") == "dabea81bab4d"
