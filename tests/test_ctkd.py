"""CTKD (Li et al. 2023, AAAI): the learned-temperature KD criterion, its curriculum, the gradient reversal,
the method's recipe and one training step on the CIFAR-100 pair (parity with the authors' step:
tests/test_parity_ctkd.py)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from formats import make_cifar100
from kdflow.cli import main
from kdflow.engine.rundir import read_jsonl
from kdflow.flow.errors import RecipeError
from kdflow.losses import CRITERIA, CurriculumTemperature, curriculum_lambda, gradient_reversal, kd, standardize
from kdflow.methods.recipe import load_recipe
from kdflow.models import build_model

ROOT = Path(__file__).resolve().parents[1] / "recipes"
FILES = [ROOT / "cifar100/protocol.yaml", ROOT / "cifar100/pairs/resnet32x4-resnet8x4.yaml", ROOT / "methods/ctkd.yaml"]


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_kd(z_s: np.ndarray, z_t: np.ndarray, tau: float) -> float:
    """τ² · (1/B) Σ_i Σ_c p_t (log p_t − log p_s), p = softmax(z/τ)."""
    ls, lt = np_log_softmax(z_s / tau), np_log_softmax(z_t / tau)
    return float(tau**2 * (np.exp(lt) * (lt - ls)).sum(axis=1).mean())


def np_tau(theta: float, t_min: float = 1.0, t_range: float = 20.0) -> float:
    return t_min + t_range / (1.0 + math.exp(-theta))


def logits(b: int = 5, c: int = 7, seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, c, generator=g, dtype=torch.float64),
            scale * torch.randn(b, c, generator=g, dtype=torch.float64))


def module(**kw) -> CurriculumTemperature:
    return CRITERIA["ctkd"].fn((7,), (7,), None, **kw).double()


# ---------------------------------------------------------------------------------------------
# the loss at a fixed temperature
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [1.0, -2.5, 0.0, 4.0])
def test_loss_is_numpy_kd_at_the_mapped_temperature(theta: float) -> None:
    z_s, z_t = logits()
    m = module(theta_init=theta)
    tau = np_tau(theta)
    assert m.temperature() == pytest.approx(tau, rel=1e-7)  # the parameter is float32 before .double()
    with torch.no_grad():
        m.theta.fill_(theta)
    got = m(z_s, z_t, epoch=3).item()
    assert got == pytest.approx(np_kd(z_s.numpy(), z_t.numpy(), tau), rel=1e-12)
    assert got != pytest.approx(np_kd(z_s.numpy(), z_t.numpy(), 4.0), rel=1e-3)  # not a fixed τ = 4


def test_initial_temperature_and_range_are_the_authors() -> None:
    """θ₀ = 1 (Global_T's torch.ones(1)), τ = 1 + 20·sigmoid(θ): τ₀ ≈ 15.62, τ ∈ (1, 21)."""
    m = module()
    assert m.temperature() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-7)
    assert m.temperature() == pytest.approx(15.6212, abs=1e-4)
    other = module(theta_init=0.0, min_temperature=2.0, temperature_range=6.0)
    assert other.temperature() == pytest.approx(5.0)
    for theta in (-40.0, 40.0):
        with torch.no_grad():
            m.theta.fill_(theta)
        assert 1.0 <= m.temperature() <= 21.0


