"""Per-benchmark presets: protocol + pair + method gives the reference configs' values; explicit values win."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdflow.flow import RecipeError

from kdflow.methods.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1] / "recipes"


def method_file(tmp_path: Path, method: dict | str) -> Path:
    path = tmp_path / "method.yaml"
    path.write_text(yaml.safe_dump({"name": "m", "method": method}))
    return path


def dkd_params(recipe) -> dict:
    (t,) = [t for t in recipe.transfers if t.criterion == "dkd"]
    return {**t.params, "weight": t.weight}


@pytest.mark.parametrize("pair, beta", [("vgg13-MobileNetV2", 6), ("resnet56-resnet20", 2), ("resnet32x4-resnet8x4", 8)])
def test_cifar_dkd_beta_follows_the_pair(tmp_path: Path, pair: str, beta: float) -> None:
    """mdistiller configs/cifar100/dkd/*.yaml: BETA 6 or 2 on some pairs, the default 8 elsewhere."""
    files = [ROOT / "cifar100/protocol.yaml", ROOT / f"cifar100/pairs/{pair}.yaml", method_file(tmp_path, {"name": "dkd"})]
    assert dkd_params(load_recipe(files))["beta"] == beta
    assert dkd_params(load_recipe(files, ["method.beta=7"]))["beta"] == 7  # --set wins over the preset


def test_imagenet_presets_set_the_method_and_its_batch(tmp_path: Path) -> None:
    """mdistiller configs/imagenet/r50_mv1: KD τ=1, CE 0.5, KD 0.5 at batch 512, lr 0.2; DKD β=2, T=1, warm-up 1."""
    base = [ROOT / "imagenet/protocol.yaml", ROOT / "imagenet/pairs/resnet50-mobilenetv1.yaml"]
    kd = load_recipe([*base, method_file(tmp_path, {"name": "kd"})])
    (t,) = kd.transfers
    assert (t.params["temperature"], t.weight, kd.supervise["student"].weight) == (1.0, 0.5, 0.5)
    assert (kd.train.batch_size, kd.train.optim.lr, kd.train.optim.weight_decay) == (512, 0.2, 1e-4)
    assert load_recipe([*base, method_file(tmp_path, {"name": "kd"})], ["train.optim.lr=0.3"]).train.optim.lr == 0.3
    dkd = load_recipe([*base, method_file(tmp_path, {"name": "dkd"})])
    p = dkd_params(dkd)
    assert (p["beta"], p["temperature"], p["weight"].warmup_epochs) == (2.0, 1.0, 1)
    crd = load_recipe([*base, method_file(tmp_path, "crd")])
    assert (crd.train.batch_size, crd.train.optim.lr) == (256, 0.1)
    r18 = load_recipe([ROOT / "imagenet/protocol.yaml", ROOT / "imagenet/pairs/resnet34-resnet18.yaml", method_file(tmp_path, "dkd")])
    assert dkd_params(r18)["beta"] == 0.5


@pytest.mark.parametrize("presets, message", [
    ({"dkdd": {"args": {"beta": 1}}}, r"presets\.dkdd: unknown method"),
    ({"dkd": {"beta": 1}}, r"presets\.dkd: expected a mapping with args and/or train"),
    ({"dkd": {"args": {"betta": 1}}}, r"method\.dkd: unknown field 'betta'"),
])
def test_bad_presets_are_one_line_errors(tmp_path: Path, presets: dict, message: str) -> None:
    pair = tmp_path / "pair.yaml"
    pair.write_text(yaml.safe_dump({"presets": presets}))
    with pytest.raises(RecipeError, match=message):
        load_recipe([ROOT / "fashion_mnist/pair.yaml", pair, method_file(tmp_path, {"name": "dkd"})])


def _term(recipe, criterion: str):
    (t,) = [t for t in recipe.transfers if t.criterion == criterion]
    return t


@pytest.mark.parametrize("files, criterion, field, want", [
    # the shipped method files name no default argument, so the pair's and protocol's presets reach them
    (["cifar100/protocol.yaml", "cifar100/pairs/resnet56-resnet20.yaml", "methods/dkd.yaml"], "dkd", "beta", 2),
    (["cifar100/protocol.yaml", "cifar100/pairs/wrn_40_2-ShuffleV1.yaml", "methods/dkd.yaml"], "dkd", "beta", 8),
    (["cifar100/protocol.yaml", "cifar100/pairs/resnet32x4-ShuffleV2.yaml", "methods/reviewkd.yaml"], "reviewkd", "weight", 8.0),
    (["cifar100/protocol.yaml", "cifar100/pairs/resnet56-resnet20.yaml", "methods/reviewkd.yaml"], "reviewkd", "weight", 0.6),
    (["cifar100/protocol.yaml", "cifar100/pairs/resnet32x4-resnet8x4.yaml", "methods/reviewkd.yaml"], "reviewkd", "weight", 5.0),
    (["imagenet/protocol.yaml", "imagenet/pairs/resnet34-resnet18.yaml", "methods/kd.yaml"], "kd", "temperature", 1.0),
    (["imagenet/protocol.yaml", "imagenet/pairs/resnet34-resnet18.yaml", "methods/dkd.yaml"], "dkd", "beta", 0.5),
    (["cifar100/protocol.yaml", "cifar100/pairs/resnet32x4-resnet8x4.yaml", "methods/dkd+fitnet.yaml"], "dkd", "beta", 8),
    (["cifar100/protocol.yaml", "cifar100/pairs/vgg13-MobileNetV2.yaml", "methods/dkd+fitnet.yaml"], "dkd", "beta", 6),
])
def test_shipped_method_files_take_the_presets(files: list[str], criterion: str, field: str, want: float) -> None:
    t = _term(load_recipe([ROOT / f for f in files]), criterion)
    got = t.weight if field == "weight" else t.params[field]
    assert float(getattr(got, "value", got)) == want
