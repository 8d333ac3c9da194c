"""Logit losses against independent numpy computations written from the papers' formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdflow.losses import (
    annealing_mse,
    annealing_temperature_index,
    dist,
    dkd,
    kd,
    label_smoothing,
    tfkd_reg,
    virtual_teacher_logits,
)

TEMPERATURES = [1.0, 2.0, 4.0, 7.5]


# --------------------------------------------------------------------------- numpy refs


def np_softmax(z: np.ndarray, tau: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / tau
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p ‖ q) of two 1-d distributions, explicit loop."""
    total = 0.0
    for pi, qi in zip(p, q):
        if pi > 0:
            total += pi * math.log(pi / qi)
    return total


def np_kd_unscaled(zs: np.ndarray, zt: np.ndarray, tau: float) -> float:
    ps, pt = np_softmax(zs, tau), np_softmax(zt, tau)
    return sum(np_kl(pt[i], ps[i]) for i in range(len(zs))) / len(zs)


def np_dkd(zs, zt, y, alpha, beta, tau):
    tckd = nckd = 0.0
    for i in range(len(zs)):
        ps, pt = np_softmax(zs[i], tau), np_softmax(zt[i], tau)
        c = y[i]
        tckd += np_kl([pt[c], 1 - pt[c]], [ps[c], 1 - ps[c]])
        others = [k for k in range(len(ps)) if k != c]
        qs = ps[others] / (1 - ps[c])
        qt = pt[others] / (1 - pt[c])
        nckd += np_kl(qt, qs)
    b = len(zs)
    return tau**2 * (alpha * tckd / b + beta * nckd / b)


def np_pearson(u, v, eps=1e-8):
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    du, dv = u - u.mean(), v - v.mean()
    return float((du * dv).sum() / (math.sqrt((du * du).sum()) * math.sqrt((dv * dv).sum()) + eps))


def np_dist(zs, zt, beta, gamma, tau):
    ps, pt = np_softmax(zs, tau), np_softmax(zt, tau)
    b, c = ps.shape
    inter = 1 - np.mean([np_pearson(ps[i], pt[i]) for i in range(b)])
    intra = 1 - np.mean([np_pearson(ps[:, k], pt[:, k]) for k in range(c)])
    return tau**2 * (beta * inter + gamma * intra)


def np_tfkd(zs, y, a, tau):
    b, c = zs.shape
    total = 0.0
    for i in range(b):
        pd = np.full(c, (1 - a) / (c - 1))
        pd[y[i]] = a
        pd_tau = pd ** (1.0 / tau)  # softmax(log pd / tau)
        pd_tau = pd_tau / pd_tau.sum()
        total += np_kl(pd_tau, np_softmax(zs[i], tau))
    return tau**2 * total / b


def np_label_smoothing(zs, y, eps):
    b, c = zs.shape
    total = 0.0
    for i in range(b):
        p = np_softmax(zs[i])
        q = np.full(c, eps / c)
        q[y[i]] += 1 - eps
        total += -sum(q[k] * math.log(p[k]) for k in range(c))
    return total / b


# --------------------------------------------------------------------------- fixtures


def make(b=6, c=5, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    zt = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (b,), generator=g)
    return zs.float(), zt.float(), y


def close(value: torch.Tensor, ref: float, rel=1e-4, abs_=1e-6):
    # losses compute in fp32; KLs between near-uniform distributions at large tau, times
    # tau^2, lose a few digits to cancellation, hence rel 1e-4 against float64 numpy.
    assert float(value) == pytest.approx(ref, rel=rel, abs=abs_)


def extreme(b, c, seed):
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (b, c), generator=g).float() * 2 - 1
    return signs * 1e4


LOSSES_WITH_TEACHER = {
    "kd": lambda s, t, y: kd(s, t, temperature=4.0),
    "dkd": lambda s, t, y: dkd(s, t, y),
    "dist": lambda s, t, y: dist(s, t),
    "annealing_kd": lambda s, t, y: annealing_mse(s, t, temperature_index=3),
}
LOSSES_STUDENT_ONLY = {
    "tfkd_reg": lambda s, t, y: tfkd_reg(s, y),
    "label_smoothing": lambda s, t, y: label_smoothing(s, y),
}
ALL = {**LOSSES_WITH_TEACHER, **LOSSES_STUDENT_ONLY}


# --------------------------------------------------------------------------- kd


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_kd_matches_numpy(tau):
    zs, zt, _ = make()
    close(kd(zs, zt, tau), tau**2 * np_kd_unscaled(zs.numpy(), zt.numpy(), tau))


def test_kd_hand_computed_two_classes():
    # teacher logits (2 ln 3, 0) at tau 2 -> p_t = (3/4, 1/4); student (0, 0) -> p_s = (1/2, 1/2)
    zs = torch.tensor([[0.0, 0.0]])
    zt = torch.tensor([[2 * math.log(3.0), 0.0]])
    expected = 2.0**2 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert expected == pytest.approx(0.5232481, abs=1e-6)
    close(kd(zs, zt, temperature=2.0), expected)


