"""DOT, the Distillation-Oriented Trainer (Zhao, Cui, Song, Liang 2023, ICCV; src/kdflow/engine/dot.py): the optimizer
against a hand-written numpy two-momentum SGD, Δ = 0 against torch's SGD on the summed loss, the engine's DOT
branch, the recipe recipes/methods/dot.yaml on the CIFAR-100 protocol and pair, and the combinations it refuses.
Parity with the authors' optimizer: tests/test_parity_dot.py."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from formats import make_cifar100
from kdflow.checkpoint import load_safe, read_model_file
from kdflow.engine import EpochEnd, train
from kdflow.engine.dot import DOT, backward_and_step, check_recipe, split_loss, supervised_labels
from kdflow.engine.nonfinite import NonFiniteError
from kdflow.engine.rundir import read_jsonl
from kdflow.flow.errors import RecipeError
from kdflow.flow.graph import Flow
from kdflow.methods.recipe import load_recipe, resolve
from kdflow.models import build_model

ROOT = Path(__file__).resolve().parents[1] / "recipes"
CIFAR = [ROOT / "cifar100/protocol.yaml", ROOT / "cifar100/pairs/resnet32x4-resnet8x4.yaml", ROOT / "methods/dot.yaml"]
QUIET = {"progress": False, "log": lambda s: None}


# ---------------------------------------------------------------- the optimizer against numpy

def numpy_dot(init: dict, steps: list[tuple[dict, dict, float]], momentum: float, delta: float, wd: float) -> dict:
    """Two-momentum SGD written from the paper and engine/dot.py's docstring: per step (task grads, distillation
    grads, lr); a parameter with both gradients: b_t = (μ−Δ) b_t + g_t + λw, b_d = (μ+Δ) b_d + g_d; with one of them
    its buffer at momentum μ (decay on whichever gradient it has); buffers start at their first gradient;
    w -= lr (b_t + b_d)."""
    w = {k: np.array(v, dtype=np.float64) for k, v in init.items()}
    bt: dict = {}
    bd: dict = {}
    for task, dist, lr in steps:
        new = {}
        for k in w:
            gt, gd = task.get(k), dist.get(k)
            if gt is None and gd is None:
                continue
            both = gt is not None and gd is not None
            step = np.zeros_like(w[k])
            if gt is not None:
                g = gt + wd * w[k]
                m = momentum - delta if both else momentum
                bt[k] = g.copy() if k not in bt else m * bt[k] + g
                step += bt[k]
            if gd is not None:
                g = gd + (wd * w[k] if gt is None else 0.0)
                m = momentum + delta if both else momentum
                bd[k] = g.copy() if k not in bd else m * bd[k] + g
                step += bd[k]
            new[k] = w[k] - lr * step
        w.update(new)
    return w


def run_dot(init: dict, steps: list[tuple[dict, dict, float]], momentum: float, delta: float, wd: float) -> dict:
    params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in init.items()}
    opt = DOT(list(params.values()), lr=1.0, momentum=momentum, delta=delta, weight_decay=wd)
    for task, dist, lr in steps:
        opt.param_groups[0]["lr"] = lr  # the engine sets the scheduled lr on every step
        opt.zero_grad(set_to_none=True)
        for k, g in dist.items():
            params[k].grad = torch.tensor(g)
        opt.hold_distill_grads()
        assert all(p.grad is None for p in params.values())
        for k, g in task.items():
            params[k].grad = torch.tensor(g)
        opt.step()
    return {k: p.detach().numpy() for k, p in params.items()}


def random_plan(seed: int = 0) -> tuple[dict, list]:
    rng = np.random.default_rng(seed)
    shapes = {"both": (3, 4), "task_only": (5,), "distill_only": (2, 2), "switching": (3,)}
    init = {k: rng.normal(size=s) for k, s in shapes.items()}
    which = [  # which parameters get which gradient, per step
        ({"both", "task_only", "switching"}, {"both", "distill_only"}),
        ({"both", "task_only"}, {"both", "distill_only", "switching"}),
        ({"both", "task_only", "switching"}, {"both", "distill_only", "switching"}),
        ({"both", "task_only", "switching"}, {"both", "distill_only", "switching"}),
    ]
    steps = []
    for i, (t, d) in enumerate(which):
        steps.append(({k: rng.normal(size=shapes[k]) for k in sorted(t)}, {k: rng.normal(size=shapes[k]) for k in sorted(d)},
                      0.1 / (i + 1)))
    return init, steps


@pytest.mark.parametrize("wd", [0.0, 5e-4])
def test_step_equals_numpy_two_momentum_sgd(wd: float) -> None:
    init, steps = random_plan()
    want = numpy_dot(init, steps, 0.9, 0.075, wd)
    got = run_dot(init, steps, 0.9, 0.075, wd)
    for k in init:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-13, atol=1e-15, err_msg=k)
    # and the two momenta are not interchangeable: the numpy step with them swapped differs
    swapped = numpy_dot(init, steps, 0.9, -0.075, wd)
    assert not np.allclose(got["both"], swapped["both"], rtol=1e-9)


def test_first_step_is_one_sgd_step_on_the_summed_gradient() -> None:
    init, steps = random_plan(1)
    got = run_dot(init, steps[:1], 0.9, 0.075, 1e-3)
    task, dist, lr = steps[0]
    for k in ("both", "task_only", "distill_only"):
        g = task.get(k, 0) + dist.get(k, 0) + 1e-3 * init[k]
        np.testing.assert_allclose(got[k], init[k] - lr * g, rtol=1e-14)


class Tiny(nn.Module):
    """A model with a part only the supervised loss reaches (head) and one only the distillation loss does (adapter)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.adapter = nn.Linear(8, 4)

    def losses(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return F.cross_entropy(self.head(h), y), 2.0 * F.mse_loss(self.adapter(h), target)


def test_delta_zero_is_sgd_with_momentum_on_the_summed_loss() -> None:
    """With Δ = 0 both buffers have momentum μ. The recursion b ← μ·b + g is linear in g and both buffers start at
    their first gradients, so b_task + b_distill is at every step the buffer of g_task + g_distill + λw, which is
    torch.optim.SGD's buffer on the summed loss; a parameter one loss reaches has one buffer at μ, also SGD's. So
    the weights agree up to float rounding. With Δ > 0 they agree after the first step only."""
    torch.manual_seed(0)
    a = Tiny().double()
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    dot0 = DOT(a.parameters(), lr=0.1, momentum=0.9, delta=0.0, weight_decay=5e-4)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    dot = DOT(c.parameters(), lr=0.1, momentum=0.9, delta=0.075, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        x, t = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=g)
        for model, opt in ((a, dot0), (c, dot)):
            task, distill = model.losses(x, y, t)
            opt.zero_grad(set_to_none=True)
            distill.backward(retain_graph=True)
            opt.hold_distill_grads()
            task.backward()
            opt.step()
        sgd.zero_grad(set_to_none=True)
        sum(b.losses(x, y, t)).backward()
        sgd.step()
        diff0 = max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))
        diff = max(float((p - q).detach().abs().max()) for p, q in zip(c.parameters(), b.parameters()))
        assert diff0 < 1e-13, (step, diff0)
        assert (diff < 1e-13) == (step == 0), (step, diff)


