"""Flow features the method zoo builds on: tap groups, fan-out, stage-scoped terms, supervision
losses, criterion context, criterion modules owned by the target node, composed recipe files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import SYNTH, make_teacher
from kdflow import losses
from kdflow.engine import train
from kdflow.engine.rundir import read_jsonl
from kdflow.engine.train import load_flow_state
from kdflow.flow import RecipeError
from kdflow.methods.recipe import load_recipe, resolve
from kdflow.losses.registry import register_criterion
from kdflow.flow.graph import Flow


def build(raw: dict, num_data: int = 96) -> Flow:
    torch.manual_seed(0)
    return Flow(resolve(raw), 4, (1, 8, 8), torch.randn(2, 1, 8, 8), num_data=num_data, train_labels=torch.arange(num_data) % 4)


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def pair(tmp_path: Path, **extra) -> dict:
    return {
        "data": SYNTH,
        "nodes": {
            "teacher": {"arch": "convnet_m", "checkpoint": str(make_teacher(tmp_path / "t.pt", "convnet_m")), "role": "frozen"},
            "student": {"arch": "convnet_s"},
        },
        **extra,
    }


def test_fan_out_makes_one_transfer_per_target(tmp_path: Path) -> None:
    raw = pair(tmp_path)
    raw["nodes"]["peer"] = {"arch": "mlp"}
    raw["transfers"] = [{"from": "teacher.logits", "to": ["student.logits", "peer.logits"], "criterion": "kd", "weight": 0.5}]
    recipe = resolve(raw)
    assert [t.to for t in recipe.transfers] == ["student.logits", "peer.logits"]
    assert all(t.weight == 0.5 and t.params == {"temperature": 4.0} or t.params == {} for t in recipe.transfers)


def test_grouped_criterion_gets_lists(tmp_path: Path) -> None:
    raw = pair(tmp_path, transfers=[{
        "from": {"group": ["teacher.stage1", "teacher.stage2"]},
        "to": {"group": ["student.stage1", "student.stage2"]},
        "criterion": "fsp",
    }])
    with pytest.raises(RecipeError, match="takes tap groups"):
        resolve(pair(tmp_path, transfers=[{"from": "teacher.stage1", "to": "student.stage1", "criterion": "fsp"}]))
    # fsp needs equal channels: convnet_m has 32/64, convnet_s 16/32 -> the loss itself refuses at build
    raw["nodes"]["student"]["arch"] = "convnet_m"
    flow = build(raw)
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    x, y = batch()
    out = flow(x, y, stage, 0)
    with torch.no_grad():
        t, s = flow.models["teacher"], flow.models["student"]
        t1, s1 = t.stage1(t.stem(x)), s.stage1(s.stem(x))
        expected = losses.fsp((s1, s.stage2(s1)), (t1, t.stage2(t1)))
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_stage_scoped_transfer_and_supervision(tmp_path: Path) -> None:
    raw = pair(
        tmp_path,
        supervise={"student": {"weight": 1.0, "stages": ["finetune"]}},
        transfers=[{"from": "teacher.stage1", "to": "student.stage1", "criterion": "hint",
                    "connector": "conv1x1", "stages": ["hint"]}],
        stages=[{"name": "hint", "train": ["student"]}, {"name": "finetune", "train": ["student"]}],
    )
    flow = build(raw)
    x, y = batch()
    hint, finetune = flow.stages
    flow.set_stage_modes(hint)
    assert set(flow(x, y, hint, 0).terms) == {"hint(teacher.stage1 -> student.stage1)"}
    flow.set_stage_modes(finetune)
    assert set(flow(x, y, finetune, 0).terms) == {"ce(student)"}
    with pytest.raises(RecipeError, match=r"transfers\.0\.stages: no stage 'hnt'"):
        raw["transfers"][0]["stages"] = ["hnt"]
        resolve(raw)


def test_supervision_losses(tmp_path: Path) -> None:
    raw = {"data": SYNTH, "nodes": {"s": {"arch": "mlp"}}, "supervise": {"s": {"loss": "label_smoothing", "epsilon": 0.2, "weight": 0.5}}}
    flow = build(raw)
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    x, y = batch()
    out = flow(x, y, stage, 0)
    with torch.no_grad():
        expected = 0.5 * losses.label_smoothing(flow.models["s"](x), y, epsilon=0.2)
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(RecipeError, match=r"supervise\.s: unknown field 'eps': loss 'label_smoothing' takes epsilon"):
        resolve({**raw, "supervise": {"s": {"loss": "label_smoothing", "eps": 0.2}}})
    with pytest.raises(RecipeError, match=r"supervise\.s: unknown loss 'focal'"):
        resolve({**raw, "supervise": {"s": {"loss": "focal"}}})


seen_context: dict = {}


def spy(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, epoch: int, epochs: int, indices, stage: str, x) -> torch.Tensor:
    seen_context.update(target=target, epoch=epoch, epochs=epochs, indices=indices, stage=stage, x=x)
    return (student - teacher).pow(2).mean()


register_criterion("test_spy", spy)


def test_criterion_context_reaches_the_criterion(tmp_path: Path) -> None:
    raw = pair(tmp_path, transfers=[{"from": "teacher.logits", "to": "student.logits", "criterion": "test_spy"}])
    raw["train"] = {"epochs": 3}
    flow = build(raw)
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    x, y = batch()
    idx = torch.arange(8) + 10
    flow(x, y, stage, 2, idx)
    assert seen_context["epoch"] == 2 and seen_context["epochs"] == 3 and seen_context["stage"] == "main"
    assert torch.equal(seen_context["target"], y) and torch.equal(seen_context["indices"], idx) and seen_context["x"] is x


def test_module_criterion_belongs_to_target_and_is_checkpointed(tmp_path: Path) -> None:
    raw = pair(tmp_path, transfers=[{"from": "teacher.stage2", "to": "student.stage2", "criterion": "vid"}],
               train={"epochs": 1, "batch_size": 32})
    flow = build(raw)
    vid = flow.criterion_modules["0"]
    assert {id(p) for p in vid.parameters()} <= {id(p) for p in flow.parameters_of("student")}
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    x, y = batch()
    flow(x, y, stage, 0).total.backward()
    assert all(p.grad is not None for p in vid.parameters())
    assert all(p.grad is None for p in flow.models["teacher"].parameters())
    summary = train(resolve(raw), tmp_path / "run", progress=False, log=lambda s: None)
    assert summary[0]["node"] == "student"
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["flow"]
    saved = {k.removeprefix("criterion_modules.0."): v for k, v in state.items() if k.startswith("criterion_modules.0.")}
    assert saved and set(saved) == set(vid.state_dict())
    initial = build(raw).criterion_modules["0"].state_dict()  # the same seed: the weights the run started from
    assert not torch.equal(saved["variance_param"], initial["variance_param"])  # the variances were trained and saved


def test_crd_memory_bank_travels_with_the_checkpoint(tmp_path: Path) -> None:
    raw = pair(tmp_path, transfers=[{"from": "teacher.embedding", "to": "student.embedding", "criterion": "crd",
                                     "num_negatives": 16}], train={"epochs": 1, "batch_size": 32})
    train(resolve(raw), tmp_path / "run", progress=False, log=lambda s: None)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    banks = {k: v for k, v in last["flow"].items() if "memory" in k}
    assert len(banks) == 2 and all(v.shape == (96, 128) for v in banks.values())
    fresh = build(raw)
    load_flow_state(fresh, last, tmp_path / "run")  # as --resume does (the frozen teacher from its file)
    for k, v in banks.items():
        assert torch.equal(fresh.state_dict()[k], v)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert "crd(teacher.embedding -> student.embedding)" in rows[0]["terms"]


def test_recipe_files_compose(tmp_path: Path) -> None:
    base = pair(tmp_path, train={"epochs": 4, "batch_size": 16})
    (tmp_path / "pair.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "method.yaml").write_text(yaml.safe_dump({"name": "m", "method": {"name": "kd", "temperature": 2}, "train": {"epochs": 7}}))
    recipe = load_recipe([tmp_path / "pair.yaml", tmp_path / "method.yaml"], ["train.batch_size=8"])
    assert recipe.name == "m" and recipe.train.epochs == 7 and recipe.train.batch_size == 8
    assert recipe.transfers[0].params == {"temperature": 2}
    assert recipe.nodes["teacher"].arch == "convnet_m"


def test_bf16_autocast_runs_nodes_in_bf16_and_losses_in_fp32(kd_raw: dict, tmp_path: Path) -> None:
    flow = build(kd_raw)
    flow.autocast_dtype = torch.bfloat16
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    seen = []
    flow.models["student"].fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x, y = batch()
    out = flow(x, y, stage, 0)
    assert seen == [torch.bfloat16] and out.total.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.terms.values())
    kd_raw["train"]["precision"] = "bf16"
    kd_raw["train"]["epochs"] = 1
    summary = train(resolve(kd_raw), tmp_path / "run", progress=False, log=lambda s: None)
    assert summary[0]["node"] == "student"