# --------------------------------------------------------------------------- dkd


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (0.5, 2.0), (2.0, 0.0)])
def test_dkd_matches_numpy(tau, alpha, beta):
    zs, zt, y = make(seed=1)
    close(dkd(zs, zt, y, alpha, beta, tau), np_dkd(zs.numpy(), zt.numpy(), y.numpy(), alpha, beta, tau))


def test_dkd_tckd_plus_nckd_decomposes_kd():
    # Paper Eq. (7): KD = TCKD + (1 - p_t_target) * NCKD, per sample; check on one sample.
    zs, zt, y = make(b=1, c=6, seed=2)
    tau = 3.0
    pt = np_softmax(zt.numpy()[0], tau)
    tckd = dkd(zs, zt, y, alpha=1.0, beta=0.0, temperature=tau)
    nckd = dkd(zs, zt, y, alpha=0.0, beta=1.0, temperature=tau)
    close(tckd + (1 - pt[y[0]]) * nckd, tau**2 * np_kd_unscaled(zs.numpy(), zt.numpy(), tau), rel=1e-4)


def test_dkd_two_classes_has_zero_nckd():
    zs, zt, y = make(c=2, seed=3)
    assert float(dkd(zs, zt, y, alpha=0.0, beta=1.0)) == pytest.approx(0.0, abs=1e-7)
    close(dkd(zs, zt, y), np_dkd(zs.numpy(), zt.numpy(), y.numpy(), 1.0, 8.0, 4.0))


# --------------------------------------------------------------------------- dist


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("beta,gamma", [(2.0, 2.0), (1.0, 0.5)])
def test_dist_matches_numpy(tau, beta, gamma):
    zs, zt, _ = make(seed=4)
    close(dist(zs, zt, beta, gamma, tau), np_dist(zs.numpy(), zt.numpy(), beta, gamma, tau), rel=1e-4, abs_=1e-5)


def test_dist_two_classes_matches_numpy():
    zs, zt, _ = make(c=2, seed=5)
    close(dist(zs, zt), np_dist(zs.numpy(), zt.numpy(), 2.0, 2.0, 4.0), rel=1e-4, abs_=1e-5)


# --------------------------------------------------------------------------- tfkd_reg


def test_virtual_teacher_distribution():
    y = torch.tensor([0, 3, 1])
    p = virtual_teacher_logits(y, num_classes=4, correct_prob=0.9).exp().numpy()
    expected = np.full((3, 4), 0.1 / 3)
    expected[[0, 1, 2], [0, 3, 1]] = 0.9
    np.testing.assert_allclose(p, expected, rtol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 4.0, 20.0, 40.0])
@pytest.mark.parametrize("a", [0.99, 0.9])
def test_tfkd_reg_matches_numpy(tau, a):
    zs, _, y = make(seed=6)
    close(tfkd_reg(zs, y, a, tau), np_tfkd(zs.numpy(), y.numpy(), a, tau))


def test_tfkd_reg_defaults():
    zs, _, y = make(seed=7)
    close(tfkd_reg(zs, y), np_tfkd(zs.numpy(), y.numpy(), 0.99, 20.0))


# --------------------------------------------------------------------------- annealing


@pytest.mark.parametrize("k,tmax", [(1, 10), (5, 10), (10, 10), (2, 4)])
def test_annealing_kd_matches_numpy(k, tmax):
    zs, zt, _ = make(seed=8)
    s, t = zs.numpy().astype(np.float64), zt.numpy().astype(np.float64)
    ref = sum((s[i, j] - k / tmax * t[i, j]) ** 2 for i in range(s.shape[0]) for j in range(s.shape[1])) / s.size
    close(annealing_mse(zs, zt, k, tmax), ref)


def test_annealing_kd_last_step_zero_when_equal():
    zs, _, _ = make(seed=9)
    assert float(annealing_mse(zs, zs.clone(), 10, 10)) == 0.0


def test_annealing_temperature_index_schedule():
    ks = [annealing_temperature_index(e, 20, 10) for e in range(20)]
    assert ks == [k for k in range(1, 11) for _ in range(2)]
    ks = [annealing_temperature_index(e, 25, 10) for e in range(25)]
    assert ks[0] == 1 and ks[-1] == 10 and ks == sorted(ks)
    counts = [ks.count(k) for k in range(1, 11)]
    assert set(counts) <= {2, 3} and sum(counts) == 25
    assert annealing_temperature_index(30, 25, 10) == 10
    with pytest.raises(ValueError):
        annealing_temperature_index(-1, 25, 10)
    with pytest.raises(ValueError):
        annealing_mse(torch.zeros(2, 3), torch.zeros(2, 3), 0, 10)


# --------------------------------------------------------------------------- label smoothing


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("c", [2, 5])
def test_label_smoothing_matches_numpy(eps, c):
    zs, _, y = make(c=c, seed=10)
    close(label_smoothing(zs, y, eps), np_label_smoothing(zs.numpy(), y.numpy(), eps))


