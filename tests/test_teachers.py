"""The teacher pipeline and the CIFAR-100 recipes: train and register a teacher, name it in a
recipe, refuse a changed file or another architecture; standard pairs run as quick CPU runs."""
from __future__ import annotations

from pathlib import Path

import pytest

from formats import make_cifar100
from kdflow.cli import main
from kdflow.flow import RecipeError
from kdflow.methods.recipe import load_recipe
from kdflow.flow.graph import load_node_checkpoint
from kdflow.models import build_model
from kdflow.teachers import read_registry

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["train.epochs=1", "data.limit=64", "data.test_limit=32", "train.batch_size=32"]


@pytest.fixture
def cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_cifar100(tmp_path)
    monkeypatch.setenv("KDFLOW_CIFAR", str(tmp_path))
    monkeypatch.setenv("KDFLOW_TEACHERS", str(tmp_path / "teachers"))
    monkeypatch.chdir(ROOT)  # `kdflow teacher train` reads recipes/DATA/ from the repository root
    return tmp_path


def test_teacher_train_registers_and_recipes_verify_it(cifar: Path, capsys) -> None:
    out = cifar / "run"
    assert main(["teacher", "train", "resnet8", "--data", "cifar100", "--out", str(out), "--no-progress", "--set", *QUICK]) == 0
    entry = read_registry()["cifar100-resnet8"]
    assert entry["arch"] == "resnet8" and len(entry["sha256"]) == 64 and Path(entry["checkpoint"]) == (out / "nodes" / "teacher.pt").resolve()
    assert "registry:cifar100-resnet8" in capsys.readouterr().out
    model = build_model("resnet8", 100, (3, 32, 32))
    load_node_checkpoint(model, "teacher", "resnet8", "registry:cifar100-resnet8")  # verified and loaded
    with pytest.raises(RecipeError, match=r"nodes\.teacher\.checkpoint: .* holds a 'resnet8', the recipe says 'resnet14'"):
        load_node_checkpoint(build_model("resnet14", 100, (3, 32, 32)), "teacher", "resnet14", "registry:cifar100-resnet8")
    with pytest.raises(RecipeError, match=r"no teacher 'cifar100-resnet9'"):
        load_node_checkpoint(model, "teacher", "resnet8", "registry:cifar100-resnet9")
    with open(entry["checkpoint"], "ab") as f:
        f.write(b"\0")
    with pytest.raises(RecipeError, match=r"checksum mismatch for teacher 'cifar100-resnet8'"):
        load_node_checkpoint(model, "teacher", "resnet8", "registry:cifar100-resnet8")


def test_every_pair_recipe_composes_with_every_method_file() -> None:
    pairs = sorted((ROOT / "recipes" / "cifar100" / "pairs").glob("*.yaml"))
    methods = sorted((ROOT / "recipes" / "methods").glob("*.yaml"))
    assert len(pairs) == 15 and methods
    for pair in pairs:
        recipe = load_recipe([ROOT / "recipes/cifar100/protocol.yaml", pair, ROOT / "recipes/methods/kd.yaml"], QUICK)
        assert recipe.train.epochs == 1 and recipe.data.limit == 64 and recipe.nodes["teacher"].checkpoint.startswith("registry:")
        small_lr = any(k in recipe.nodes["student"].arch for k in ("MobileNet", "Shuffle"))
        assert recipe.train.optim.lr == (0.01 if small_lr else 0.05)
        assert recipe.train.schedule.milestones == [150, 180, 210] and recipe.train.batch_size == 32


@pytest.mark.parametrize(
    "pair", ["resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2", "vgg13-vgg8", "resnet32x4-ShuffleV2", "ResNet50-MobileNetV2"]
)
def test_standard_pair_quick_run(pair: str, cifar: Path, tmp_path: Path, capsys) -> None:
    teacher_arch = pair.split("-")[0]
    teacher = cifar / f"t-{teacher_arch}"  # a teacher of one epoch on 8 images is enough to run the pipeline end to end
    code = main(["teacher", "train", teacher_arch, "--data", "cifar100", "--out", str(teacher), "--no-progress",
                 "--set", "train.epochs=1", "train.batch_size=4", "data.limit=8", "data.test_limit=8"])
    assert code == 0
    files = ["recipes/cifar100/protocol.yaml", f"recipes/cifar100/pairs/{pair}.yaml", "recipes/methods/kd.yaml"]
    code = main(["train", *files, "--out", str(tmp_path / "run"), "--no-progress", "--set", *QUICK])
    assert code == 0, capsys.readouterr().err
    assert f"| student | {pair.split('-')[1]} |" in capsys.readouterr().out


def test_imagenet_pairs_run_quickly_on_a_tiny_folder(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from formats import make_folder

    make_folder(tmp_path / "images")
    monkeypatch.chdir(ROOT)
    teacher = tmp_path / "t.pt"
    from kdflow.checkpoint import model_file, save_atomic

    save_atomic(model_file("resnet34_imagenet", {}, 3, (3, 32, 32), build_model("resnet34_imagenet", 3, (3, 32, 32)).state_dict()), teacher)
    files = ["recipes/imagenet/protocol.yaml", "recipes/imagenet/pairs/resnet34-resnet18.yaml", "recipes/methods/kd.yaml"]
    quick = [f"nodes.teacher.checkpoint={teacher}", f"data.root={tmp_path / 'images'}", "data.options.image_size=32",
             "train.epochs=1", "train.batch_size=4"]
    assert main(["train", *files, "--out", str(tmp_path / "run"), "--no-progress", "--set", *quick]) == 0, capsys.readouterr().err
    assert "| student | resnet18_imagenet |" in capsys.readouterr().out
    pair = load_recipe([ROOT / "recipes/imagenet/protocol.yaml", ROOT / "recipes/imagenet/pairs/resnet50-mobilenetv1.yaml"])
    assert pair.nodes["student"].arch == "mobilenetv1_imagenet" and pair.train.schedule.milestones == [30, 60, 90]
