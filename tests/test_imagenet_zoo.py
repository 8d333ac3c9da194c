"""The 224×224 ImageNet zoo: standard parameter counts, forward passes and tap names (on small inputs)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdflow.flow.taps import TapRecorder, last_linear_name
from kdflow.models import MODELS, build_model, count_parameters
from kdflow.models.flops import stage_shapes

# torchvision's / the benchmark's counts at 1000 classes
PARAMS = {
    "resnet18_imagenet": 11_689_512,
    "resnet34_imagenet": 21_797_672,
    "resnet50_imagenet": 25_557_032,
    "mobilenetv1_imagenet": 4_231_976,
}
SMALL = (3, 64, 64)  # the taps and shapes do not need 224×224
EXPECTED_TAPS = {"stem"} | {f"stage{k}{s}" for k in range(1, 5) for s in ("", "_pre")}


def test_all_registered_without_clash():
    assert set(PARAMS) <= set(MODELS)
    assert "ResNet50" in MODELS  # the CIFAR ResNet50 keeps its name


@pytest.mark.parametrize("arch", sorted(PARAMS))
def test_parameter_count_and_tap_names(arch):
    model = build_model(arch, 1000, (3, 224, 224))
    assert count_parameters(model) == PARAMS[arch]
    assert set(model.tap_names) == EXPECTED_TAPS
    modules = dict(model.named_modules())
    for alias, name in model.tap_names.items():
        assert name in modules, (alias, name)
    # the classifier is the only and last nn.Linear, so `embedding` is the pooled last stage
    assert modules[last_linear_name(model)].out_features == 1000
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1


@pytest.mark.parametrize("arch", ["resnet18_imagenet", "mobilenetv1_imagenet"])
def test_forward_and_every_tap(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10, SMALL)
    x = torch.randn(2, *SMALL)
    taps = set(model.tap_names) | {"embedding"}
    recorder = TapRecorder("student", model, taps)
    with torch.no_grad():
        values = recorder.run(x)  # raises if an in-place op overwrote a captured value
    recorder.remove()
    assert values["logits"].shape == (2, 10)
    assert set(values) == taps | {"logits"}
    assert torch.allclose(values["embedding"], values["stage4"].mean(dim=(2, 3)), atol=1e-5)
    for k in range(1, 5):
        pre, post = values[f"stage{k}_pre"], values[f"stage{k}"]
        assert (pre < 0).any(), "the pre-activation tap should hold negative values"
        assert torch.equal(F.relu(pre), post)
    with torch.no_grad():
        model.eval()
        plain = model(x[:1])
        one = TapRecorder("t", model, set(model.tap_names)).run(x[:1])["logits"]
    assert plain.shape == (1, 10) and torch.equal(plain, one)


def test_stage_shapes_on_small_inputs():
    r18 = stage_shapes(build_model("resnet18_imagenet", 10, SMALL), SMALL)
    assert r18["stem"] == (64, 16, 16)
    assert [r18[f"stage{k}"] for k in range(1, 5)] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert all(r18[f"stage{k}_pre"] == r18[f"stage{k}"] for k in range(1, 5))
    mb = stage_shapes(build_model("mobilenetv1_imagenet", 10, SMALL), SMALL)
    assert mb["stem"] == (32, 32, 32)
    assert [mb[f"stage{k}"] for k in range(1, 5)] == [(128, 16, 16), (256, 8, 8), (512, 4, 4), (1024, 2, 2)]


def test_resnet50_relu_of_pre_equals_stage():
    torch.manual_seed(0)
    model = build_model("resnet50_imagenet", 10, SMALL)
    with torch.no_grad():
        values = TapRecorder("teacher", model, set(model.tap_names)).run(torch.randn(1, *SMALL))
    assert [values[f"stage{k}"].shape[1] for k in range(1, 5)] == [256, 512, 1024, 2048]
    for k in range(1, 5):
        assert torch.equal(F.relu(values[f"stage{k}_pre"]), values[f"stage{k}"])


def test_rejects_non_images():
    with pytest.raises(ValueError, match="C×H×W"):
        build_model("resnet18_imagenet", 10, (3, 64))
