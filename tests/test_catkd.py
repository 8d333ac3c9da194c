"""CAT-KD (Guo et al. 2023): the class activation maps and the CAT loss against numpy, their errors, the `cat`
criterion built by a Flow (taps, classifier weights, gradients), and the method from its recipe file on the
CIFAR-100 pair resnet32x4 → resnet8x4, trained one step by the engine."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from formats import make_cifar100
from kdflow.checkpoint import model_file, save_atomic
from kdflow.cli import main
from kdflow.engine.rundir import read_jsonl
from kdflow.flow.errors import RecipeError
from kdflow.flow.graph import Flow
from kdflow.losses import binarize_cams, cat_loss, class_activation_maps, class_attention_transfer
from kdflow.losses.registry import CRITERIA
from kdflow.methods import METHODS, method_graph
from kdflow.methods.recipe import load_recipe, resolve
from kdflow.models import build_model

ROOT = Path(__file__).resolve().parents[1] / "recipes"
FILES = [ROOT / "cifar100/protocol.yaml", ROOT / "cifar100/pairs/resnet32x4-resnet8x4.yaml", ROOT / "methods/catkd.yaml"]


# ------------------------------------------------------------------ numpy reference


def np_cam(feature: np.ndarray, weight: np.ndarray) -> np.ndarray:
    b, c, h, w = feature.shape
    out = np.zeros((b, weight.shape[0], h, w))
    for n in range(b):
        for k in range(weight.shape[0]):
            for i in range(h):
                for j in range(w):
                    out[n, k, i, j] = sum(weight[k, ch] * feature[n, ch, i, j] for ch in range(c))
    return out


def np_adaptive_pool(x: np.ndarray, r: int) -> np.ndarray:
    """PyTorch's adaptive average pool: bin i covers [floor(i·H/r), ceil((i+1)·H/r))."""
    b, k, h, w = x.shape
    out = np.zeros((b, k, r, r))
    for i in range(r):
        h0, h1 = (i * h) // r, math.ceil((i + 1) * h / r)
        for j in range(r):
            w0, w1 = (j * w) // r, math.ceil((j + 1) * w / r)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


def np_cat(s_cam: np.ndarray, t_cam: np.ndarray, r: int, normalize: bool) -> float:
    s, t = np_adaptive_pool(s_cam, r), np_adaptive_pool(t_cam, r)
    if normalize:
        s = s / np.maximum(np.sqrt((s**2).sum(axis=(2, 3), keepdims=True)), 1e-12)
        t = t / np.maximum(np.sqrt((t**2).sum(axis=(2, 3), keepdims=True)), 1e-12)
    return float(((s - t) ** 2).mean())


def data(seed: int = 0):
    g = np.random.default_rng(seed)
    fs = g.normal(size=(3, 5, 7, 7))  # student: 5 channels, 7×7 (odd: overlapping pooling bins)
    ft = np.maximum(g.normal(size=(3, 6, 8, 8)), 0.0)  # teacher: 6 channels, 8×8, post-ReLU-like
    ws, wt = g.normal(size=(4, 5)), g.normal(size=(4, 6))  # 4 classes
    return fs, ft, ws, wt


T = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731


# ------------------------------------------------------------------ the pure functions


def test_cams_equal_numpy() -> None:
    fs, _, ws, _ = data()
    got = class_activation_maps(T(fs), T(ws)).numpy()
    assert got.shape == (3, 4, 7, 7)
    np.testing.assert_allclose(got, np_cam(fs, ws), rtol=1e-12, atol=1e-12)


def test_global_average_of_a_cam_is_the_logit_without_bias() -> None:
    fs, _, ws, _ = data()
    head = nn.Linear(5, 4).double()
    with torch.no_grad():
        head.weight.copy_(T(ws))
    logits = head(T(fs).mean(dim=(2, 3))) - head.bias
    torch.testing.assert_close(class_activation_maps(T(fs), head.weight).mean(dim=(2, 3)), logits)


@pytest.mark.parametrize("r", [1, 2, 4])
@pytest.mark.parametrize("normalize", [False, True])
def test_cat_loss_equals_numpy(r: int, normalize: bool) -> None:
    fs, ft, ws, wt = data(1)
    s_cam, t_cam = np_cam(fs, ws), np_cam(ft, wt)
    want = np_cat(s_cam, t_cam, r, normalize)
    assert cat_loss(T(s_cam), T(t_cam), r, normalize).item() == pytest.approx(want, rel=1e-12)
    # from the feature maps and the weights (features pooled first): the same loss
    got = class_attention_transfer(T(fs), T(ft), T(ws), T(wt), r, normalize).item()
    assert got == pytest.approx(want, rel=1e-12)


