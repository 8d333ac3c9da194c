"""Taps: forward hooks capture the named module's output (or input), by name or alias."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kdflow.flow.errors import RecipeError
from kdflow.flow.taps import TapRecorder
from kdflow.models import build_model


def test_hook_captures_named_module_output_and_embedding() -> None:
    torch.manual_seed(0)
    model = build_model("convnet_s", 4, (1, 8, 8)).eval()
    x = torch.randn(3, 1, 8, 8)
    values = TapRecorder("s", model, {"logits", "stage1", "stage2.1", "embedding", "fc:input"}).run(x)
    with torch.no_grad():
        stem = model.stem(x)
        stage1 = model.stage1(stem)
        conv = model.stage2[1](model.stage2[0](stage1))  # stage2 = [pool, conv, bn, relu]
        embedding = torch.flatten(model.pool(model.stage2(stage1)), 1)
        logits = model(x)
    assert torch.equal(values["stage1"], stage1)
    assert torch.equal(values["stage2.1"], conv)
    assert torch.equal(values["embedding"], embedding)
    assert torch.equal(values["fc:input"], embedding)
    assert torch.equal(values["logits"], logits)


def test_unknown_module_lists_nearest_names() -> None:
    model = build_model("convnet_s", 4, (1, 8, 8))
    with pytest.raises(RecipeError, match=r"tap s\.stage5: no module 'stage5' in ConvNet; nearest: .*stage1"):
        TapRecorder("s", model, {"stage5"})


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.block(x)))


def test_module_running_twice_is_an_error_unless_the_call_is_named() -> None:
    model = Twice()
    rec = TapRecorder("m", model, {"block"})
    with pytest.raises(RecipeError, match=r"ran twice in one forward pass; say which call with block@K"):
        rec.run(torch.randn(2, 4))
    x = torch.randn(2, 4)
    values = TapRecorder("m", model, {"block@1", "block@2"}).run(x)
    with torch.no_grad():
        first = model.block(x)
        assert torch.equal(values["block@1"], first) and torch.equal(values["block@2"], model.block(first))
    with pytest.raises(RecipeError, match=r"tap m\.block@3: the module ran 2 time\(s\)"):
        TapRecorder("m", model, {"block@3"}).run(x)


class PreReLU(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.lin(x)))


def test_value_overwritten_in_place_is_detected() -> None:
    x = torch.randn(5, 4)
    with pytest.raises(RecipeError, match="modified in place"):
        TapRecorder("m", PreReLU(inplace=True), {"lin"}).run(x)
    model = PreReLU(inplace=False)
    values = TapRecorder("m", model, {"lin"}).run(x)
    assert (values["lin"] < 0).any()  # the pre-activation, negatives intact
    assert torch.equal(values["lin"], model.lin(x))


class Aliased(PreReLU):
    tap_names = {"pre": "lin"}


class TupleOut(PreReLU):
    def forward(self, x: torch.Tensor):
        logits = super().forward(x)
        return {"logits": logits, "aux": logits * 2}


def test_alias_and_dict_output() -> None:
    x = torch.randn(2, 4)
    model = Aliased(inplace=False)
    values = TapRecorder("m", model, {"pre"}).run(x)
    assert torch.equal(values["pre"], model.lin(x))
    with pytest.raises(RecipeError, match="nearest: pre"):
        TapRecorder("m", model, {"pree"})
    model = TupleOut(inplace=False)
    assert torch.equal(TapRecorder("m", model, set()).run(x)["logits"], model(x)["logits"])


def test_hooks_are_silent_outside_run() -> None:
    model = Twice()
    rec = TapRecorder("m", model, {"fc"})
    model(torch.randn(2, 4))  # an ordinary forward records nothing, so no "ran twice" error later
    assert rec.run(torch.randn(2, 4))["fc"].shape == (2, 2)
