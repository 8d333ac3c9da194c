"""WTTM (Zheng and Yang 2024) against numpy, and the logit-standardization transfer field on any logit criterion."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdflow import losses
from kdflow.flow import RecipeError
from kdflow.methods import method_graph
from kdflow.methods.recipe import resolve


def wttm_numpy(zs: np.ndarray, zt: np.ndarray, gamma: float) -> float:
    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    pt = softmax(zt) ** gamma
    u = pt.sum(1)
    pt = pt / u[:, None]
    ps = softmax(zs)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(1)
    return float((u * kl).mean())


@pytest.mark.parametrize("gamma", [0.1, 0.2, 0.5, 1.0])
def test_wttm_matches_numpy(gamma):
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(8, 7, generator=g, dtype=torch.float64), 3 * torch.randn(8, 7, generator=g, dtype=torch.float64)
    assert float(losses.wttm(zs, zt, gamma)) == pytest.approx(wttm_numpy(zs.numpy(), zt.numpy(), gamma), rel=1e-10)


def test_wttm_at_gamma_one_is_plain_kl_and_zero_when_matched():
    zt = torch.randn(5, 4, dtype=torch.float64)
    # γ = 1: U = 1 and p̃_t = p_t, so WTTM is KL(p_t ‖ p_s) at temperature 1 (KD at τ = 1)
    zs = torch.randn(5, 4, dtype=torch.float64)
    assert float(losses.wttm(zs, zt, 1.0)) == pytest.approx(float(losses.kd(zs, zt, 1.0)), rel=1e-12)
    # the student matching the transformed teacher (z_s = γ·z_t) makes the loss 0
    assert float(losses.wttm(0.3 * zt, zt, 0.3)) == pytest.approx(0.0, abs=1e-12)


def _kd_recipe(**transfer) -> dict:
    graph = method_graph("kd")
    graph["transfers"][0].update(transfer)
    nodes = {"teacher": {"arch": "mlp", "checkpoint": "memory:"}, "student": {"arch": "mlp"}}
    return {"data": {"name": "external"}, **graph, "nodes": {n: {**graph["nodes"][n], **nodes[n]} for n in nodes}}


def test_logit_standardization_is_a_transfer_field_on_logits_only():
    recipe = resolve(_kd_recipe(logit_standardization=True))
    assert recipe.transfers[0].logit_standardization is True and "logit_standardization" not in recipe.transfers[0].params
    with pytest.raises(RecipeError, match=r"logit_standardization: z-scores logits, but 'teacher.embedding' is not a logits tap"):
        resolve(_kd_recipe(logit_standardization=True, **{"from": "teacher.embedding", "to": "student.embedding"}))


@pytest.mark.parametrize("method", ["kd", "dkd", "dist", "nkd", "wttm"])
def test_every_logit_method_takes_the_switch(method):
    off, on = method_graph(method), method_graph(method, logit_standardization=True)
    assert "logit_standardization" not in off["transfers"][0]  # absent when off: recipes and hashes as before
    assert on["transfers"][0]["logit_standardization"] is True


def test_the_flow_standardizes_both_sides_before_the_criterion():
    """A KD transfer with the field equals KD on z-scored logits; without it, KD on the raw logits."""
    from kdflow.api import Distiller
    import kdflow

    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    with torch.no_grad():
        zt, zs = teacher(x), student(x)
    for on in (False, True):
        d = Distiller(kdflow.methods.kd(teacher=teacher, student=student, logit_standardization=on))
        term = next(v for k, v in d(x, y).terms.items() if k.startswith("kd("))
        Z = losses.standardize if on else (lambda z: z)
        assert float(term.detach()) == pytest.approx(float(losses.kd(Z(zs), Z(zt), 4.0)), rel=1e-6)
