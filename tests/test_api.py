"""kdflow as a library: the Distiller in a user's loop, on models kdflow did not write."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import kdflow
from kdflow.flow import RecipeError
from kdflow.methods.recipe import resolve
from kdflow.flow.graph import Flow

ROOT = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class TinyResNet(nn.Module):
    """torchvision's naming: conv1, bn1, layer1..layer4, avgpool, fc; optionally a tuple or dict output."""

    def __init__(self, width: int = 8, classes: int = 4, output: str = "tensor") -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.layer1 = Block(width, width, 1)
        self.layer2 = Block(width, 2 * width, 2)
        self.layer3 = Block(2 * width, 4 * width, 2)
        self.layer4 = Block(4 * width, 8 * width, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, classes)
        self.output = output

    def forward(self, x: torch.Tensor):
        x = torch.relu(self.bn1(self.conv1(x)))
        feats = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits = self.fc(torch.flatten(self.avgpool(feats), 1))
        if self.output == "tuple":
            return logits, feats
        if self.output == "dict":
            return {"logits": logits, "features": feats}
        return logits


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_distiller_equals_the_engine_for_the_same_recipe(kd_raw: dict) -> None:
    recipe = resolve(kd_raw)
    torch.manual_seed(0)
    engine = Flow(recipe, 4, (1, 8, 8), torch.randn(2, 1, 8, 8))
    stage = engine.stages[0]
    engine.set_stage_modes(stage)
    x, y = batch()
    expected = engine(x, y, stage, 0)
    teacher, student = copy.deepcopy(engine.models["teacher"]), copy.deepcopy(engine.models["student"])
    # Hinton KD written out in numpy on the two models' logits: 0.1·CE + 0.9·τ²·KL(p_t ‖ p_s), τ=4
    with torch.no_grad():
        zt, zs = teacher.eval()(x).double().numpy(), student.train()(x).double().numpy()

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    ce = -log_softmax(zs)[np.arange(len(y)), y.numpy()].mean()
    lt, ls = log_softmax(zt / 4), log_softmax(zs / 4)
    by_hand = 0.1 * ce + 0.9 * 16 * (np.exp(lt) * (lt - ls)).sum(1).mean()
    assert expected.total.item() == pytest.approx(by_hand, rel=1e-5)
    distiller = kdflow.Distiller(kdflow.methods.kd(teacher=teacher, student=student))
    out = distiller(x, y)
    assert out.total.item() == pytest.approx(by_hand, rel=1e-5)
    assert {k: round(v.item(), 6) for k, v in out.terms.items()} == {k: round(v.item(), 6) for k, v in expected.terms.items()}
    from_recipe = kdflow.Distiller.from_recipe(recipe, 4, (1, 8, 8), torch.randn(2, 1, 8, 8))
    from_recipe.flow.load_state_dict(engine.state_dict())
    assert from_recipe(x, y).total.item() == pytest.approx(expected.total.item(), rel=1e-6)


@pytest.mark.parametrize("output", ["tensor", "tuple", "dict"])
def test_models_kdflow_did_not_write(output: str) -> None:
    teacher, student = TinyResNet(16, output=output), TinyResNet(4, output=output)
    flow = kdflow.methods.at(teacher=teacher, student=student, stages=["layer2", "layer3"])
    distiller = kdflow.Distiller(flow, example_inputs=batch(2)[0])
    x, y = batch()
    out = distiller(x, y)
    assert set(out.terms) == {"ce(student)", "at(teacher.layer2 -> student.layer2)", "at(teacher.layer3 -> student.layer3)"}
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters()) and student.layer2.conv.weight.grad is not None
    with pytest.raises(RecipeError, match=r"no module 'layer5' in TinyResNet; nearest: layer\d"):
        kdflow.Distiller(kdflow.methods.at(teacher=teacher, student=student, stages=["layer5"]), example_inputs=x[:2])


