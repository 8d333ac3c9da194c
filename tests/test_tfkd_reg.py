"""Tf-KD_reg (Yuan et al. 2020): the released form against numpy and against the authors' loss (fixture)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdflow.losses import tfkd_reg_ce
from kdflow.losses import tfkd_reg, tfkd_reg_released
from parity_harness import build_flow, fixed_batch, loss_and_grad_norm, read_fixture, rel


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_released(z: np.ndarray, y: np.ndarray, a: float, tau: float, multiplier: float) -> float:
    """multiplier · mean over all B·C elements of q·(log q − log softmax(z)), q = softmax(p^d / τ)."""
    b, c = z.shape
    p_d = np.full((b, c), (1 - a) / (c - 1))
    p_d[np.arange(b), y] = a
    log_q = np_log_softmax(p_d / tau)
    return float(multiplier * (np.exp(log_q) * (log_q - np_log_softmax(z))).mean())


def np_ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np_log_softmax(z)[np.arange(len(y)), y].mean())


def logits(b: int = 6, c: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(b, c, generator=g, dtype=torch.float64), torch.randint(0, c, (b,), generator=g)


@pytest.mark.parametrize("a,tau,multiplier", [(0.99, 20.0, 100.0), (0.9, 40.0, 1.0), (0.5, 1.0, 3.0)])
def test_released_form_matches_numpy(a: float, tau: float, multiplier: float) -> None:
    z, y = logits()
    value = tfkd_reg_released(z, y, a, tau, multiplier)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(np_released(z.numpy(), y.numpy(), a, tau, multiplier), rel=1e-12)


def test_released_form_is_not_a_rescaled_paper_form() -> None:
    """Two logit sets whose paper-form values are in one ratio have released-form values in another."""
    (z1, y), (z2, _) = logits(seed=1), logits(seed=2)
    paper = tfkd_reg(z1, y) / tfkd_reg(z2, y)
    released = tfkd_reg_released(z1, y) / tfkd_reg_released(z2, y)
    assert abs(paper.item() - released.item()) > 1e-3 * abs(released.item())


def test_supervision_sums_ce_and_the_chosen_form() -> None:
    z, y = logits(seed=3)
    zn, yn = z.numpy(), y.numpy()
    got = tfkd_reg_ce(z, y, alpha=0.1, form="released", multiplier=100.0)
    assert got.item() == pytest.approx(0.9 * np_ce(zn, yn) + 0.1 * np_released(zn, yn, 0.99, 20.0, 100.0), rel=1e-12)
    paper = tfkd_reg_ce(z, y, alpha=0.1)
    assert paper.item() == pytest.approx(0.9 * np_ce(zn, yn) + 0.1 * tfkd_reg(z, y).item(), rel=1e-12)
    with pytest.raises(ValueError, match="form"):
        tfkd_reg_ce(z, y, form="code")


def test_released_form_matches_the_authors_loss(tmp_path: Path) -> None:
    fixture = read_fixture("tfkd_reg")
    batch = fixed_batch(fixture["inputs"]["batch_size"], fixture["inputs"]["seed"])
    for pair, expected in fixture["values"].items():
        flow = build_flow("tfkd_reg", pair, tmp_path, fixture["inputs"]["overrides"], batch=batch)
        loss, norm, _ = loss_and_grad_norm(flow, batch)
        assert rel(loss, expected["loss"]) <= 1e-10 and rel(norm, expected["grad_norm"]) <= 1e-10
