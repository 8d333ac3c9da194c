"""Multi-model schemes as recipes: SLKD, DML, TAKD, DGKD, Born-Again, ESKD, multi-teacher."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SYNTH, make_teacher
from kdflow.checkpoint import read_model_file, save_atomic
from kdflow.engine import EpochEnd, train
from kdflow.engine.rundir import read_jsonl
from kdflow.flow import RecipeError
from kdflow.methods.recipe import resolve
from kdflow.flow.graph import Flow

QUIET = {"progress": False, "log": lambda s: None}


def build(raw: dict) -> Flow:
    torch.manual_seed(0)
    return Flow(resolve(raw), 4, (1, 8, 8), torch.randn(2, 1, 8, 8), num_data=96)


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-log_softmax(z)[np.arange(len(y)), y].mean())


def kl(zt: np.ndarray, zs: np.ndarray, tau: float) -> float:
    lt, ls = log_softmax(zt / tau), log_softmax(zs / tau)
    return float((np.exp(lt) * (lt - ls)).sum(axis=1).mean() * tau**2)


def slkd_raw(tmp_path: Path, **args) -> dict:
    return {
        "data": SYNTH,
        "nodes": {"teacher": {"arch": "convnet_s", "checkpoint": str(make_teacher(tmp_path / "t.pt"))}, "student": {"arch": "mlp"}},
        "method": {"name": "slkd", **args},
    }


def test_slkd_losses_match_the_formula(tmp_path: Path) -> None:
    flow = build(slkd_raw(tmp_path, lambdas=[0.3, 0.7]))
    assert flow.recipe.nodes["slt1"].arch == "convnet_s" and flow.recipe.nodes["slt1"].checkpoint is None
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    x, y = batch()
    out = flow(x, y, stage, 0)
    with torch.no_grad():
        z = {n: flow.models[n](x).double().numpy() for n in ["teacher", "slt1", "slt2", "student"]}
    yn = y.numpy()
    a, b, g, c, d, tau = 0.1, 0.9, 1.0, 1.0, 1.0, 4.0
    zf = 0.3 * z["slt1"] + 0.7 * z["slt2"]
    slt = [a * ce(z[s], yn) + b * kl(z["teacher"], z[s], tau) for s in ["slt1", "slt2"]]
    student = a * ce(z["student"], yn) + b * kl(z["teacher"], z["student"], tau) + g * (c * ce(z["student"], yn) + d * kl(zf, z["student"], tau))
    assert out.total.item() == pytest.approx(sum(slt) + student, rel=1e-5)
    assert out.terms["kd(slt1.logits+slt2.logits -> student.logits)"].item() == pytest.approx(kl(zf, z["student"], tau), rel=1e-5)


@pytest.mark.parametrize("detach", [False, True])
def test_slkd_fused_term_gradient_routing(tmp_path: Path, detach: bool) -> None:
    # only the fused term is on: which parameters does it reach?
    flow = build(slkd_raw(tmp_path, a=0.0, b=0.0, c=0.0, detach=detach))
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    flow(*batch(), stage, 0).total.backward()
    reached = {n: any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.models[n].parameters()) for n in flow.models}
    assert reached == {"teacher": False, "student": True, "slt1": not detach, "slt2": not detach}


def test_slkd_variants_build(tmp_path: Path) -> None:
    seq = resolve(slkd_raw(tmp_path, sequential=True))
    assert [(s.name, s.train) for s in seq.resolved_stages()] == [("slts", ["slt1", "slt2"]), ("student", ["student"])]
    only = resolve(slkd_raw(tmp_path, teacher_to_student=False, num_slts=1))
    assert [t.sources for t in only.transfers if t.target_node == "student"] == [["slt1.logits"]]
    star = resolve(slkd_raw(tmp_path, base="dkd"))
    assert {t.criterion for t in star.transfers} == {"dkd"}


def test_dml_each_peer_learns_from_the_others_detached() -> None:
    raw = {"data": SYNTH, "nodes": {"peer1": {"arch": "mlp"}, "peer2": {"arch": "convnet_s"}, "peer3": {"arch": "mlp"}}, "method": {"name": "dml", "peers": ["peer1", "peer2", "peer3"]}}
    flow = build(raw)
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    x, y = batch()
    out = flow(x, y, stage, 0)
    term = out.terms["kd(peer2.logits -> peer1.logits)"]
    assert out.weights["kd(peer2.logits -> peer1.logits)"] == 0.5
    g1 = torch.autograd.grad(term, list(flow.models["peer1"].parameters()), retain_graph=True, allow_unused=True)
    g2 = torch.autograd.grad(term, list(flow.models["peer2"].parameters()), retain_graph=True, allow_unused=True)
    assert any(g is not None for g in g1) and all(g is None for g in g2)
    with torch.no_grad():
        z = {n: flow.models[n](x).double().numpy() for n in ["peer1", "peer2", "peer3"]}
    expected = sum(ce(z[k], y.numpy()) + 0.5 * sum(kl(z[j], z[k], 1.0) for j in z if j != k) for k in z)
    assert out.total.item() == pytest.approx(expected, rel=1e-5)


def test_dgkd_drops_exactly_the_requested_number(tmp_path: Path) -> None:
    raw = {
        "data": SYNTH,
        "nodes": {"teacher": {"arch": "convnet_s", "checkpoint": str(make_teacher(tmp_path / "t.pt"))},
                  "ta1": {"arch": "mlp"}, "ta2": {"arch": "mlp"}, "student": {"arch": "mlp"}},
        "method": {"name": "dgkd", "assistants": ["ta1", "ta2"], "drop": 2},
        "stages": [{"name": "all", "train": ["ta1", "ta2", "student"]}],
    }
    flow = build(raw)
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    x, y = batch()
    seen = set()
    for _ in range(20):
        out = flow(x, y, stage, 0)
        kept = [k for k in out.terms if k.startswith("kd(") and k.endswith("-> student.logits)")]
        assert len(out.dropped) == 2 and len(kept) == 1  # three guides, two dropped
        assert all(d.endswith("-> student.logits)") for d in out.dropped)  # the assistants' own terms never drop
        seen.add(kept[0])
    assert len(seen) == 3  # every guide is kept sometimes


def test_multi_teacher_confidence_fusion(tmp_path: Path) -> None:
    raw = {
        "data": SYNTH,
        "nodes": {"teacher1": {"arch": "convnet_s", "checkpoint": str(make_teacher(tmp_path / "a.pt", seed=1))},
                  "teacher2": {"arch": "convnet_s", "checkpoint": str(make_teacher(tmp_path / "b.pt", seed=2))},
                  "student": {"arch": "mlp"}},
        "method": {"name": "multi_teacher", "fusion": "confidence", "ce_weight": 0.0, "kd_weight": 1.0},
    }
    flow = build(raw)
    stage = flow.stages[0]
    flow.set_stage_modes(stage)
    x, y = batch()
    out = flow(x, y, stage, 0)
    with torch.no_grad():
        z = {n: flow.models[n](x).double().numpy() for n in flow.models}
    conf = np.stack([np.exp(log_softmax(z[t])).max(axis=1) for t in ["teacher1", "teacher2"]])
    w = conf / conf.sum(axis=0)
    zf = w[0][:, None] * z["teacher1"] + w[1][:, None] * z["teacher2"]
    assert out.total.item() == pytest.approx(kl(zf, z["student"], 4.0), rel=1e-5)


# ---- short runs on MNIST-1D: every scheme lowers every trainable node's training loss


def mnist1d(**extra) -> dict:
    return {"seed": 1, "data": {"name": "mnist1d", "limit": 1200, "test_limit": 400},
            "train": {"epochs": 3, "batch_size": 64, "optim": {"lr": 0.05}, "schedule": {"kind": "cosine"}}, **extra}


@pytest.fixture(scope="module")
def mnist1d_teacher(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("teacher")
    raw = mnist1d(nodes={"big": {"arch": "convnet_m"}, "mid": {"arch": "convnet_s", "args": {"width": 16}}},
                  supervise={"big": 1.0, "mid": 1.0})
    raw["train"]["save_epochs"] = [1]
    train(resolve(raw), out, **QUIET)
    return {"big": out / "nodes" / "big.pt", "mid": out / "nodes" / "mid.pt", "early": out / "nodes" / "big-epoch1.pt"}


SCHEMES = {
    "slkd": ({"teacher": ("big", "convnet_m"), "student": "mlp"}, {"name": "slkd"}),
    "dml": ({"peer1": "mlp", "peer2": "convnet_s"}, {"name": "dml"}),
    "takd": ({"teacher": ("big", "convnet_m"), "assistant": "convnet_s", "student": "mlp"}, {"name": "takd"}),
    "dgkd": ({"teacher": ("big", "convnet_m"), "assistant": "convnet_s", "student": "mlp"}, {"name": "dgkd"}),
    "born_again": ({"gen0": ("mid", "convnet_s")}, {"name": "born_again", "generations": 2, "ce_weight": 0.5}),
    "eskd": ({"teacher": ("early", "convnet_m"), "student": "mlp"}, {"name": "eskd", "stop_kd_epoch": 2}),
    "multi_teacher": ({"teacher1": ("big", "convnet_m"), "teacher2": ("mid", "convnet_s"), "student": "mlp"}, {"name": "multi_teacher"}),
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_scheme_short_run_lowers_training_loss(scheme: str, mnist1d_teacher: dict, tmp_path: Path) -> None:
    nodes_spec, method = SCHEMES[scheme]
    nodes = {}
    for name, spec in nodes_spec.items():
        if isinstance(spec, tuple):
            key, arch = spec
            nodes[name] = {"arch": arch, "checkpoint": str(mnist1d_teacher[key]),
                           **({"args": {"width": 16}} if key == "mid" else {})}
        else:
            nodes[name] = {"arch": spec}
    summary = train(resolve(mnist1d(nodes=nodes, method=method)), tmp_path / "run", **QUIET)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "kind" not in r]
    trained = {r["node"] for r in rows}
    for node in trained:
        losses = [r["train_loss"] for r in rows if r["node"] == node]
        assert losses[-1] < losses[0], (node, losses)
    if scheme in ("dml", "born_again"):
        assert any("ensemble" in r["arch"] for r in summary)
    assert trained == {n for n, s in nodes_spec.items() if not isinstance(s, tuple)} | ({"slt1", "slt2"} if scheme == "slkd" else set()) | ({"gen1", "gen2"} if scheme == "born_again" else set())


def test_takd_stage_output_is_next_stage_frozen_input_and_resume_mid_stage_two(mnist1d_teacher: dict, tmp_path: Path) -> None:
    raw = mnist1d(nodes={"teacher": {"arch": "convnet_m", "checkpoint": str(mnist1d_teacher["big"])},
                         "assistant": {"arch": "convnet_s"}, "student": {"arch": "mlp"}}, method="takd")
    raw["train"]["epochs"] = 2
    recipe = resolve(raw)
    full = tmp_path / "full"
    train(recipe, full, **QUIET)
    # last.pt of stage two names the assistant's stage-one file (and the teacher's checkpoint) by hash instead
    # of holding their weights; the run's end checks that the assistant did not move while the student learned
    last = torch.load(full / "last.pt", weights_only=True)
    assert set(last["settled"]) == {"teacher", "assistant"} and last["settled"]["assistant"]["file"] == "nodes/assistant.pt"
    assert not [k for k in last["flow"] if k.startswith(("models.assistant.", "models.teacher."))]

    class Stop(Exception):
        pass

    def stop(info: EpochEnd) -> None:
        if (info.stage, info.epoch) == ("student", 1):
            raise Stop

    cut = tmp_path / "cut"
    with pytest.raises(Stop):
        train(recipe, cut, callbacks=[stop], **QUIET)
    tampered = tmp_path / "tampered"
    shutil.copytree(cut, tampered)
    assistant = read_model_file(tampered / "nodes" / "assistant.pt")
    assistant["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in assistant["state_dict"].items()}
    save_atomic(assistant, tampered / "nodes" / "assistant.pt")
    with pytest.raises(RecipeError, match=r"nodes/assistant.pt changed since last.pt referenced it"):
        train(recipe, tampered, resume=True, **QUIET)
    train(recipe, cut, resume=True, **QUIET)
    for node in ["assistant", "student"]:
        a = read_model_file(full / "nodes" / f"{node}.pt")["state_dict"]
        b = read_model_file(cut / "nodes" / f"{node}.pt")["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time_s", "images_per_sec")} for r in rows]  # noqa: E731
    assert strip(read_jsonl(full / "metrics.jsonl")) == strip(read_jsonl(cut / "metrics.jsonl"))


# the scheme recipes the docs promise, composed with the Fashion-MNIST pair: who trains in which stage
SCHEME_RECIPES = {
    "slkd": [["student", "slt1", "slt2"]],
    "dml": [["student", "peer"]],
    "takd": [["assistant"], ["student"]],
    "dgkd": [["assistant"], ["student"]],
    "born_again": [["gen1"], ["gen2"]],
    "eskd": [["student"]],
    "multi_teacher": [["student"]],
}


@pytest.mark.parametrize("name", sorted(SCHEME_RECIPES))
def test_scheme_recipe_builds_against_the_fashion_pair(name: str, tmp_path: Path) -> None:
    from kdflow.checkpoint import model_file, save_atomic
    from kdflow.methods.recipe import load_recipe
    from kdflow.models import build_model

    root = Path(__file__).resolve().parents[1] / "recipes"
    sets = []
    for node, arch in [("teacher", "convnet_l"), ("teacher2", "convnet_m")]:
        path = tmp_path / f"{node}.pt"
        save_atomic(model_file(arch, {}, 10, (1, 28, 28), build_model(arch, 10, (1, 28, 28)).state_dict()), path)
        sets.append(f"nodes.{node}.checkpoint={path}")
    recipe = load_recipe([root / "fashion_mnist/pair.yaml", root / f"methods/{name}.yaml"], sets if name == "multi_teacher" else sets[:1])
    torch.manual_seed(0)
    flow = Flow(recipe, 10, (1, 28, 28), torch.randn(2, 1, 28, 28), num_data=64)
    assert [s.train for s in flow.stages] == SCHEME_RECIPES[name]
    trained = {n for s in flow.stages for n in s.train}
    assert all(recipe.nodes[n].checkpoint is None for n in trained)  # every trained node starts from scratch
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for stage in flow.stages:
        flow.set_stage_modes(stage)
        assert torch.isfinite(flow(x, y, stage, 0, torch.arange(4)).total)
