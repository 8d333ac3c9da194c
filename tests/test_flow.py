"""The flow at run time: which parameters a term's gradient reaches, fusion, weights, the KD total."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SYNTH
from kdflow import losses
from kdflow.methods.recipe import resolve
from kdflow.flow.graph import Flow
from kdflow.flow.spec import WeightSchedule


def build(raw: dict) -> Flow:
    recipe = resolve(raw)
    torch.manual_seed(0)
    return Flow(recipe, 4, (1, 8, 8), torch.randn(2, 1, 8, 8))


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def grads(flow: Flow, node: str) -> list[torch.Tensor | None]:
    return [p.grad for p in flow.parameters_of(node)]


def peers(detach: bool) -> dict:
    """Two trainable peers; only a transfer a -> b, no supervision: the transfer's gradient routing alone."""
    return {
        "data": SYNTH,
        "nodes": {"a": {"arch": "mlp", "args": {"hidden": [8]}}, "b": {"arch": "convnet_s"}},
        "transfers": [{"from": "a.logits", "to": "b.logits", "criterion": "kd", "temperature": 2.0, "detach": detach}],
    }


def test_transfer_gradient_reaches_target_only_when_detached() -> None:
    flow = build(peers(detach=True))
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    out = flow(*batch(), stage, 0)
    out.total.backward()
    assert all(g is None for g in grads(flow, "a"))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(flow, "b")[:1])
    assert sum(float(g.abs().sum()) for g in grads(flow, "b") if g is not None) > 0


def test_transfer_gradient_reaches_source_when_not_detached() -> None:
    flow = build(peers(detach=False))
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    flow(*batch(), stage, 0).total.backward()
    assert all(g is not None for g in grads(flow, "a"))
    assert sum(float(g.abs().sum()) for g in grads(flow, "a")) > 0
    assert sum(float(g.abs().sum()) for g in grads(flow, "b") if g is not None) > 0


def test_frozen_teacher_gets_no_gradient_and_kd_total_matches_formula(kd_raw: dict) -> None:
    flow = build(kd_raw)
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    teacher_before = copy.deepcopy(flow.models["teacher"].state_dict())
    x, y = batch()
    out = flow(x, y, stage, 0)
    out.total.backward()
    assert all(p.grad is None and not p.requires_grad for p in flow.models["teacher"].parameters())
    assert not flow.models["teacher"].training
    # the total is 0.1·CE + 0.9·τ²·KL(p_t ‖ p_s), computed here from the two models' outputs in numpy
    with torch.no_grad():
        zs = flow.models["student"](x).double().numpy()
        zt = flow.models["teacher"](x).double().numpy()

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    ce = -log_softmax(zs)[np.arange(len(y)), y.numpy()].mean()
    lt, ls = log_softmax(zt / 4), log_softmax(zs / 4)
    kl = (np.exp(lt) * (lt - ls)).sum(axis=1).mean() * 16
    assert out.total.item() == pytest.approx(0.1 * ce + 0.9 * kl, rel=1e-5)
    for k, v in flow.models["teacher"].state_dict().items():  # batch-norm statistics untouched (eval mode)
        assert torch.equal(v, teacher_before[k]), k


def test_connector_belongs_to_target_node_and_trains() -> None:
    raw = {
        "data": SYNTH,
        "nodes": {"t": {"arch": "convnet_m"}, "s": {"arch": "convnet_s"}},
        "stages": [{"name": "both", "train": ["t", "s"]}],
        "transfers": [{"from": "t.stage1", "to": "s.stage1", "criterion": "hint", "connector": "conv1x1"}],
    }
    flow = build(raw)
    conn = list(flow.connectors["0"].parameters())
    assert {id(p) for p in conn} <= {id(p) for p in flow.parameters_of("s")}
    assert not {id(p) for p in conn} & {id(p) for p in flow.parameters_of("t")}
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    x, y = batch()
    flow(x, y, stage, 0).total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conn)
    assert all(p.grad is None for p in flow.models["t"].parameters())  # detached source
    assert flow.models["s"].stem[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("weights", [None, [0.25, 0.75]])
def test_fused_sources(weights: list[float] | None, tmp_path) -> None:
    from conftest import make_teacher

    raw = {
        "data": SYNTH,
        "nodes": {
            "t1": {"arch": "convnet_s", "checkpoint": str(make_teacher(tmp_path / "t1.pt", seed=1)), "role": "frozen"},
            "t2": {"arch": "convnet_s", "checkpoint": str(make_teacher(tmp_path / "t2.pt", seed=2)), "role": "frozen"},
            "s": {"arch": "mlp"},
        },
        "transfers": [
            {"from": {"fuse": ["t1.logits", "t2.logits"], **({"weights": weights} if weights else {})},
             "to": "s.logits", "criterion": "kd", "temperature": 3.0, "weight": 2.0}
        ],
    }
    flow = build(raw)
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    x, y = batch()
    out = flow(x, y, stage, 0)
    w = weights or [0.5, 0.5]
    with torch.no_grad():
        fused = w[0] * flow.models["t1"](x) + w[1] * flow.models["t2"](x)
        expected = 2.0 * losses.kd(flow.models["s"](x), fused, 3.0)
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_weight_schedules_warmup_and_steps() -> None:
    w = WeightSchedule(value=2.0, warmup_epochs=4, milestones=[6, 8], gamma=0.5)
    assert [w.at(e) for e in range(10)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5]


def test_scheduled_weight_enters_total(kd_raw: dict) -> None:
    kd_raw["method"] = {"name": "kd", "ce_weight": 0.0}
    kd_raw["transfers"] = []
    flow_raw = copy.deepcopy(kd_raw)
    flow = build(flow_raw)
    flow.recipe.transfers[0].weight = WeightSchedule(value=1.0, warmup_epochs=4)
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    x, y = batch()
    t0 = flow(x, y, stage, 0).total.item()
    t3 = flow(x, y, stage, 3).total.item()
    assert t0 == pytest.approx(t3 / 4, rel=1e-6)


def test_supervision_is_cross_entropy_times_weight() -> None:
    raw = {"data": SYNTH, "nodes": {"s": {"arch": "mlp"}}, "supervise": {"s": 0.3}}
    flow = build(raw)
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    x, y = batch()
    out = flow(x, y, stage, 0)
    assert out.total.item() == pytest.approx(0.3 * F.cross_entropy(flow.models["s"](x), y).item(), rel=1e-6)
