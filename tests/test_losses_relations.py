"""Relation losses against independent numpy computations written from the papers' formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdflow.losses import cc, pkt, rkd, rkd_angle, rkd_distance, sp

# --------------------------------------------------------------------------- numpy refs


def np_sp(fs: np.ndarray, ft: np.ndarray) -> float:
    b = fs.shape[0]

    def gram(f):
        q = f.reshape(b, -1).astype(np.float64)
        g = np.array([[float(np.dot(q[i], q[j])) for j in range(b)] for i in range(b)])
        for i in range(b):
            g[i] = g[i] / math.sqrt(float((g[i] ** 2).sum()))
        return g

    return float(((gram(fs) - gram(ft)) ** 2).sum()) / b**2


def huber(x: float, beta: float = 1.0) -> float:
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def np_rkd_distance(es: np.ndarray, et: np.ndarray) -> float:
    b = es.shape[0]
    pairs = [(i, j) for i in range(b) for j in range(b) if i != j]

    def psi(e):
        e = e.reshape(b, -1).astype(np.float64)
        d = {p: math.sqrt(float(((e[p[0]] - e[p[1]]) ** 2).sum())) for p in pairs}
        mu = sum(d.values()) / len(d)
        return {p: v / mu for p, v in d.items()}

    ps, pt = psi(es), psi(et)
    return sum(huber(ps[p] - pt[p]) for p in pairs) / len(pairs)


def np_rkd_angle(es: np.ndarray, et: np.ndarray) -> float:
    b = es.shape[0]
    triplets = [(i, j, k) for i in range(b) for j in range(b) for k in range(b) if len({i, j, k}) == 3]

    def cosines(e):
        e = e.reshape(b, -1).astype(np.float64)
        out = {}
        for i, j, k in triplets:
            u, v = e[i] - e[j], e[k] - e[j]
            out[(i, j, k)] = float(np.dot(u, v)) / (np.linalg.norm(u) * np.linalg.norm(v))
        return out

    cs, ct = cosines(es), cosines(et)
    return sum(huber(cs[t] - ct[t]) for t in triplets) / len(triplets)


def np_pkt(es: np.ndarray, et: np.ndarray, eps: float = 1e-7) -> float:
    b = es.shape[0]

    def cond(e):
        e = e.reshape(b, -1).astype(np.float64)
        e = e / (np.linalg.norm(e, axis=1, keepdims=True) + eps)
        k = np.empty((b, b))
        for i in range(b):
            for j in range(b):
                k[i, j] = (float(np.dot(e[i], e[j])) + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    q, p = cond(es), cond(et)
    total = 0.0
    for i in range(b):
        for j in range(b):
            total += p[i, j] * math.log((p[i, j] + eps) / (q[i, j] + eps))
    return total / b


def np_cc_matrix(e: np.ndarray, gamma: float, order: int) -> np.ndarray:
    b = e.shape[0]
    e = e.reshape(b, -1).astype(np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    k = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            x = float(np.dot(e[i], e[j]))
            k[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * x**p for p in range(order + 1))
    return k


def np_cc(es, et, gamma, order):
    return float(((np_cc_matrix(es, gamma, order) - np_cc_matrix(et, gamma, order)) ** 2).mean())


# --------------------------------------------------------------------------- fixtures


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(value, ref, rel=1e-5, abs_=1e-6):
    assert float(value) == pytest.approx(ref, rel=rel, abs=abs_)


RELATIONS = {
    "sp": sp,
    "rkd": rkd,
    "rkd_distance": rkd_distance,
    "rkd_angle": rkd_angle,
    "pkt": pkt,
    "cc": cc,
}


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("seed", [0, 1])
def test_sp_matches_numpy_with_different_shapes(seed):
    fs = rand(5, 3, 2, 2, seed=seed)
    ft = rand(5, 6, 3, 3, seed=seed + 10)
    close(sp(fs, ft), np_sp(fs.numpy(), ft.numpy()))


def test_sp_flat_and_spatial_agree():
    fs, ft = rand(4, 2, 3, 3, seed=2), rand(4, 7, seed=3)
    close(sp(fs, ft), float(sp(fs.reshape(4, -1), ft)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rkd_terms_match_numpy(seed):
    es, et = rand(5, 4, seed=seed), rand(5, 7, seed=seed + 10) * 3
    s, t = es.numpy(), et.numpy()
    close(rkd_distance(es, et), np_rkd_distance(s, t))
    close(rkd_angle(es, et), np_rkd_angle(s, t))


@pytest.mark.parametrize("wd,wa", [(25.0, 50.0), (1.0, 0.0), (0.0, 2.0)])
def test_rkd_weights(wd, wa):
    es, et = rand(6, 3, seed=4), rand(6, 5, seed=5)
    s, t = es.numpy(), et.numpy()
    close(rkd(es, et, wd, wa), wd * np_rkd_distance(s, t) + wa * np_rkd_angle(s, t))


def test_rkd_scale_invariant():
    es, et = rand(5, 4, seed=6), rand(5, 4, seed=7)
    close(rkd(es * 5.0, et), float(rkd(es, et)), rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_pkt_matches_numpy(seed, eps):
    es, et = rand(6, 4, seed=seed), rand(6, 9, seed=seed + 10)
    close(pkt(es, et, eps), np_pkt(es.numpy(), et.numpy(), eps))


@pytest.mark.parametrize("gamma,order", [(0.4, 2), (0.4, 0), (1.0, 3), (0.1, 1)])
def test_cc_matches_numpy(gamma, order):
    es, et = rand(6, 8, seed=8), rand(6, 8, seed=9)
    close(cc(es, et, gamma, order), np_cc(es.numpy(), et.numpy(), gamma, order), rel=1e-4, abs_=1e-8)


def test_cc_high_order_approaches_exact_rbf():
    es = rand(5, 6, seed=10)
    e = es.numpy().astype(np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    exact = np.exp(-0.4 * ((e[:, None, :] - e[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(np_cc_matrix(es.numpy(), 0.4, 12), exact, rtol=1e-9)
    # and the loss against a zero-correlation teacher is the mean squared RBF matrix difference
    et = rand(5, 6, seed=11)
    close(cc(es, et, 0.4, 12), np_cc(es.numpy(), et.numpy(), 0.4, 12), rel=1e-4, abs_=1e-8)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", sorted(RELATIONS))
def test_zero_when_student_equals_teacher(name):
    e = rand(6, 5, seed=12)
    assert float(RELATIONS[name](e, e.clone())) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(RELATIONS))
def test_batch_order_invariance(name):
    es, et = rand(6, 5, seed=13), rand(6, 3, seed=14)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    close(RELATIONS[name](es[perm], et[perm]), float(RELATIONS[name](es, et)), rel=1e-5)


@pytest.mark.parametrize("name", sorted(RELATIONS))
def test_gradient_reaches_student_only(name):
    es = rand(6, 5, seed=15).requires_grad_(True)
    et = rand(6, 4, seed=16)
    RELATIONS[name](es, et).backward()
    assert es.grad is not None and torch.isfinite(es.grad).all() and es.grad.abs().sum() > 0
    assert et.grad is None and not et.requires_grad


@pytest.mark.parametrize("name", sorted(RELATIONS))
def test_finite_gradients_with_coinciding_and_zero_embeddings(name):
    base = rand(6, 5, seed=17)
    es = base.clone()
    es[1] = es[0]  # two coinciding student embeddings
    es[2] = 0.0  # a zero embedding
    es.requires_grad_(True)
    et = rand(6, 5, seed=18)
    et[3] = et[4]
    value = RELATIONS[name](es, et)
    assert torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, es)
    assert torch.isfinite(grad).all()


def test_rkd_coinciding_embeddings_value():
    es, et = rand(5, 3, seed=19), rand(5, 3, seed=20)
    es[1] = es[0]
    close(rkd_distance(es, et), np_rkd_distance(es.numpy(), et.numpy()))


def test_batch_size_mismatch_raises():
    with pytest.raises(ValueError):
        sp(rand(4, 3), rand(5, 3))
    with pytest.raises(ValueError):
        rkd(rand(4, 3), rand(5, 3))


def test_rkd_angle_small_batch_is_zero():
    es = rand(2, 3, seed=21).requires_grad_(True)
    value = rkd_angle(es, rand(2, 3, seed=22))
    assert value.item() == 0.0
    value.backward()