def test_state_dict_resumes_the_same_steps() -> None:
    init, steps = random_plan(2)

    def make() -> tuple[dict, DOT]:
        params = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
        return params, DOT(list(params.values()), lr=0.1, momentum=0.9, delta=0.075, weight_decay=5e-4)

    def take(params: dict, opt: DOT, step: tuple) -> None:
        task, dist, _ = step
        opt.zero_grad(set_to_none=True)
        for k, g in dist.items():
            params[k].grad = torch.tensor(g)
        opt.hold_distill_grads()
        for k, g in task.items():
            params[k].grad = torch.tensor(g)
        opt.step()

    p1, o1 = make()
    for s in steps:
        take(p1, o1, s)
    p2, o2 = make()
    for s in steps[:2]:
        take(p2, o2, s)
    saved = copy.deepcopy(o2.state_dict())
    assert {"task_buffer", "distill_buffer"} <= set().union(*(v.keys() for v in saved["state"].values()))
    with torch.no_grad():
        p3 = {k: v.detach().clone().requires_grad_(True) for k, v in p2.items()}
    o3 = DOT(list(p3.values()), lr=0.1, momentum=0.9, delta=0.075, weight_decay=5e-4)
    o3.load_state_dict(saved)
    for s in steps[2:]:
        take(p3, o3, s)
    for k in init:
        assert torch.equal(p1[k], p3[k]), k


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -0.1}, "lr: -0.1 must be ≥ 0"),
    ({"lr": 0.1, "delta": 0.95}, "delta: 0.95 must lie in [0, momentum = 0.9]"),
    ({"lr": 0.1, "delta": -0.1}, "delta: -0.1 must lie in"),
    ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay: -1.0 must be ≥ 0"),
])
def test_optimizer_refuses_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as e:
        DOT([torch.zeros(2, requires_grad=True)], **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- the flow's loss, split

def test_split_loss_and_the_two_backward_passes(kd_raw: dict) -> None:
    """The supervised part is γ·CE, the distillation part α·KD, and they add up to the flow's total; `ok()` sees the
    distillation gradient first (what autograd gives for it alone), then the supervised one."""
    raw = copy.deepcopy(kd_raw)
    raw["train"]["optim"] = {"name": "dot", "lr": 0.05}
    recipe = resolve(raw)
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    flow = Flow(recipe, 4, (1, 8, 8), x[:2])
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    out = flow(x, y, stage, 0)
    labels = supervised_labels(recipe, stage)
    assert labels == {"ce(student)"}
    task, distill = split_loss(out, labels)
    (kd_label,) = [k for k in out.terms if k != "ce(student)"]
    assert torch.allclose(task, 0.1 * out.terms["ce(student)"]) and torch.allclose(distill, 0.9 * out.terms[kd_label])
    assert torch.allclose(task + distill, out.total)
    params = list(flow.models["student"].parameters())
    want_d = torch.autograd.grad(distill, params, retain_graph=True)
    want_t = torch.autograd.grad(task, params, retain_graph=True)
    seen: list[list[torch.Tensor]] = []

    def ok() -> bool:
        seen.append([p.grad.clone() for p in params])
        return True

    before = [p.detach().clone() for p in params]
    opt = DOT(params, lr=0.05, momentum=0.9, delta=0.075)
    assert backward_and_step(out, labels, {"student": opt}, ok)
    assert len(seen) == 2
    assert all(torch.allclose(a, b) for a, b in zip(seen[0], want_d))
    assert all(torch.allclose(a, b) for a, b in zip(seen[1], want_t))
    assert all(torch.allclose(p, b - 0.05 * (gt + gd)) for p, b, gt, gd in zip(params, before, want_t, want_d))


@pytest.mark.parametrize("refuse_at", [1, 2])
def test_a_refused_check_takes_no_step(kd_raw: dict, refuse_at: int) -> None:
    recipe = resolve(kd_raw)
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    flow = Flow(recipe, 4, (1, 8, 8), x[:2])
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    params = list(flow.models["student"].parameters())
    before = [p.detach().clone() for p in params]
    opt = DOT(params, lr=0.05, momentum=0.9, delta=0.075)
    calls = []
    stepped = backward_and_step(flow(x, y, stage, 0), supervised_labels(recipe, stage), {"student": opt},
                                lambda: calls.append(1) or len(calls) < refuse_at)
    assert not stepped and len(calls) == refuse_at
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state and not opt._distill


# ---------------------------------------------------------------- the engine

def dot_raw(kd_raw: dict, delta: float | None = 0.075) -> dict:
    raw = copy.deepcopy(kd_raw)
    raw["train"]["optim"] = {"lr": 0.05, "name": "dot", **({"delta": delta} if delta is not None else {})}
    return raw


def student_weights(out: Path) -> dict:
    return read_model_file(out / "nodes" / "student.pt")["state_dict"]


def test_engine_with_delta_zero_trains_as_sgd(kd_raw: dict, tmp_path: Path) -> None:
    """The engine's DOT branch (split, two backward passes, the step) with Δ = 0 ends where SGD on the summed loss
    does (float32 rounding); with Δ = 0.075 it does not. DOT's optimizer state holds the two buffers."""
    train(resolve(kd_raw), tmp_path / "sgd", **QUIET)
    train(resolve(dot_raw(kd_raw, 0.0)), tmp_path / "dot0", **QUIET)
    train(resolve(dot_raw(kd_raw)), tmp_path / "dot", **QUIET)
    sgd, dot0, dot = (student_weights(tmp_path / n) for n in ("sgd", "dot0", "dot"))
    assert max(float((sgd[k] - dot0[k]).abs().max()) for k in sgd) < 1e-5
    assert max(float((sgd[k] - dot[k]).abs().max()) for k in sgd) > 1e-3
    rows = read_jsonl(tmp_path / "dot" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and all(np.isfinite(r["train_loss"]) for r in rows)
    state = load_safe(tmp_path / "dot" / "last.pt")["optimizers"]["student"]
    assert state["param_groups"][0]["delta"] == 0.075
    assert all({"task_buffer", "distill_buffer"} <= set(s) for s in state["state"].values())
    written = {n: yaml.safe_load((tmp_path / n / "recipe.yaml").read_text())["train"]["optim"] for n in ("sgd", "dot")}
    assert (written["dot"]["name"], written["dot"]["delta"]) == ("dot", 0.075)
    assert set(written["sgd"]) == {"lr", "momentum", "weight_decay", "nesterov"}  # an SGD recipe is written as before


class Stop(Exception):
    pass


def stop_after_epoch_1(info: EpochEnd) -> None:
    if info.epoch == 1:
        raise Stop


def test_engine_resume_gives_the_uninterrupted_run(kd_raw: dict, tmp_path: Path) -> None:
    """Both momentum buffers are in last.pt: a run stopped after epoch 1 and resumed ends with the same weights."""
    recipe = resolve(dot_raw(kd_raw))
    train(recipe, tmp_path / "whole", **QUIET)
    with pytest.raises(Stop):
        train(recipe, tmp_path / "cut", callbacks=[stop_after_epoch_1], **QUIET)
    train(recipe, tmp_path / "cut", resume=True, **QUIET)
    a, b = student_weights(tmp_path / "whole"), student_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_engine_stops_on_a_non_finite_distillation_loss(kd_raw: dict, tmp_path: Path) -> None:
    raw = dot_raw(kd_raw)
    raw["method"] = {"name": "kd", "kd_weight": float("inf")}
    with pytest.raises(NonFiniteError, match="non-finite values in stage 'main', epoch 1, step 1"):
        train(resolve(raw), tmp_path / "run", **QUIET)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compiled_nodes_take_the_eager_dot_steps(kd_raw: dict, tmp_path: Path) -> None:
    """train.compile: the two backward passes (the first keeping the graph) run through compiled nodes too."""
    raw = dot_raw(kd_raw)
    raw["nodes"]["student"] = {"arch": "convnet_s"}
    raw["train"]["epochs"] = 1
    train(resolve(raw), tmp_path / "eager", **QUIET)
    raw["train"]["compile"] = True
    train(resolve(raw), tmp_path / "compiled", **QUIET)
    a, b = student_weights(tmp_path / "eager"), student_weights(tmp_path / "compiled")
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-3


# ---------------------------------------------------------------- the recipe on the CIFAR-100 protocol and pair

def test_recipe_resolves_with_the_authors_cifar100_settings() -> None:
    r = load_recipe(CIFAR)
    o = r.train.optim
    assert (o.name, o.delta, o.momentum, o.lr, o.weight_decay, o.nesterov) == ("dot", 0.075, 0.9, 0.05, 5e-4, False)
    assert (r.train.epochs, r.train.batch_size, r.train.schedule.milestones, r.train.schedule.gamma) == (240, 64, [150, 180, 210], 0.1)
    assert r.nodes["teacher"].arch == "resnet32x4" and r.nodes["student"].arch == "resnet8x4"
    assert r.supervise["student"].weight == 0.1
    (t,) = r.transfers
    assert (t.criterion, t.weight, t.params) == ("kd", 0.9, {"temperature": 4.0})
    shuffle = load_recipe([CIFAR[0], ROOT / "cifar100/pairs/resnet32x4-ShuffleV2.yaml", CIFAR[2]])
    assert (shuffle.train.optim.name, shuffle.train.optim.lr) == ("dot", 0.01)  # the authors' res32x4_shuv2.yaml: LR 0.01


@pytest.mark.slow
def test_recipe_trains_one_step_on_the_cifar100_pair(tmp_path: Path) -> None:
    make_cifar100(tmp_path, n_train=16, n_test=8)
    torch.manual_seed(0)
    teacher = tmp_path / "ckpt_epoch_240.pth"  # RepDistiller's layout
    torch.save({"epoch": 240, "model": build_model("resnet32x4", 100, (3, 32, 32)).state_dict()}, teacher)
    recipe = load_recipe(CIFAR, [f"data.root={tmp_path}", f"nodes.teacher.checkpoint={teacher}", "train.epochs=1",
                                 "train.batch_size=16"])
    train(recipe, tmp_path / "run", **QUIET)
    (row,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert np.isfinite(row["train_loss"]) and set(row["terms"]) == {"ce(student)", "kd(teacher.logits -> student.logits)"}
    state = load_safe(tmp_path / "run" / "last.pt")["optimizers"]["student"]["state"]
    assert len(state) == len(list(build_model("resnet8x4", 100, (3, 32, 32)).parameters()))
    assert all({"task_buffer", "distill_buffer"} <= set(s) for s in state.values())
    assert any(not torch.equal(s["task_buffer"], s["distill_buffer"]) for s in state.values())


# ---------------------------------------------------------------- what DOT refuses, in one line

def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("sets, message", [
    (["train.optim.delta=0.1"], "train.optim: delta: a setting of DOT (its momentum gap); add name: dot"),
    (["train.optim.name=dot", "train.optim.nesterov=true"], "train.optim: nesterov: DOT's two momenta are plain"),
    (["train.optim.name=dot", "train.optim.delta=0.95"], "train.optim: delta: 0.95 exceeds momentum 0.9"),
    (["train.optim.name=adam"], "train.optim.name"),
])
def test_recipe_errors(sets: list[str], message: str) -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe(CIFAR[:2] + [ROOT / "methods/kd.yaml"], sets)
    assert message in one_line(e)


def test_a_node_without_a_distillation_term(kd_raw: dict, tmp_path: Path) -> None:
    raw = dot_raw(kd_raw)
    raw["method"] = "ce"
    with pytest.raises(RecipeError) as e:
        train(resolve(raw), tmp_path / "run", **QUIET)
    assert one_line(e).startswith("train.optim.name: dot steps from a distillation gradient, but node student has no "
                                  "transfer into it in any stage it trains in")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [
    ({"train": {"precision": "fp16"}}, "train.precision: fp16's GradScaler scales and checks one backward pass"),
    ({"nodes": {"student": {"optim": {"nesterov": True}}}}, "nodes.student.optim.nesterov: DOT's two momenta"),
    ({"nodes": {"student": {"optim": {"momentum": 0.05}}}}, "nodes.student.optim.momentum: 0.05 is below train.optim.delta 0.075"),
])
def test_unsupported_combinations(kd_raw: dict, tmp_path: Path, change: dict, message: str) -> None:
    from kdflow.flow.recipe import merge

    raw = merge(dot_raw(kd_raw), change)
    with pytest.raises(RecipeError) as e:
        train(resolve(raw), tmp_path / "run", **QUIET)
    assert one_line(e).startswith(message)


def test_torchrun_and_alternating_updates_are_refused(kd_raw: dict) -> None:
    with pytest.raises(RecipeError) as e:
        check_recipe(resolve(dot_raw(kd_raw)), distributed=True)
    assert one_line(e).startswith("train.optim.name: dot is not supported under torchrun yet")
    raw = dot_raw(kd_raw)
    raw["nodes"]["peer"] = {"same_as": "student"}
    raw["method"] = {"name": "dml", "peers": ["student", "peer"], "alternating": True}
    raw["nodes"].pop("teacher")
    with pytest.raises(RecipeError) as e:
        check_recipe(resolve(raw))
    assert one_line(e).startswith("stages.0.updates: alternating (one node's step after another's) is not supported")
    raw["method"]["alternating"] = False
    check_recipe(resolve(raw))  # joint DML: each peer has CE and a transfer


def test_a_stage_with_one_kind_of_term_is_noted(kd_raw: dict) -> None:
    """FitNet with a hint stage: the hint stage has no supervised term, the main stage no transfer: DOT steps are
    plain momentum SGD there, which the engine says."""
    raw = dot_raw(kd_raw)
    raw["nodes"]["student"] = {"arch": "convnet_s"}
    raw["method"] = {"name": "fitnet", "hint_epochs": 1, "teacher_tap": "stage1", "student_tap": "stage1"}
    lines: list[str] = []
    check_recipe(resolve(raw), log=lines.append)
    assert lines == [
        "train.optim dot: node student has no supervised term in stage 'hint'; its steps there are SGD with momentum 0.9",
        "train.optim dot: node student has no transfer term in stage 'main'; its steps there are SGD with momentum 0.9",
    ]
    lines.clear()
    check_recipe(resolve(kd_raw), log=lines.append)  # SGD recipes: nothing checked, nothing said
    assert lines == []

