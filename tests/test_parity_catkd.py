"""Reference parity of CAT-KD (Guo et al. 2023): recipes/methods/catkd.yaml, composed with the CIFAR-100 protocol and
a pair as the engine builds it, on the harness's fixed float64 weights and batch, against the authors' CAT_KD distiller
(tests/fixtures/parity/catkd.json, made by running GzyAftermath/CAT-KD's mdistiller/distillers/CAT_KD.py with each
pair's own config file; see the fixture's provenance).

The authors' student is a `*_test` model whose classifier is a bias-free 1×1 convolution; kdflow's zoo student has an
`nn.Linear` with a bias. The check therefore zeroes the student's classifier bias (so its cross-entropy is the
reference's) and leaves that bias out of the gradient norm (the reference has no such parameter).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parity_harness import build_flow, fixed_batch, read_fixture, rel

FIXTURE = read_fixture("catkd")
PAIRS = list(FIXTURE["values"])
TOL = 1e-10
CLASSIFIER_BIAS = {"resnet32x4-resnet8x4": "fc.bias", "vgg13-MobileNetV2": "classifier.0.bias", "resnet32x4-ShuffleV2": "linear.bias"}


def loss_and_grad_norm(pair: str, tmp: Path, weight_scale: float = 1.0) -> tuple[float, float, dict]:
    inputs = FIXTURE["inputs"]
    batch = fixed_batch(inputs["batch_size"], inputs["seed"])
    overrides = list(inputs["overrides"][pair])
    if weight_scale != 1.0:
        weight = next((float(o.split("=", 1)[1]) for o in overrides if o.startswith("method.weight=")), 15.0)
        overrides = [o for o in overrides if not o.startswith("method.weight=")] + [f"method.weight={weight * weight_scale!r}"]
    flow = build_flow("catkd", pair, tmp, overrides, batch=batch)
    student = flow.models["student"]
    bias_name = CLASSIFIER_BIAS[pair]
    with torch.no_grad():
        dict(student.named_parameters())[bias_name].zero_()
    spec = flow.stages[-1]
    flow.set_stage_modes(spec)
    flow.zero_grad(set_to_none=True)
    out = flow(batch.x, batch.y, spec, inputs["epoch"], batch.index)
    out.total.backward()
    grads = [p.grad.flatten() for name, p in student.named_parameters() if p.grad is not None and name != bias_name]
    return out.total.item(), torch.cat(grads).norm().item(), {k: float(v.detach()) for k, v in out.terms.items()}


def test_fixture_records_its_provenance() -> None:
    ref = FIXTURE["reference"]
    assert ref["repository"] == "GzyAftermath/CAT-KD" and len(ref["commit"]) == 40 and ref["function"]
    assert set(PAIRS) == {"resnet32x4-resnet8x4", "vgg13-MobileNetV2", "resnet32x4-ShuffleV2"}


@pytest.mark.parametrize("pair", PAIRS)
def test_catkd_equals_the_authors_loss(pair: str, tmp_path: Path) -> None:
    """Total loss (CE + β·CAT) and the student's gradient norm equal the authors' training step's."""
    want = FIXTURE["values"][pair]
    loss, norm, terms = loss_and_grad_norm(pair, tmp_path)
    assert rel(loss, want["loss"]) <= TOL, (loss, want, terms)
    assert rel(norm, want["grad_norm"]) <= TOL, (norm, want["grad_norm"])


def test_a_wrong_weight_is_caught(tmp_path: Path) -> None:
    """The check can fail: 1% more CAT weight moves the total far beyond the tolerance."""
    pair = "resnet32x4-ShuffleV2"
    loss, _, _ = loss_and_grad_norm(pair, tmp_path, weight_scale=1.01)
    assert rel(loss, FIXTURE["values"][pair]["loss"]) > 1e-4