def test_normalisation_makes_the_loss_scale_free() -> None:
    fs, ft, ws, wt = data(2)
    a = class_attention_transfer(T(fs), T(ft), T(ws), T(wt), 2, True)
    b = class_attention_transfer(T(fs) * 7.0, T(ft) * 0.1, T(ws), T(wt), 2, True)
    torch.testing.assert_close(a, b)
    c = class_attention_transfer(T(fs) * 7.0, T(ft), T(ws), T(wt), 2, False)
    assert not torch.isclose(c, class_attention_transfer(T(fs), T(ft), T(ws), T(wt), 2, False))


def test_binarized_teacher_cams_equal_numpy() -> None:
    fs, ft, ws, wt = data(3)
    t_cam = np_cam(ft, wt)
    binary = (t_cam > np.abs(t_cam).mean(axis=(2, 3), keepdims=True)).astype(float)
    np.testing.assert_array_equal(binarize_cams(T(t_cam)).numpy(), binary)
    want = np_cat(np_cam(fs, ws), binary, 2, True)
    got = class_attention_transfer(T(fs), T(ft), T(ws), T(wt), 2, True, binarize=True).item()
    assert got == pytest.approx(want, rel=1e-12)


def test_identical_cams_give_zero_and_the_gradient_reaches_student_weight_and_features() -> None:
    fs, ft, ws, wt = data(4)
    f, w = T(fs).requires_grad_(True), T(ws).requires_grad_(True)
    assert class_attention_transfer(f, T(fs), w, T(ws), 2).item() == 0.0
    loss = class_attention_transfer(f, T(ft), w, T(wt), 2)
    loss.backward()
    assert f.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: class_activation_maps(torch.zeros(2, 5, 4), torch.zeros(3, 5)), "B×C×H×W"),
        (lambda: class_activation_maps(torch.zeros(2, 5, 4, 4), torch.zeros(3, 6)), "takes 6 features but the feature map has 5 channels"),
        (lambda: class_activation_maps(torch.zeros(2, 5, 4, 4), torch.zeros(5)), "K×C classifier weight"),
        (lambda: cat_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 4)), "differ in batch size or number of classes"),
        (lambda: cat_loss(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4)), "differ in batch size or number of classes"),
        (lambda: cat_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), 0), "resolution must be a positive integer"),
        (lambda: cat_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), 2.5), "resolution must be a positive integer"),
        (lambda: class_attention_transfer(torch.zeros(2, 5, 4, 4), torch.zeros(2, 6, 4, 4), torch.zeros(3, 5), torch.zeros(4, 6)),
         "differ in number of classes: student 3, teacher 4"),
        (lambda: class_attention_transfer(torch.zeros(2, 5, 4, 4), torch.zeros(3, 6, 4, 4), torch.zeros(3, 5), torch.zeros(3, 6)),
         "batch sizes differ: 2 and 3"),
        (lambda: class_attention_transfer(torch.zeros(2, 5, 4, 4), torch.zeros(2, 6, 4, 4), torch.zeros(3, 5), torch.zeros(3, 7)),
         "teacher: the classifier takes 7 features"),
    ],
)
def test_bad_inputs_give_one_line_errors(call, message: str) -> None:
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ the criterion in a Flow


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    model = build_model("convnet_m", 10, (1, 16, 16), width=8)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_atomic(model_file("convnet_m", {"width": 8}, 10, (1, 16, 16), model.state_dict()), path)
    return path


def small_flow(teacher: Path, overrides: list[str], num_classes: int = 10) -> Flow:
    """convnet_m teacher, convnet_s student on 1×16×16 inputs (their global pool is `pool`)."""
    raw = {
        "data": {"name": "synthetic", "options": {"num_samples": 8, "num_classes": num_classes, "shape": [1, 16, 16]}},
        "nodes": {"teacher": {"arch": "convnet_m", "args": {"width": 8}, "checkpoint": str(teacher)},
                  "student": {"arch": "convnet_s", "args": {"width": 8}}},
        "method": {"name": "catkd", "teacher_tap": "pool:input", "student_tap": "pool:input"},
        "train": {"epochs": 1, "batch_size": 4},
    }
    for o in overrides:
        key, value = o.split("=", 1)
        raw["method"][key] = yaml.safe_load(value)
    torch.manual_seed(0)
    return Flow(resolve(raw), num_classes, (1, 16, 16), torch.randn(2, 1, 16, 16))


