"""Reference parity of CRD (RepDistiller) and ReviewKD (mdistiller) on fixed weights and a fixed batch, in float64.

The fixtures (tests/fixtures/parity/{crd,reviewkd}.json) hold the reference's total training loss and the L2
norm of the student's gradient for one step, with their provenance; here the same recipe is built as the engine
builds it and must give the same two numbers to 1e-5 relative.

CRD's negatives are random: the reference's dataset drew each sample's contrast set with numpy seeded with the
fixture's `contrast_seed`; `class_contrast` draws exactly those indices again and kdflow's criterion takes them
through `CRDLoss.use_contrast` (its own sampler is tested in tests/test_crd_sampling.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parity_harness import build_flow, class_contrast, fixed_batch, loss_and_grad_norm, read_fixture, rel, split_labels

TOL = 1e-5
CRD = read_fixture("crd")
CRD_CASES = [("crd", [], pair, v) for pair, v in CRD["values"].items()] + [
    (spec.get("method", "crd"), spec["overrides"], pair, v)
    for spec in CRD["variants"].values()
    for pair, v in spec["values"].items()
]


@pytest.mark.parametrize("method,overrides,pair,expected", CRD_CASES, ids=[f"{c[0]}-{c[2]}-{'+'.join(c[1]) or 'exact'}" for c in CRD_CASES])
def test_crd_matches_repdistiller(tmp_path: Path, method: str, overrides: list[str], pair: str, expected: dict) -> None:
    batch = fixed_batch(CRD["inputs"]["batch_size"], CRD["inputs"]["seed"], CRD["inputs"]["num_data"])
    labels = split_labels(batch)
    if method == "crd+kd":
        overrides = [o.replace("method.", "method.0.") for o in overrides]
    flow = build_flow(method, pair, tmp_path, overrides, batch=batch, train_labels=labels)
    crd = flow.criterion_modules["0"].crd
    mode = "relax" if "method.mode=relax" in overrides else "exact"
    assert crd.mode == mode
    crd.use_contrast(class_contrast(labels, batch.index, CRD["inputs"]["nce_k"], mode, CRD["inputs"]["contrast_seed"]))
    loss, norm, _ = loss_and_grad_norm(flow, batch)
    assert rel(loss, expected["loss"]) <= TOL, (loss, expected["loss"])
    assert rel(norm, expected["grad_norm"]) <= TOL, (norm, expected["grad_norm"])


def test_crd_contrast_is_the_exact_modes_sets() -> None:
    """The fixture's contrast sets follow exact mode: the sample itself first, then only other classes' samples."""
    batch = fixed_batch(CRD["inputs"]["batch_size"], CRD["inputs"]["seed"], CRD["inputs"]["num_data"])
    labels = split_labels(batch)
    c = class_contrast(labels, batch.index, CRD["inputs"]["nce_k"], "exact", CRD["inputs"]["contrast_seed"])
    assert torch.equal(c[:, 0], batch.index)
    assert not (labels[c[:, 1:]] == batch.y.unsqueeze(1)).any()


REVIEWKD = read_fixture("reviewkd")
REVIEWKD_CASES = [(pair, REVIEWKD["inputs"]["epoch"], v) for pair, v in REVIEWKD["values"].items()] + [
    (pair, spec["epoch"], v) for spec in REVIEWKD["variants"].values() for pair, v in spec["values"].items()
]


@pytest.mark.parametrize("pair,epoch,expected", REVIEWKD_CASES, ids=[f"{c[0]}-epoch{c[1]}" for c in REVIEWKD_CASES])
def test_reviewkd_matches_mdistiller(tmp_path: Path, pair: str, epoch: int, expected: dict) -> None:
    """All stages and the pooled embedding (4 levels on resnet8x4, 5 on MobileNetV2), the warm-up as mdistiller's."""
    batch = fixed_batch(REVIEWKD["inputs"]["batch_size"], REVIEWKD["inputs"]["seed"])
    flow = build_flow("reviewkd", pair, tmp_path, REVIEWKD["inputs"]["overrides"], batch=batch)
    loss, norm, _ = loss_and_grad_norm(flow, batch, epoch=epoch)
    assert rel(loss, expected["loss"]) <= TOL, (loss, expected["loss"])
    assert rel(norm, expected["grad_norm"]) <= TOL, (norm, expected["grad_norm"])
