"""Reference parity of the feature methods FitNet, VID, AB, FT, FSP and OFD.

Each method's documented composition (recipes/cifar100/protocol.yaml + pairs/PAIR.yaml + methods/METHOD.yaml),
built as the engine builds it on the harness's fixed weights and batch in float64, gives the training loss and
the L2 norm of the student's gradient that the reference implementation's own training step gives (to 1e-5
relative), in every stage the fixture records: the student stage, and the init stage of AB, FSP and FT
(the paraphraser's; the student gets no gradient there). The numbers come from RepDistiller (FitNet, VID,
AB, FT, FSP: helper/loops.py train_distill and helper/pretrain.py init) and mdistiller (OFD:
OFD.forward_train through BaseTrainer.train_iter); each fixture says how its helpers were matched.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from parity_harness import build_flow, fixed_batch, loss_and_grad_norm, read_fixture, rel

METHODS = ["fitnet", "vid", "ab", "ft", "fsp", "ofd"]
CASES = [(m, pair, stage) for m in METHODS for pair, stages in read_fixture(m)["values"].items() for stage in stages]


@pytest.fixture(scope="module")
def flows(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One Flow per (method, pair), shared by its stages (each stage's step sets its own modes and gradients)."""
    return {"dir": tmp_path_factory.mktemp("parity")}


def flow_for(flows: dict, method: str, pair: str):
    if (method, pair) not in flows:
        fixture = read_fixture(method)
        batch = fixed_batch(fixture["inputs"]["batch_size"], fixture["inputs"]["seed"])
        flows[(method, pair)] = build_flow(method, pair, flows["dir"], fixture["inputs"]["overrides"], batch=batch), batch
    return flows[(method, pair)]


@pytest.mark.parametrize("method,pair,stage", CASES, ids=["-".join(c) for c in CASES])
def test_loss_and_gradient_match_the_reference(flows: dict, method: str, pair: str, stage: str) -> None:
    fixture = read_fixture(method)
    flow, batch = flow_for(flows, method, pair)
    loss, norm, _ = loss_and_grad_norm(flow, batch, stage, fixture["inputs"]["epoch"])
    want = fixture["values"][pair][stage]
    assert rel(loss, want["loss"]) <= 1e-5, (loss, want["loss"])
    if want["grad_norm"] == 0.0:  # FT's paraphrase stage trains the paraphraser alone
        assert norm == 0.0
    else:
        assert rel(norm, want["grad_norm"]) <= 1e-5, (norm, want["grad_norm"])


def test_every_method_has_both_pairs() -> None:
    """Both pairs where the method can run: FSP needs equal channel counts (not so across families), and
    mdistiller's OFD cannot run vgg13->MobileNetV2 (no pre-activations), so OFD's second pair is ShuffleV2."""
    pairs = {m: set(read_fixture(m)["values"]) for m in METHODS}
    assert all("resnet32x4-resnet8x4" in p for p in pairs.values())
    assert all(len(p) == 2 for m, p in pairs.items() if m != "fsp")
    assert {"init", "main"} <= set(read_fixture("fsp")["values"]["resnet32x4-resnet8x4"])


def test_ofd_teacher_in_eval_mode_would_differ(tmp_path: Path) -> None:
    """The reference runs OFD's teacher with batch statistics; with running statistics the loss moves."""
    pair = "resnet32x4-resnet8x4"
    batch = fixed_batch(read_fixture("ofd")["inputs"]["batch_size"])
    flow = build_flow("ofd", pair, tmp_path, ["method.teacher_batch_norm=running"], batch=batch)
    loss, _, _ = loss_and_grad_norm(flow, batch)
    assert rel(loss, read_fixture("ofd")["values"][pair]["main"]["loss"]) > 1e-3


def test_fsp_across_families_is_refused_at_build(tmp_path: Path) -> None:
    """As the reference's FSP raises for unequal channels, the build names the transfer and the channel counts."""
    from kdflow.flow import RecipeError

    with pytest.raises(RecipeError, match=r"^transfers\.0: criterion 'fsp' cannot compare these taps: fsp needs equal "
                                          r"channel counts at every layer: student \[.*\], teacher \[64, 128, 256, 512, 512\]$"):
        build_flow("fsp", "vgg13-MobileNetV2", tmp_path, batch=fixed_batch(8))