# --------------------------------------------------------------------------- properties


def test_zero_when_student_equals_teacher():
    zs, _, y = make(seed=11)
    assert float(kd(zs, zs.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(dkd(zs, zs.clone(), y)) == pytest.approx(0.0, abs=1e-6)
    # fp32 Pearson is 1 - O(1e-7); times tau^2 * (beta + gamma) = 64 this leaves ~1e-5
    assert float(dist(zs, zs.clone())) == pytest.approx(0.0, abs=1e-4)
    assert float(dist(zs, zs.clone(), temperature=1.0)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("tau", [20.0, 50.0])
def test_tau_squared_keeps_the_gradient_scale(tau):
    """Hinton et al. 2015, sec. 2.1: at high τ, with zero-mean logits, ∂KL/∂z_i ≈ (z_i − v_i)/(N τ²); the τ²
    factor makes the gradient of `kd` about (z_i − v_i)/N per sample, whatever τ. Without it, or with τ
    once instead of squared, the gradient shrinks by 1/τ² or 1/τ and this fails."""
    zs, zt, _ = make(b=4, c=10, seed=12, scale=0.5)
    zs, zt = zs - zs.mean(1, keepdim=True), zt - zt.mean(1, keepdim=True)
    s = zs.double().requires_grad_(True)
    (grad,) = torch.autograd.grad(kd(s, zt.double(), tau), s)
    approx = (zs - zt).double() / (10 * 4)  # per-sample gradient / N, and batchmean's 1/B
    assert torch.allclose(grad, approx, rtol=0.05, atol=2e-3 / tau), (grad - approx).abs().max()


@pytest.mark.parametrize("name", ["kd", "dkd", "dist"])
def test_batch_order_invariance(name):
    zs, zt, y = make(b=7, seed=13)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    f = ALL[name]
    close(f(zs[perm], zt[perm], y[perm]), float(f(zs, zt, y)), rel=1e-4)


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("c", [2, 5])
def test_finite_at_extreme_logits(name, c):
    s = extreme(6, c, seed=14).requires_grad_(True)
    t = extreme(6, c, seed=15)
    y = torch.arange(6) % c
    value = ALL[name](s, t, y)
    assert torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, s)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", sorted(ALL))
def test_finite_for_two_classes(name):
    zs, zt, y = make(c=2, seed=16)
    s = zs.requires_grad_(True)
    value = ALL[name](s, zt, y)
    assert torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, s)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(ALL))
def test_gradient_equals_finite_differences(name):
    """The analytic gradient with respect to the student's logits (and, where the loss reads them, the
    teacher's) equals central finite differences in float64: no detach in the wrong place, no custom
    backward that disagrees with the forward."""
    zs, zt, y = make(b=3, c=4, seed=17)
    s = zs.double().requires_grad_(True)
    t = zt.double().requires_grad_(name in LOSSES_WITH_TEACHER)
    inputs = (s, t) if t.requires_grad else (s,)
    fn = (lambda a, b: ALL[name](a, b, y)) if t.requires_grad else (lambda a: ALL[name](a, t, y))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_bf16_inputs_are_finite():
    zs, zt, y = make(seed=18)
    for name, f in ALL.items():
        assert torch.isfinite(f(zs.bfloat16() * 100, zt.bfloat16() * 100, y)), name


def test_logit_standardization_is_a_z_score_and_makes_kd_scale_free() -> None:
    """Sun et al. 2024: Z(z) = (z − mean) / (1e-7 + std), std with Bessel's correction (numpy's ddof=1); KD on
    standardized logits does not change when either model's logits are scaled and shifted (a > 0)."""
    import numpy as np

    from kdflow import losses

    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(6, 10, generator=g, dtype=torch.float64), 3 * torch.randn(6, 10, generator=g, dtype=torch.float64)
    a = zs.numpy()
    want = (a - a.mean(1, keepdims=True)) / (1e-7 + a.std(1, ddof=1, keepdims=True))
    assert np.allclose(losses.standardize(zs).numpy(), want, rtol=0, atol=1e-12)
    Z = losses.standardize
    base = losses.kd(Z(zs), Z(zt), 2.0)
    assert torch.allclose(losses.kd(Z(5 * zs - 2), Z(0.3 * zt + 7), 2.0), base, rtol=1e-6)  # up to the 1e-7 in the denominator
    assert not torch.allclose(losses.kd(5 * zs - 2, 0.3 * zt + 7, 2.0), losses.kd(zs, zt, 2.0))  # plain KD is not
    y = torch.randint(0, 10, (6,), generator=g)
    assert torch.allclose(losses.dkd(Z(4 * zs + 1), Z(zt - 3), y, 1.0, 8.0, 2.0),
                          losses.dkd(Z(zs), Z(zt), y, 1.0, 8.0, 2.0), rtol=1e-6)
