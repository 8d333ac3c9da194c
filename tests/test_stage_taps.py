"""Stage positions (all_stages, last_stage, stage[i], _pre) resolve against each model's stage list."""
from __future__ import annotations

import pytest
import torch

from kdflow.flow.errors import RecipeError
from kdflow.flow.graph import Flow
from kdflow.methods.recipe import resolve
from kdflow.flow.stage_taps import expand_stage_taps, stage_list
from kdflow.models import build_model

CIFAR = {"name": "synthetic", "options": {"num_samples": 8, "num_classes": 100, "shape": [3, 32, 32]}}

# the benchmark's feature list without stem and embedding: RepDistiller models/*.py, forward(is_feat=True),
# feat[1:-1]; e.g. VGG's block0 is f0 (the stem) and MobileNetV2 returns f1..f4 between conv1 and the pool
BENCHMARK_STAGES = {
    "resnet8x4": 3, "resnet32x4": 3, "resnet56": 3, "wrn_40_2": 3, "wrn_16_2": 3, "vgg13": 4, "vgg8": 4,
    "MobileNetV2": 4, "ShuffleV1": 3, "ShuffleV2": 3, "ResNet50": 4,
}


@pytest.mark.parametrize("arch", sorted(BENCHMARK_STAGES))
def test_stage_list_is_the_benchmarks(arch: str) -> None:
    stages = stage_list(build_model(arch, 100, (3, 32, 32)))
    assert stages == [f"stage{k}" for k in range(1, BENCHMARK_STAGES[arch] + 1)]


def recipe(teacher: str, student: str, transfers: list[dict]):
    return resolve({
        "data": CIFAR,
        "nodes": {"teacher": {"arch": teacher, "checkpoint": "unused.pt"}, "student": {"arch": student}},
        "transfers": transfers,
    })


def models(teacher: str, student: str) -> dict:
    return {"teacher": build_model(teacher, 100, (3, 32, 32)), "student": build_model(student, 100, (3, 32, 32))}


def expand(teacher: str, student: str, transfers: list[dict]) -> list[tuple]:
    out, origin, _ = expand_stage_taps(recipe(teacher, student, transfers), models(teacher, student))
    return [(t.sources, t.targets, o) for t, o in zip(out.transfers, origin)]


def test_all_stages_repeats_the_transfer_per_stage() -> None:
    got = expand("resnet32x4", "resnet8x4", [
        {"from": "teacher.logits", "to": "student.logits", "criterion": "kd"},
        {"from": "teacher.all_stages", "to": "student.all_stages", "criterion": "at", "weight": 1000},
    ])
    assert got == [(["teacher.logits"], ["student.logits"], 0)] + [
        ([f"teacher.stage{k}"], [f"student.stage{k}"], 1) for k in (1, 2, 3)
    ]
    four = expand("vgg13", "MobileNetV2", [{"from": "teacher.all_stages_pre", "to": "student.all_stages_pre", "criterion": "at"}])
    assert [s for s, _, _ in four] == [[f"teacher.stage{k}_pre"] for k in (1, 2, 3, 4)]


def test_single_positions() -> None:
    got = expand("vgg13", "MobileNetV2", [
        {"from": "teacher.last_stage", "to": "student.last_stage", "criterion": "sp"},
        {"from": "teacher.stage[0]", "to": "student.stage[-3]_pre", "criterion": "at"},
    ])
    assert got[0][:2] == (["teacher.stage4"], ["student.stage4"])
    assert got[1][:2] == (["teacher.stage1"], ["student.stage2_pre"])


def test_all_stages_in_a_group_is_the_list() -> None:
    got = expand("resnet32x4", "resnet8x4", [
        {"from": {"group": ["teacher.all_stages", "teacher.embedding"]},
         "to": {"group": ["student.all_stages_pre", "student.embedding"]}, "criterion": "fsp"},
    ])
    assert got == [(["teacher.stage1", "teacher.stage2", "teacher.stage3", "teacher.embedding"],
                    ["student.stage1_pre", "student.stage2_pre", "student.stage3_pre", "student.embedding"], 0)]


def test_unequal_stage_counts_pair_from_the_deepest_and_say_so() -> None:
    r = recipe("resnet32x4", "MobileNetV2", [{"from": "teacher.all_stages", "to": "student.all_stages_pre", "criterion": "at"}])
    out, origin, notes = expand_stage_taps(r, models("resnet32x4", "MobileNetV2"))
    # 3 teacher stages, 4 student stages: the student's first is left out
    assert [(t.sources, t.targets) for t in out.transfers] == [
        ([f"teacher.stage{k}"], [f"student.stage{k + 1}_pre"]) for k in (1, 2, 3)
    ]
    assert origin == [0, 0, 0]
    assert len(notes) == 1 and "transfers.0 (at)" in notes[0] and "leaving out student.stage1_pre" in notes[0]
    same = recipe("resnet32x4", "resnet8x4", [{"from": "teacher.all_stages", "to": "student.all_stages", "criterion": "at"}])
    assert expand_stage_taps(same, models("resnet32x4", "resnet8x4"))[2] == []


@pytest.mark.parametrize("transfer, message", [
    ({"from": "teacher.all_stages", "to": "student.stage1", "criterion": "at"},
     r"transfers\.0: all_stages must be on both sides"),
    ({"from": "teacher.stage[3]", "to": "student.stage1", "criterion": "at"},
     r"transfers\.0: tap teacher\.stage\[3\]: CifarResNet has 3 stages \(stage1, stage2, stage3\)"),
])
def test_position_errors_name_the_transfer(transfer: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        expand("resnet32x4", "MobileNetV2", [transfer])


def test_flow_runs_the_expanded_transfers_and_reports_the_recipe_index() -> None:
    raw = {
        "data": CIFAR,
        "nodes": {"teacher": {"arch": "resnet8x4", "role": "trainable"}, "student": {"arch": "resnet8x4"}},
        "transfers": [{"from": "teacher.all_stages", "to": "student.all_stages", "criterion": "at", "weight": 1000}],
    }
    flow = Flow(resolve(raw), 100, (3, 32, 32), torch.randn(2, 3, 32, 32))
    assert len(flow.recipe.transfers) == 3
    out = flow(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), flow.stages[0], 0)
    assert sorted(k for k in out.terms if k.startswith("at(")) == [
        f"at(teacher.stage{k} -> student.stage{k})" for k in (1, 2, 3)
    ]
    assert flow.where(2) == "transfers.0 (stage3)"
    raw["nodes"]["student"] = {"arch": "mlp", "args": {"hidden": [16]}}
    # the MLP's one stage (its hidden layer) pairs with the teacher's deepest; AT names what it cannot compare
    with pytest.raises(RecipeError, match=r"transfers\.0: criterion 'at' cannot compare these taps: expected a B×C×H×W"):
        Flow(resolve(raw), 100, (3, 32, 32), torch.randn(2, 3, 32, 32))


def test_a_model_without_stages_is_named() -> None:
    r = recipe("resnet8x4", "resnet8x4", [{"from": "teacher.last_stage", "to": "student.last_stage", "criterion": "at"}])
    plain = {"teacher": build_model("resnet8x4", 100, (3, 32, 32)), "student": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 100))}
    with pytest.raises(RecipeError, match=r"transfers\.0: tap student\.last_stage: Sequential has no stage1\.\.stageN"):
        expand_stage_taps(r, plain)