def test_logit_standardization_on_the_transfer_scores_both_logits_first(tmp_path: Path) -> None:
    """`logit_standardization: true` on the method puts the switch on its transfer; the flow z-scores both logits
    before the criterion, so the loss is numpy KD of the standardized logits at the learned τ."""
    recipe = load_recipe(FILES, ["method.logit_standardization=true"])
    (t,) = recipe.transfers
    assert t.logit_standardization and t.criterion == "ctkd"
    assert not load_recipe(FILES).transfers[0].logit_standardization
    z_s, z_t = logits(seed=4)
    m = module()
    got = m(standardize(z_s), standardize(z_t), epoch=0).item()

    def np_std(z: np.ndarray) -> np.ndarray:
        return (z - z.mean(axis=1, keepdims=True)) / (1e-7 + z.std(axis=1, ddof=1, keepdims=True))

    assert got == pytest.approx(np_kd(np_std(z_s.numpy()), np_std(z_t.numpy()), m.temperature()), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# the curriculum
# ---------------------------------------------------------------------------------------------


def paper_lambda(n: int, loops: int = 10, lo: float = 0.0, hi: float = 1.0) -> float:
    """The cosine curriculum as Li et al. 2023 write it, at the 1-based epoch n:
    λ_min + ½(λ_max − λ_min)(1 + cos((1 + min(n, E)/E)π))."""
    return lo + 0.5 * (hi - lo) * (1 + math.cos((1 + min(n, loops) / loops) * math.pi))


def authors_multiplier(n: int, loops: int = 10, max_value: float = 0.0, min_value: float = -1.0) -> float:
    """What the authors' CosineDecay hands the reversal layer at their 1-based epoch n (the multiplier is −λ)."""
    n = min(max(n, 0), loops)
    return (math.cos(n * math.pi / loops) + 1.0) * 0.5 * (max_value - min_value) + min_value


@pytest.mark.parametrize("epoch", [0, 1, 4, 8, 9, 10, 50, 239])
def test_curriculum_is_the_paper_formula_at_the_one_based_epoch(epoch: int) -> None:
    lam = curriculum_lambda(epoch)
    assert lam == pytest.approx(paper_lambda(epoch + 1), abs=1e-15)
    assert lam == pytest.approx(-authors_multiplier(epoch + 1), abs=1e-15)


def test_curriculum_values() -> None:
    assert curriculum_lambda(0) == pytest.approx((1 - math.cos(math.pi / 10)) / 2)  # ≈ 0.0245, not 0
    assert curriculum_lambda(0) == pytest.approx(0.024471741852423234, abs=1e-15)
    assert curriculum_lambda(4) == pytest.approx(0.5)
    assert curriculum_lambda(9) == pytest.approx(1.0) and curriculum_lambda(200) == pytest.approx(1.0)
    values = [curriculum_lambda(e) for e in range(12)]
    assert all(a < b for a, b in zip(values[:9], values[1:10]))  # rising over the 10 loops, then flat
    assert curriculum_lambda(2, loops=5, lambda_min=0.2, lambda_max=0.8) == pytest.approx(paper_lambda(3, 5, 0.2, 0.8))


def test_module_uses_the_epoch_of_its_context() -> None:
    z_s, z_t = logits()
    m = module()
    first = m(z_s, z_t, epoch=0).item()
    assert m.last_lambda == pytest.approx(curriculum_lambda(0))
    assert m(z_s, z_t, epoch=30).item() == pytest.approx(first, rel=1e-14)  # the value does not depend on λ
    assert m.last_lambda == 1.0


# ---------------------------------------------------------------------------------------------
# the gradient reversal
# ---------------------------------------------------------------------------------------------


def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward() -> None:
    x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    y = gradient_reversal(x, 0.25)
    assert torch.equal(y, x) and y is not x
    (y * torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-0.25, -0.5, 0.75], dtype=torch.float64))


@pytest.mark.parametrize("epoch", [0, 4, 20])
def test_temperature_gradient_is_the_reversed_numeric_derivative(epoch: int) -> None:
    """θ.grad = −λ(epoch) · dKD/dθ, dKD/dθ by a central difference of the numpy loss; the student's gradient is
    that of KD at the same τ whatever λ is."""
    z_s, z_t = logits(seed=2)
    m = module()
    theta = m.theta.item()
    h = 1e-6
    s, t = z_s.numpy(), z_t.numpy()
    numeric = (np_kd(s, t, np_tau(theta + h)) - np_kd(s, t, np_tau(theta - h))) / (2 * h)
    assert abs(numeric) > 1e-3
    student = z_s.clone().requires_grad_(True)
    m(student, z_t, epoch=epoch).backward()
    lam = curriculum_lambda(epoch)
    assert m.theta.grad.item() == pytest.approx(-lam * numeric, rel=1e-6)
    assert m.theta.grad.item() * numeric < 0  # reversed: θ ascends the loss the student descends
    plain = z_s.clone().requires_grad_(True)
    kd(plain, z_t, m.temperature()).backward()
    assert torch.allclose(student.grad, plain.grad, rtol=1e-12, atol=1e-15)