def test_the_criterion_reads_both_classifiers_and_trains_only_the_student(small_teacher: Path) -> None:
    flow = small_flow(small_teacher, [])
    module = flow.criterion_modules["0"]
    assert CRITERIA["cat"].module and list(module.parameters()) == [] and module.state_dict() == {}
    student, teacher = flow.models["student"], flow.models["teacher"]
    ids = [id(p) for p in flow.parameters_of("student")]
    assert len(ids) == len(set(ids)) == len(list(student.parameters()))  # the classifier is not listed twice
    spec = flow.stages[-1]
    flow.set_stage_modes(spec)
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    out = flow(x, y, spec, 0, torch.arange(4))
    out.total.backward()
    assert student.fc.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    # the CAT term alone moves the student's classifier weight (its CAMs are made from it)
    flow.zero_grad(set_to_none=True)
    cat_term = next(v for k, v in flow(x, y, spec, 0, torch.arange(4)).terms.items() if k.startswith("cat("))
    cat_term.backward()
    assert student.fc.weight.grad.abs().sum() > 0 and student.fc.bias.grad is None


def test_the_criterion_uses_the_current_classifier_weights(small_teacher: Path) -> None:
    """Read at every call: after the student's classifier changes, the term changes accordingly."""
    flow = small_flow(small_teacher, [])
    spec = flow.stages[-1]
    flow.set_stage_modes(spec)
    flow.models["student"].eval()
    x = torch.randn(4, 1, 16, 16)
    taps = flow.run_nodes(x, spec)
    module = flow.criterion_modules["0"]
    before = module(taps["student.pool:input"], taps["teacher.pool:input"]).item()
    with torch.no_grad():
        flow.models["student"].fc.weight.mul_(2.0)
    after = module(taps["student.pool:input"], taps["teacher.pool:input"]).item()
    s, t = taps["student.pool:input"], taps["teacher.pool:input"]
    want = class_attention_transfer(s, t, flow.models["student"].fc.weight, flow.models["teacher"].fc.weight).item()
    assert after == pytest.approx(want, rel=1e-6) and after != pytest.approx(before, rel=1e-3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["student_tap=logits"], "student's tap has shape (10,)"),
        (["teacher_tap=embedding"], "teacher's tap has shape (64,)"),
        (["student_tap=stage1"], "student's tap has 16 channels but its classifier takes 32 features"),
        (["resolution=0"], "resolution must be a positive integer"),
        (["teacher_tap=avgpool:input"], "no module 'avgpool'"),
    ],
)
def test_wrong_taps_and_arguments_are_one_line_recipe_errors(overrides: list[str], message: str, small_teacher: Path) -> None:
    with pytest.raises(RecipeError) as e:
        small_flow(small_teacher, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ the method and its recipe


def test_method_graph_and_defaults() -> None:
    assert METHODS["catkd"].knowledge == "features" and "Guo" in METHODS["catkd"].citation
    g = method_graph("catkd")
    assert g["supervise"] == {"student": 1.0}
    assert g["transfers"] == [{"from": "teacher.avgpool:input", "to": "student.avgpool:input", "criterion": "cat",
                               "resolution": 2, "normalize": False, "binarize": False, "weight": 15.0}]
    assert method_graph("catkd", ce_weight=0.0, normalize=True, weight=50.0)["supervise"] == {"student": 0.0}


def test_recipe_resolves_on_the_cifar_pair() -> None:
    recipe = load_recipe(FILES)
    (t,) = recipe.transfers
    assert (t.source, t.to, t.criterion, t.weight) == ("teacher.avgpool:input", "student.avgpool:input", "cat", 15.0)
    assert t.params == {"resolution": 2, "normalize": False, "binarize": False}
    assert recipe.supervise["student"].weight == 1.0
    assert recipe.train.epochs == 240 and recipe.train.batch_size == 64
    over = load_recipe(FILES, ["method.weight=600", "method.resolution=4", "method.normalize=true"]).transfers[0]
    assert over.weight == 600.0 and over.params["resolution"] == 4 and over.params["normalize"] is True


@pytest.mark.slow
def test_one_step_on_resnet32x4_to_resnet8x4(tmp_path: Path) -> None:
    """The engine trains the recipe's graph for one step (64 random CIFAR-100 images, the protocol's batch)."""
    make_cifar100(tmp_path, n_train=64, n_test=16)
    torch.manual_seed(0)
    teacher = build_model("resnet32x4", 100, (3, 32, 32))
    ckpt = tmp_path / "ckpt_epoch_240.pth"  # RepDistiller / mdistiller layout
    torch.save({"epoch": 240, "model": teacher.state_dict()}, ckpt)
    out = tmp_path / "run"
    sets = [f"data.root={tmp_path}", f"nodes.teacher.checkpoint={ckpt}", "train.epochs=1"]
    assert main(["train", *map(str, FILES), "--out", str(out), "--no-progress", "--set", *sets]) == 0
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("node", "student") == "student"]
    assert rows and all(math.isfinite(r["train_loss"]) for r in rows)
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert [t["criterion"] for t in resolved["transfers"]] == ["cat"]
    trained = torch.load(out / "nodes" / "student.pt", weights_only=True)
    assert trained  # the student's model file was written
