"""`kdflow train` of the CIFAR-100 protocol + a pair + each benchmark method's file, one epoch on a small
CIFAR-100-format folder, with a teacher saved in RepDistiller's layout ({'model': state_dict, 'epoch': ...}).

Only what a one-epoch CPU run needs is changed on the command line (the epochs of init stages, CRD's
negatives for 64 training images); the taps, weights and presets are the files' own. Each run must end
with a trained student file, a finite training loss for every stage and the method's criteria in the
resolved recipe.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from formats import make_cifar100
from kdflow.cli import main
from kdflow.engine.rundir import read_jsonl
from kdflow.models import build_model

ROOT = Path(__file__).resolve().parents[1] / "recipes"
# method → (criteria its recipe must hold, extra --set items for a one-epoch run on 64 images)
BENCHMARK = {
    "kd": ({"kd"}, []),
    "fitnet": ({"hint"}, []),
    "at": ({"at"}, []),
    "sp": ({"sp"}, []),
    "cc": ({"cc"}, []),
    "vid": ({"vid"}, []),
    "rkd": ({"rkd"}, []),
    "pkt": ({"pkt"}, []),
    "ab": ({"ab"}, ["method.init_epochs=1"]),
    "ft": ({"ft"}, ["method.paraphrase_epochs=1"]),
    "fsp": ({"fsp"}, ["method.init_epochs=1"]),
    "nst": ({"nst"}, []),
    "crd": ({"crd"}, ["method.num_negatives=32"]),
    "ofd": ({"ofd"}, []),
    "reviewkd": ({"reviewkd"}, []),
    "dkd": ({"dkd"}, []),
    "dist": ({"dist"}, []),
}

STAGES = {"ab": ["init", "main"], "fsp": ["init", "main"], "ft": ["paraphrase", "main"]}  # one epoch each


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cifar")
    make_cifar100(root, n_train=64, n_test=16)  # one batch of the protocol's 64
    torch.manual_seed(0)
    teacher = build_model("resnet32x4", 100, (3, 32, 32))
    path = root / "ckpt_epoch_240.pth"  # RepDistiller's save_model layout
    torch.save({"epoch": 240, "model": teacher.state_dict(), "best_acc": 79.42}, path)
    return root, path


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(BENCHMARK))
def test_protocol_pair_method_trains_one_epoch(method: str, bench_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    data_root, teacher = bench_inputs
    criteria, extra = BENCHMARK[method]
    out = tmp_path / "run"
    sets = [f"data.root={data_root}", f"nodes.teacher.checkpoint={teacher}", "train.epochs=1", *extra]
    files = [ROOT / "cifar100/protocol.yaml", ROOT / "cifar100/pairs/resnet32x4-resnet8x4.yaml", ROOT / f"methods/{method}.yaml"]
    assert main(["train", *map(str, files), "--out", str(out), "--no-progress", "--set", *sets]) == 0
    assert (out / "nodes" / "student.pt").is_file()
    rows = read_jsonl(out / "metrics.jsonl")
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert [r["stage"] for r in rows] == STAGES.get(method, ["main"])
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    assert criteria <= {t["criterion"] for t in resolved["transfers"]}
