"""Logit methods (DKD, DIST, Tf-KD, Annealing-KD, label smoothing, BSS): each method's graph
resolves on tiny nodes, the flow's total equals the paper's formula computed in numpy from the
two models' logits, gradients reach the student only, and a one-epoch run finishes."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SYNTH, make_teacher
from kdflow.engine import train
from kdflow.methods.recipe import resolve
from kdflow.losses.stateful.adversarial import BSSLoss, attack_and_teacher_logits, bss_attack, bss_weights, draw_target_classes, select_base_samples
from kdflow.flow.graph import Flow
from kdflow.methods import METHODS, method_graph

LOGIT_METHODS = ["kd", "dkd", "dist", "tfkd_self", "tfkd_reg", "annealing_kd", "label_smoothing", "bss"]
QUIET = {"progress": False, "log": lambda s: None}


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def raw_recipe(tmp_path: Path, method: str, epochs: int = 1, **args) -> dict:
    """A convnet_s teacher (an MLP of the student's shape for tfkd_self) and an MLP student on SYNTH."""
    if method == "tfkd_self":  # the teacher takes the student's architecture (same_as)
        teacher = {"checkpoint": str(make_teacher(tmp_path / "self.pt", arch="mlp", hidden=[16]))}
    else:
        teacher = {"arch": "convnet_s", "checkpoint": str(make_teacher(tmp_path / "teacher.pt"))}
    return {
        "name": f"tiny-{method}",
        "seed": 3,
        "data": copy.deepcopy(SYNTH),
        "nodes": {"teacher": teacher, "student": {"arch": "mlp", "args": {"hidden": [16]}}},
        "method": {"name": method, **args},
        "train": {"epochs": epochs, "batch_size": 32, "optim": {"lr": 0.05}},
    }


def build(raw: dict) -> Flow:
    recipe = resolve(raw)
    torch.manual_seed(0)
    return Flow(recipe, 4, (1, 8, 8), torch.randn(2, 1, 8, 8), num_data=96)


def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def logits(flow: Flow, node: str, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return flow.models[node](x).double().numpy()


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def ce(zs: np.ndarray, y: np.ndarray) -> float:
    return float(-log_softmax(zs)[np.arange(len(y)), y].mean())


def kl(zt: np.ndarray, zs: np.ndarray, tau: float) -> float:
    """τ²·KL(p_t ‖ p_s), summed over classes, mean over the batch."""
    lt, ls = log_softmax(zt / tau), log_softmax(zs / tau)
    return float((np.exp(lt) * (lt - ls)).sum(axis=1).mean() * tau**2)


def kl_rows(pt: np.ndarray, ps: np.ndarray) -> np.ndarray:
    return (pt * (np.log(pt) - np.log(ps))).sum(axis=1)


def dkd_np(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, alpha: float, beta: float, tau: float) -> float:
    ps, pt = np.exp(log_softmax(zs / tau)), np.exp(log_softmax(zt / tau))
    rows = np.arange(len(y))
    bs = np.stack([ps[rows, y], 1 - ps[rows, y]], axis=1)
    bt = np.stack([pt[rows, y], 1 - pt[rows, y]], axis=1)
    keep = np.ones_like(zs, dtype=bool)
    keep[rows, y] = False
    C = zs.shape[1]
    qs = np.exp(log_softmax(zs[keep].reshape(-1, C - 1) / tau))  # softmax over the non-target classes
    qt = np.exp(log_softmax(zt[keep].reshape(-1, C - 1) / tau))
    return float((alpha * kl_rows(bt, bs).mean() + beta * kl_rows(qt, qs).mean()) * tau**2)


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def dist_np(zs: np.ndarray, zt: np.ndarray, beta: float, gamma: float, tau: float) -> float:
    ps, pt = np.exp(log_softmax(zs / tau)), np.exp(log_softmax(zt / tau))
    inter = 1 - pearson_rows(ps, pt).mean()
    intra = 1 - pearson_rows(ps.T, pt.T).mean()
    return float(tau**2 * (beta * inter + gamma * intra))


def tfkd_reg_np(zs: np.ndarray, y: np.ndarray, a: float, tau: float) -> float:
    C = zs.shape[1]
    pd = np.full_like(zs, (1 - a) / (C - 1))
    pd[np.arange(len(y)), y] = a
    return kl(np.log(pd), zs, tau)  # softmax(log p^d / τ) is the virtual teacher at τ


def label_smoothing_np(zs: np.ndarray, y: np.ndarray, eps: float) -> float:
    lp = log_softmax(zs)
    return float(((1 - eps) * -lp[np.arange(len(y)), y] - eps * lp.mean(axis=1)).mean())


def stage(flow: Flow, name: str | None = None):
    s = flow.stages[0] if name is None else next(s for s in flow.stages if s.name == name)
    flow.set_stage_modes(s)
    return s


# ---------------------------------------------------------------------------------------
# (1) every method's graph resolves, is registered as a logit method with a citation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", LOGIT_METHODS)
def test_method_graph_resolves_on_tiny_nodes(method: str, tmp_path: Path) -> None:
    m = METHODS[method]
    assert m.knowledge == "logits" and len(m.citation) > 30
    graph = method_graph(method)
    assert "student" in graph["nodes"]
    raw = raw_recipe(tmp_path, method)
    flow = build(raw)
    assert flow.recipe.nodes["student"].role == "trainable"
    for s in flow.stages:
        assert s.train == ["student"]  # the teacher never trains, even when the method does not mention it


def test_method_stages_are_used_unless_the_recipe_gives_its_own(tmp_path: Path) -> None:
    raw = raw_recipe(tmp_path, "annealing_kd", epochs=3)
    recipe = resolve(raw)
    assert [(s.name, s.train, s.epochs) for s in recipe.resolved_stages()] == [
        ("anneal", ["student"], 3),
        ("finetune", ["student"], 3),
    ]
    raw["stages"] = [{"name": "anneal", "epochs": 4}, {"name": "finetune", "epochs": 2}]
    assert [(s.name, s.epochs) for s in resolve(raw).resolved_stages()] == [("anneal", 4), ("finetune", 2)]
    raw.pop("stages")
    raw["method"] = {"name": "annealing_kd", "anneal_epochs": 5, "finetune_epochs": 1}
    assert [(s.name, s.epochs) for s in resolve(raw).resolved_stages()] == [("anneal", 5), ("finetune", 1)]


def test_recipe_files_compose_with_the_fashion_mnist_pair() -> None:
    from kdflow.methods.recipe import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    for method in LOGIT_METHODS:
        recipe = load_recipe([root / "fashion_mnist" / "pair.yaml", root / "methods" / f"{method}.yaml"])
        assert recipe.name == method
        assert all(s.train == ["student"] for s in recipe.resolved_stages())


# ---------------------------------------------------------------------------------------
# (2) + (3) the flow's total equals the formula; gradients reach the student only
# ---------------------------------------------------------------------------------------


def expected_total(method: str, zs: np.ndarray, zt: np.ndarray, y: np.ndarray, epoch: int) -> float:
    if method == "kd":
        return 0.1 * ce(zs, y) + 0.9 * kl(zt, zs, 4.0)
    if method == "dkd":
        return ce(zs, y) + min((epoch + 1) / 20, 1.0) * dkd_np(zs, zt, y, 1.0, 8.0, 4.0)
    if method == "dist":
        return ce(zs, y) + dist_np(zs, zt, 2.0, 2.0, 4.0)
    if method == "tfkd_self":
        return 0.05 * ce(zs, y) + 0.95 * 50 / 100 * kl(zt, zs, 6.0)
    if method == "tfkd_reg":
        return 0.9 * ce(zs, y) + 0.1 * tfkd_reg_np(zs, y, 0.99, 20.0)
    if method == "label_smoothing":
        return label_smoothing_np(zs, y, 0.1)
    raise AssertionError(method)


SINGLE_STAGE = [("kd", 0), ("dkd", 0), ("dkd", 19), ("dkd", 25), ("dist", 0), ("tfkd_self", 0), ("tfkd_reg", 0), ("label_smoothing", 0)]


@pytest.mark.parametrize("method,epoch", SINGLE_STAGE)
def test_total_matches_formula_and_only_the_student_gets_gradients(method: str, epoch: int, tmp_path: Path) -> None:
    flow = build(raw_recipe(tmp_path, method, epochs=30))
    s = stage(flow)
    x, y = batch()
    out = flow(x, y, s, epoch)
    out.total.backward()
    zs, zt = logits(flow, "student", x), logits(flow, "teacher", x)
    assert out.total.item() == pytest.approx(expected_total(method, zs, zt, y.numpy(), epoch), rel=1e-5)
    student_grads = [p.grad for p in flow.parameters_of("student")]
    assert all(g is not None for g in student_grads) and sum(float(g.abs().sum()) for g in student_grads) > 0
    assert all(p.grad is None for p in flow.models["teacher"].parameters())
    assert not flow.models["teacher"].training


def test_dkd_warmup_ramps_over_20_epochs(tmp_path: Path) -> None:
    flow = build(raw_recipe(tmp_path, "dkd", epochs=30))
    s = stage(flow)
    x, y = batch()
    label = next(iter(k for k in flow(x, y, s, 0).weights if k.startswith("dkd")))
    assert [flow(x, y, s, e).weights[label] for e in (0, 9, 18, 19, 25)] == pytest.approx([0.05, 0.5, 0.95, 1.0, 1.0])


@pytest.mark.parametrize("epoch,k", [(0, 1), (4, 5), (9, 10)])
def test_annealing_anneal_stage_is_mse_to_scaled_teacher_logits(epoch: int, k: int, tmp_path: Path) -> None:
    flow = build(raw_recipe(tmp_path, "annealing_kd", anneal_epochs=10, finetune_epochs=2))
    s = stage(flow, "anneal")
    x, y = batch()
    out = flow(x, y, s, epoch)
    out.total.backward()
    zs, zt = logits(flow, "student", x), logits(flow, "teacher", x)
    assert out.total.item() == pytest.approx(float(((zs - k / 10 * zt) ** 2).mean()), rel=1e-5)  # no CE here
    assert all(p.grad is not None for p in flow.parameters_of("student"))
    assert all(p.grad is None for p in flow.models["teacher"].parameters())


def test_annealing_finetune_stage_is_cross_entropy_only(tmp_path: Path) -> None:
    flow = build(raw_recipe(tmp_path, "annealing_kd", anneal_epochs=10, finetune_epochs=2))
    s = stage(flow, "finetune")
    assert not flow.recipe.is_used("teacher", s)  # the teacher is not even run
    x, y = batch()
    out = flow(x, y, s, 1)
    out.total.backward()
    assert out.total.item() == pytest.approx(ce(logits(flow, "student", x), y.numpy()), rel=1e-6)
    assert all(p.grad is not None for p in flow.parameters_of("student"))


# ---------------------------------------------------------------------------------------
# BSS
# ---------------------------------------------------------------------------------------


def bss_setup(tmp_path: Path, epochs: int = 4, **args) -> tuple[Flow, torch.Tensor, torch.Tensor]:
    """A BSS flow and a batch whose first 10 labels are the teacher's predictions (so there is something to attack)."""
    flow = build(raw_recipe(tmp_path, "bss", epochs=epochs, **args))
    x, y = batch(16)
    with torch.no_grad():
        flow.models["teacher"].eval()
        pred = flow.models["teacher"](x).argmax(dim=1)
    y = torch.where(torch.arange(16) < 10, pred, (pred + 1) % 4)  # 10 correct, 6 wrong
    return flow, x, y


def bss_module(flow: Flow) -> BSSLoss:
    (module,) = flow.criterion_modules.values()
    assert isinstance(module, BSSLoss)
    return module


def test_bss_weights_follow_the_two_schedules() -> None:
    # e = epoch + 1 (1-based), E = 8: clean 3·(1 − e/E) + 1, adversarial max(2·(1 − 4e/(3E)), 0)
    got = [bss_weights(epoch, 8) for epoch in range(8)]
    want = [(3 * (1 - e / 8) + 1, max(2 * (1 - 4 * e / 24), 0.0)) for e in range(1, 9)]
    assert [w for pair in got for w in pair] == pytest.approx([w for pair in want for w in pair])
    assert got[0] == pytest.approx((3.625, 2 * (1 - 1 / 6)))
    assert got[-1] == (1.0, 0.0) and got[5][1] == 0.0 and got[4][1] > 0  # no attack from e = 3E/4 on


@pytest.mark.parametrize("epoch", [0, 3])
def test_bss_total_matches_formula(epoch: int, tmp_path: Path) -> None:
    flow, x, y = bss_setup(tmp_path, epochs=4)
    s = stage(flow)
    torch.manual_seed(7)
    out = flow(x, y, s, epoch)
    out.total.backward()
    zs, zt = logits(flow, "student", x), logits(flow, "teacher", x)
    w_clean, w_adv = bss_weights(epoch, 4)
    # transfer weight 1/τ²: the published scale (soft cross-entropy without τ²)
    expected = ce(zs, y.numpy()) + w_clean * kl(zt, zs, 3.0) / 9
    module = bss_module(flow)
    if epoch == 3:
        assert w_adv == 0 and module.last is None  # no attack late in the stage
    else:
        rec = module.last
        assert rec is not None and set(rec.indices.tolist()) <= set(range(10))  # teacher-correct samples only
        assert torch.equal(rec.base, y[rec.indices])
        zs_adv, zt_adv = logits(flow, "student", rec.adversarial), logits(flow, "teacher", rec.adversarial)
        expected += w_adv * kl(zt_adv, zs_adv, 3.0) / 9
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert all(p.grad is not None for p in flow.parameters_of("student"))
    assert all(p.grad is None for p in flow.models["teacher"].parameters())


def test_bss_selects_at_most_attack_size_by_disagreement() -> None:
    g = torch.Generator().manual_seed(0)
    zt, zs = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    y = zt.argmax(dim=1)
    y[:4] = (y[:4] + 1) % 5  # the teacher is wrong on the first four
    idx = select_base_samples(zt, zs, y, 3)
    assert len(idx) == 3 and not set(idx.tolist()) & {0, 1, 2, 3}
    diff = (zt.softmax(1) - zs.softmax(1)) ** 2
    score = diff.sum(1) - diff[torch.arange(12), y]
    ranked = sorted(range(4, 12), key=lambda i: -float(score[i]))
    assert sorted(idx.tolist()) == sorted(ranked[:3])
    assert len(select_base_samples(zt, zs, y, 64)) == 8


def test_bss_target_class_is_never_the_top1_and_uses_the_global_rng() -> None:
    z = torch.randn(200, 6, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    a = draw_target_classes(z)
    torch.manual_seed(5)
    b = draw_target_classes(z)
    assert torch.equal(a, b)
    assert not (a == z.argmax(dim=1)).any()
    # proportional to the teacher's probabilities: a near-certain runner-up is drawn
    sharp = torch.tensor([[10.0, 9.0, -20.0, -20.0]]).repeat(50, 1)
    assert (draw_target_classes(sharp) == 1).all()


def test_bss_attack_moves_the_teacher_toward_the_drawn_class(tmp_path: Path) -> None:
    flow, x, y = bss_setup(tmp_path)
    teacher = flow.models["teacher"].eval()
    with torch.no_grad():
        z = teacher(x)
    idx = select_base_samples(z, z, y, 64)
    torch.manual_seed(0)
    k = draw_target_classes(z[idx])
    base = y[idx]
    adv = bss_attack(teacher, x[idx], base, k, steps=10, step_size=0.3)
    with torch.no_grad():
        z_adv = teacher(adv)

    def margin(zz: torch.Tensor) -> torch.Tensor:  # target-class logit minus base-class logit
        return zz.gather(1, k.unsqueeze(1)).squeeze(1) - zz.gather(1, base.unsqueeze(1)).squeeze(1)

    assert (margin(z_adv) > margin(z[idx])).all()
    # an L2 bound, when asked for, holds per sample
    bounded = bss_attack(teacher, x[idx], base, k, steps=10, step_size=0.3, max_norm=0.05)
    assert ((bounded - x[idx]).flatten(1).norm(dim=1) <= 0.05 + 1e-6).all()
    assert all(p.grad is None for p in teacher.parameters())


def test_bss_attack_step_is_the_margin_times_the_unit_gradient() -> None:
    """On a linear teacher f(x) = Wx + b the step is exact: x' = x − η·(L + 1e-4)·d/‖d‖, d = w_b − w_k."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3)).eval()
    x = torch.randn(5, 1, 2, 3)
    with torch.no_grad():
        z = teacher(x)
    base = z.argmax(dim=1)
    k = (base + 1) % 3
    W = teacher[1].weight.detach()
    d = W[base] - W[k]  # ∇L per sample
    L = (z.gather(1, base.unsqueeze(1)) - z.gather(1, k.unsqueeze(1))).squeeze(1)
    for eta in (0.05, 50.0):  # η‖d‖ < 1: the margin shrinks; η‖d‖ ≫ 1: one step crosses the boundary
        one = bss_attack(teacher, x, base, k, steps=1, step_size=eta)
        step = eta * (L + 1e-4)
        assert torch.allclose(one.flatten(1), x.flatten(1) - step.unsqueeze(1) * d / d.norm(dim=1, keepdim=True), atol=1e-5)
    crossed = teacher(one).argmax(dim=1) != base
    assert crossed.all()
    # a sample stops moving once the teacher no longer predicts its base class
    assert torch.allclose(bss_attack(teacher, x, base, k, steps=4, step_size=50.0), one)
    assert torch.equal(bss_attack(teacher, x, k, base, steps=4, step_size=50.0), x)  # "base" not predicted: untouched
    assert all(p.grad is None for p in teacher.parameters())


def test_bss_attack_runs_the_teacher_only_on_samples_still_moving(tmp_path: Path) -> None:
    """The attack with a shrinking batch (issue 14) equals the attack written out on the whole batch every
    step, and so do the teacher's logits on the result, while the teacher sees fewer samples."""
    flow, x, y = bss_setup(tmp_path)
    teacher = flow.models["teacher"].eval()
    with torch.no_grad():
        z = teacher(x)
    idx = select_base_samples(z, z, y, 64)
    torch.manual_seed(0)
    k, base, x0 = draw_target_classes(z[idx]), y[idx], x[idx]
    eta = 100.0  # this random teacher's margins are flat: samples cross at steps 2 to 10 (and one never)
    adv = x0.clone()
    for _ in range(10):  # the algorithm on the whole batch, every step
        a = adv.clone().requires_grad_(True)
        zz = teacher(a)
        margin = zz.gather(1, base.unsqueeze(1)).squeeze(1) - zz.gather(1, k.unsqueeze(1)).squeeze(1)
        (g,) = torch.autograd.grad(margin.sum(), a)
        moving = (zz.argmax(1) == base).float()
        adv = adv - (eta * (margin.detach() + 1e-4) / g.flatten(1).norm(dim=1) * moving).view(-1, 1, 1, 1) * g
    with torch.no_grad():
        want_logits = teacher(adv)
    seen: list[int] = []
    hook = teacher.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    got, logits = attack_and_teacher_logits(teacher, x0, base, k, steps=10, step_size=eta)
    hook.remove()
    assert torch.allclose(got, adv, atol=1e-5) and torch.allclose(logits, want_logits, atol=1e-4)
    # the batch shrinks as samples cross: 10, 10, 8, 4, ... rather than 10 every step and a final 10
    assert sum(seen) < 10 * len(idx) and seen == sorted(seen, reverse=True) and seen[-1] < len(idx), seen


def test_bss_teacher_stays_frozen_through_a_training_step(tmp_path: Path) -> None:
    flow, x, y = bss_setup(tmp_path)
    s = stage(flow)
    teacher = flow.models["teacher"]
    before = copy.deepcopy(teacher.state_dict())
    opt = torch.optim.SGD(flow.parameters_of("student"), lr=0.1)
    student_before = [p.detach().clone() for p in flow.parameters_of("student")]
    out = flow(x, y, s, 0)
    assert bss_module(flow).last is not None
    opt.zero_grad()
    out.total.backward()
    opt.step()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():  # weights and batch-norm statistics
        assert torch.equal(value, before[key]), key
    assert any(not torch.equal(a, b) for a, b in zip(student_before, flow.parameters_of("student")))
    assert not list(bss_module(flow).parameters())  # the models are not the helper's parameters


def test_bss_leaves_no_gradient_on_a_teacher_whose_parameters_require_grad(tmp_path: Path) -> None:
    flow, x, y = bss_setup(tmp_path)
    teacher, student = flow.models["teacher"], flow.models["student"]
    teacher.train()  # even a teacher left in train mode is attacked in eval mode and restored
    teacher.requires_grad_(True)
    before = copy.deepcopy(teacher.state_dict())
    with torch.no_grad():
        teacher.eval()
        zt = teacher(x)
        teacher.train()
    loss = bss_module(flow)(student(x), zt, x, y, 0, 4)
    loss.backward()
    assert teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is not None for p in student.parameters())


# ---------------------------------------------------------------------------------------
# (4) one epoch through the engine
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,args",
    [("dkd", {"warmup_epochs": 1}), ("dist", {}), ("tfkd_self", {}), ("tfkd_reg", {}), ("label_smoothing", {}),
     ("annealing_kd", {"anneal_epochs": 1, "finetune_epochs": 1}), ("bss", {"attack_size": 4, "attack_steps": 3})],
)
def test_one_epoch_run_finishes(method: str, args: dict, tmp_path: Path) -> None:
    raw = raw_recipe(tmp_path, method, epochs=1, **args)
    if method == "bss":
        raw["train"]["epochs"] = 2  # the attack runs in the first epoch (w_adv > 0 only before 3E/4)
    summary = train(resolve(raw), tmp_path / "run", **QUIET)
    assert "student" in json.dumps(summary)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in records]
    if method == "annealing_kd":
        assert stages == ["anneal", "finetune"]
        assert set(records[0]["terms"]) == {next(k for k in records[0]["terms"] if k.startswith("annealing_kd"))}
    assert all(r["node"] == "student" and np.isfinite(r["total_loss"]) for r in records)