def test_an_sgd_step_raises_the_loss_through_the_temperature() -> None:
    """With λ = 1, one SGD step on θ alone increases the KD loss (a gradient step on −loss)."""
    z_s, z_t = logits(seed=5)
    m = module()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = m(z_s, z_t, epoch=20)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = m(z_s, z_t, epoch=20)
    assert after.item() > before.item()


# ---------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_give_one_line_errors() -> None:
    with pytest.raises(ValueError, match="loops must be >= 1"):
        curriculum_lambda(0, loops=0)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        curriculum_lambda(-1)
    with pytest.raises(ValueError, match="loops must be >= 1"):
        module(loops=0)
    with pytest.raises(ValueError, match="min_temperature must be > 0"):
        module(min_temperature=0.0)
    with pytest.raises(ValueError, match="temperature_range must be >= 0"):
        module(temperature_range=-1.0)
    with pytest.raises(ValueError, match="theta_init must be finite"):
        module(theta_init=float("nan"))
    with pytest.raises(ValueError, match="tap `logits`"):
        CRITERIA["ctkd"].fn((8, 4, 4), (8, 4, 4), None)
    z_s, z_t = logits()
    with pytest.raises(ValueError, match=r"ctkd compares logits \(B, C\)"):
        module()(z_s, z_t[:, :5], epoch=0)
    with pytest.raises(ValueError, match=r"ctkd compares logits \(B, C\)"):
        module()(z_s[0], z_t[0], epoch=0)


def test_recipe_refuses_a_fixed_temperature_argument() -> None:
    """τ is learned: the method takes no `temperature` (a typo or a KD habit is an error, not ignored)."""
    with pytest.raises(RecipeError, match="unknown field 'temperature'"):
        load_recipe(FILES, ["method.temperature=4"])


# ---------------------------------------------------------------------------------------------
# the method on the CIFAR-100 protocol
# ---------------------------------------------------------------------------------------------


def test_recipe_resolves_with_the_authors_defaults() -> None:
    recipe = load_recipe(FILES)
    (t,) = recipe.transfers
    assert (t.criterion, t.sources, t.targets) == ("ctkd", ["teacher.logits"], ["student.logits"])
    assert t.weight == 0.9 and recipe.supervise["student"].weight == 0.1
    assert t.params == {"theta_init": 1.0, "min_temperature": 1.0, "temperature_range": 20.0, "loops": 10,
                        "lambda_min": 0.0, "lambda_max": 1.0}
    assert (recipe.train.epochs, recipe.train.batch_size, recipe.train.optim.lr) == (240, 64, 0.05)
    assert load_recipe(FILES, ["method.loops=5"]).transfers[0].params["loops"] == 5


def test_one_step_on_the_cifar_pair_trains_the_temperature(tmp_path: Path) -> None:
    """protocol + resnet32x4-resnet8x4 + ctkd.yaml, 64 random CIFAR-100 images (one step of the protocol's batch):
    θ is in the student's SGD (lr 0.05, momentum, weight decay) and moved by exactly −lr times its momentum
    buffer; the run ends with a finite loss and the transfer in the resolved recipe."""
    make_cifar100(tmp_path, n_train=64, n_test=16)
    torch.manual_seed(0)
    teacher = build_model("resnet32x4", 100, (3, 32, 32))
    ckpt = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": teacher.state_dict()}, ckpt)
    out = tmp_path / "run"
    sets = [f"data.root={tmp_path}", f"nodes.teacher.checkpoint={ckpt}", "train.epochs=1"]
    assert main(["train", *map(str, FILES), "--out", str(out), "--no-progress", "--set", *sets]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows and all(math.isfinite(r["train_loss"]) for r in rows)
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert [t["criterion"] for t in resolved["transfers"]] == ["ctkd"]
    last = torch.load(out / "last.pt", weights_only=True)
    theta = last["flow"]["criterion_modules.0.theta"]
    assert theta.shape == (1,) and torch.isfinite(theta).all() and theta.item() != 1.0
    state = last["optimizers"]["student"]
    buffer = state["state"][max(state["state"])]["momentum_buffer"]  # θ is the student's last parameter
    assert buffer.shape == (1,)
    assert theta.item() == pytest.approx(1.0 - 0.05 * buffer.item(), rel=1e-6)
