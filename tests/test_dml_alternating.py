"""DML's update orders (Zhang, Xiang, Hospedales, Lu 2018, Deep Mutual Learning, Algorithm 1).

Alternating: peer 1 steps, then every prediction is computed again and peer 2 learns from peer 1's
updated output. Joint (the default): one forward pass, both peers stepped from it.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from conftest import SYNTH
from kdflow.engine import train
from kdflow.engine.rundir import read_jsonl
from kdflow.engine.train import alternating_step, make_optimizers
from kdflow.methods.recipe import resolve
from kdflow.flow.graph import Flow

OPTIM = {"lr": 0.5, "momentum": 0.9, "weight_decay": 5e-4}  # a large step, so the order shows


def raw(alternating: bool) -> dict:
    return {"data": SYNTH, "train": {"epochs": 1, "batch_size": 16, "optim": OPTIM},
            "nodes": {"peer1": {"arch": "convnet_s"}, "peer2": {"arch": "convnet_s"}},
            "method": {"name": "dml", "peers": ["peer1", "peer2"], "alternating": alternating}}


def setup(alternating: bool):
    recipe = resolve(raw(alternating))
    torch.manual_seed(0)
    flow = Flow(recipe, 4, (1, 8, 8), torch.randn(2, 1, 8, 8), num_data=96)
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    return flow, stage, make_optimizers(flow, recipe, stage)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ p_student), batch mean, τ = 1."""
    return (F.softmax(teacher, 1) * (F.log_softmax(teacher, 1) - F.log_softmax(student, 1))).sum(1).mean()


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_alternating_equals_a_hand_written_two_step_update() -> None:
    flow, stage, optimizers = setup(alternating=True)
    assert stage.updates == "alternating" and stage.train == ["peer1", "peer2"]
    m1, m2 = copy.deepcopy(flow.models["peer1"]), copy.deepcopy(flow.models["peer2"])
    o1, o2 = (torch.optim.SGD(m.parameters(), **OPTIM) for m in (m1, m2))
    x, y = batch()

    out = alternating_step(flow, stage, x, y, 0, torch.arange(16), None, optimizers)

    # by hand: peer 1 steps on both peers' current outputs ...
    z1 = m1(x)
    with torch.no_grad():
        z2 = m2(x)
    (F.cross_entropy(z1, y) + kl(z1, z2)).backward()
    o1.step()
    # ... then peer 2 learns from peer 1's output after that step
    with torch.no_grad():
        z1_new = m1(x)
    z2 = m2(x)
    loss2 = F.cross_entropy(z2, y) + kl(z2, z1_new)
    loss2.backward()
    o2.step()

    torch.testing.assert_close(grads(flow.models["peer2"]), grads(m2))  # peer 1's were cleared before peer 2's pass
    for mine, hand in ((flow.models["peer1"], m1), (flow.models["peer2"], m2)):
        for (name, a), b in zip(mine.state_dict().items(), hand.state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)  # weights and batch-norm statistics
    torch.testing.assert_close(out.node_ce["peer2"], F.cross_entropy(z2, y).detach())
    assert set(out.logits) == {"peer1", "peer2"} and len(out.terms) == 4  # 2 CE + 2 KL terms


def test_the_orders_give_different_second_peer_gradients() -> None:
    x, y = batch()
    alt, stage_a, opt_a = setup(alternating=True)
    alternating_step(alt, stage_a, x, y, 0, torch.arange(16), None, opt_a)
    joint, stage_j, opt_j = setup(alternating=False)
    assert stage_j.updates == "joint"
    out = joint(x, y, stage_j, 0, torch.arange(16))
    for o in opt_j.values():
        o.zero_grad(set_to_none=True)
    out.total.backward()
    # peer 2 learns from peer 1's output before (joint) or after (alternating) peer 1's step
    g_alt, g_joint = grads(alt.models["peer2"]), grads(joint.models["peer2"])
    assert (g_alt - g_joint).norm() > 1e-3 * g_joint.norm()


def test_alternating_run_through_the_engine(tmp_path: Path) -> None:
    train(resolve(raw(alternating=True)), tmp_path / "run", progress=False, log=lambda s: None)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    terms = {k: v for r in rows for k, v in r.get("terms", {}).items()}
    assert len(terms) == 4 and all(v == v for v in terms.values())  # both peers' CE and KL terms, finite