def test_frozen_nodes_stay_frozen_whatever_is_called() -> None:
    teacher, student = TinyResNet(16), TinyResNet(4)
    distiller = kdflow.Distiller(kdflow.methods.kd(teacher=teacher, student=student))
    frozen = {id(p) for p in teacher.parameters()}
    assert not frozen & {id(p) for p in distiller.parameters()}
    assert distiller.parameters_of("teacher") == [] and not frozen & {id(p) for p in distiller.parameters_of("student")}
    distiller.train()
    distiller.to(torch.float64).to(torch.float32)
    assert not teacher.training and student.training and not any(p.requires_grad for p in teacher.parameters())
    before = copy.deepcopy(teacher.state_dict())
    opt = torch.optim.SGD(distiller.parameters(), lr=0.5, weight_decay=0.1)
    for _ in range(2):
        out = distiller(*batch())
        opt.zero_grad()
        out.total.backward()
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # batch-norm statistics too
    assert distiller.student is student


def test_state_dict_round_trip_restores_helpers() -> None:
    def make() -> kdflow.Distiller:
        torch.manual_seed(0)
        t, s = TinyResNet(16), TinyResNet(4)
        return kdflow.Distiller(kdflow.methods.fitnet(teacher=t, student=s, teacher_tap="layer3", student_tap="layer3"),
                                example_inputs=batch(2)[0])

    a = make()
    opt = torch.optim.SGD(a.parameters_of("student"), lr=0.1)
    out = a(*batch())
    opt.zero_grad()
    out.total.backward()
    opt.step()
    regressor = {k: v.clone() for k, v in a.state_dict().items() if k.startswith("flow.connectors.")}
    assert regressor
    b = make()
    assert not all(torch.equal(b.state_dict()[k], v) for k, v in regressor.items())
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(b.state_dict()[k], v) for k, v in regressor.items())
    assert b(*batch()).total.item() == pytest.approx(a(*batch()).total.item(), rel=1e-6)


def test_helpers_need_example_inputs() -> None:
    flow = kdflow.methods.fitnet(teacher=TinyResNet(16), student=TinyResNet(4), teacher_tap="layer3", student_tap="layer3")
    with pytest.raises(RecipeError, match="pass example_inputs"):
        kdflow.Distiller(flow)


@pytest.mark.parametrize("example", ["plain_kd_mnist1d.py", "feature_fitnet.py", "slkd_loop.py"])
def test_examples_run(example: str) -> None:
    env = {**os.environ, "KDFLOW_EXAMPLE_QUICK": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / example)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()


def test_channels_last_switch_gives_the_same_loss_and_gradients_in_nhwc() -> None:
    """Distiller(channels_last=True): the nodes' and helpers' 4-D weights and the inputs in NHWC, the same
    total loss and gradients as NCHW (within float rounding), the parameters the user's optimizer holds kept."""
    def make(channels_last: bool) -> tuple[kdflow.Distiller, TinyResNet]:
        torch.manual_seed(0)
        t, s = TinyResNet(16), TinyResNet(4)
        graph = kdflow.methods.fitnet(teacher=t, student=s, teacher_tap="layer3", student_tap="layer3")
        return kdflow.Distiller(graph, example_inputs=batch(2)[0], channels_last=channels_last), s

    (nchw, s1), (nhwc, s2) = make(False), make(True)
    held = list(s2.parameters())
    assert all(p is q for p, q in zip(held, nhwc.parameters_of("student")))
    assert s2.layer2.conv.weight.is_contiguous(memory_format=torch.channels_last)
    conv = [m for m in nhwc.flow.connectors.modules() if isinstance(m, nn.Conv2d)]  # FitNet's regressor
    assert conv and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in conv)
    assert not s1.layer2.conv.weight.is_contiguous(memory_format=torch.channels_last)
    a, b = nchw(*batch()), nhwc(*batch())
    assert b.total.item() == pytest.approx(a.total.item(), rel=1e-5)
    a.total.backward()
    b.total.backward()
    for (name, p), q in zip(s1.named_parameters(), s2.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
