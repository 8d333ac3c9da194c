"""The CIFAR-100 benchmark zoo: exact parameter counts, tap names, and the FLOP counter."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdflow.flow.taps import TapRecorder, last_linear_name
from kdflow.models import MODELS, build_model, count_parameters
from kdflow.models.flops import count_flops, stage_shapes

SHAPE = (3, 32, 32)

# the CRD/RepDistiller benchmark's models at 100 classes
PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "ResNet50": 23_705_252,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
}

STAGES = {name: 3 for name in PARAMS}
# the benchmark's feature list without stem and embedding (RepDistiller models/*.py, forward(is_feat=True)):
# VGG's block0 is its stem, so a VGG has 4 stages
STAGES.update({"ResNet50": 4, "MobileNetV2": 4, **{v: 4 for v in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")}})

# models whose stage outputs follow a ReLU (MobileNetV2's linear bottlenecks do not)
RELU_STAGES = {"resnet8", "vgg8", "ShuffleV1", "ShuffleV2"}
# pre-activation WRNs: a stage is the raw residual sum, its activation is the next block's BN-ReLU (stageK_act)
ACT_STAGES = {"wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"}


@pytest.mark.parametrize("arch", sorted(PARAMS))
def test_parameter_count_and_tap_names(arch):
    torch.manual_seed(0)
    model = build_model(arch, 100, SHAPE)
    assert count_parameters(model) == PARAMS[arch]
    # every alias names a real module; the stage set is complete
    modules = dict(model.named_modules())
    expected = {"stem"} | {f"stage{k}{s}" for k in range(1, STAGES[arch] + 1) for s in ("", "_pre")}
    assert expected <= set(model.tap_names)
    assert f"stage{STAGES[arch] + 1}" not in model.tap_names
    for alias, name in model.tap_names.items():
        assert name in modules, (alias, name)
    # the classifier is the last nn.Linear, so the generic `embedding` tap is the pooled features
    last = modules[last_linear_name(model)]
    assert last.out_features == 100
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1


def test_all_registered():
    assert set(PARAMS) <= set(MODELS)


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_forward_and_taps(arch):
    torch.manual_seed(0)
    model = build_model(arch, 100, SHAPE)
    x = torch.randn(2, *SHAPE)
    taps = set(model.tap_names) | {"embedding"}
    recorder = TapRecorder("student", model, taps)
    with torch.no_grad():
        values = recorder.run(x)  # raises if a captured value was overwritten in place (e.g. inplace ReLU)
    recorder.remove()
    assert values["logits"].shape == (2, 100)
    assert set(values) == taps | {"logits"}
    embedding = values["embedding"]
    assert embedding.dim() == 2 and embedding.shape[0] == 2
    last_stage = values[f"stage{STAGES[arch]}" + ("_act" if arch in ACT_STAGES else "")]
    if arch not in ("MobileNetV2", "ShuffleV2"):  # those two have a 1×1 conv head after the last stage
        assert torch.allclose(embedding, last_stage.mean(dim=(2, 3)), atol=1e-5)
    for k in range(1, STAGES[arch] + 1):
        pre, post = values[f"stage{k}_pre"], values[f"stage{k}"]
        assert pre.shape == post.shape and pre.shape[0] == 2
        if arch in ACT_STAGES:
            assert (post < 0).any(), "a WRN stage is the raw residual sum"
            assert torch.equal(F.relu(pre), values[f"stage{k}_act"])
        elif arch in RELU_STAGES:
            assert (pre < 0).any(), "the pre-activation tap should hold negative values"
            assert torch.equal(F.relu(pre), post)
        else:
            assert torch.equal(pre, post)


def test_pre_relu_without_taps_matches_plain_forward():
    """Tapping must not change the logits (the hooks only read)."""
    torch.manual_seed(0)
    model = build_model("resnet8", 100, SHAPE).eval()
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        plain = model(x)
        tapped = TapRecorder("t", model, set(model.tap_names)).run(x)["logits"]
    assert torch.equal(plain, tapped)


def test_stage_shapes():
    model = build_model("resnet8", 100, SHAPE)
    shapes = stage_shapes(model, SHAPE)
    assert shapes == {
        "stem": (16, 32, 32),
        "stage1": (16, 32, 32),
        "stage1_pre": (16, 32, 32),
        "stage2": (32, 16, 16),
        "stage2_pre": (32, 16, 16),
        "stage3": (64, 8, 8),
        "stage3_pre": (64, 8, 8),
    }
    assert model.training  # the mode is restored
    mbv2 = stage_shapes(build_model("MobileNetV2", 100, SHAPE), SHAPE)
    assert [mbv2[f"stage{k}"] for k in range(1, 5)] == [(12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)]
    vgg = stage_shapes(build_model("vgg8", 100, SHAPE), SHAPE)
    assert vgg["stem"] == (64, 32, 32)
    assert [vgg[f"stage{k}"] for k in range(1, 5)] == [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]


def test_count_flops_tiny_model():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # 8×4×4 outputs, 3·3·3 MACs each: 3456
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False),  # 8×4×4 outputs, (8/2)·3·3 MACs each: 4608
        nn.BatchNorm2d(8),  # not counted
        nn.Flatten(),
        nn.Linear(128, 10),  # 1280
    )
    assert count_flops(model, (3, 8, 8)) == 3456 + 4608 + 1280
    assert model.training


def _cifar_resnet_macs(depth: int, widths: tuple[int, int, int, int], classes: int = 100) -> int:
    """MACs of the benchmark's basic-block CIFAR ResNet, by hand from its layer list."""
    n = (depth - 2) // 6
    macs = 32 * 32 * widths[0] * 3 * 9
    cin = widths[0]
    for k, (w, r) in enumerate(zip(widths[1:], (32, 16, 8))):
        area = r * r
        macs += area * w * cin * 9 + area * w * w * 9  # first block
        if k > 0 or cin != w:
            macs += area * w * cin  # 1×1 projection shortcut
        macs += (n - 1) * 2 * area * w * w * 9
        cin = w
    return macs + cin * classes


def test_count_flops_cifar_resnets():
    small = count_flops(build_model("resnet8", 100, SHAPE), SHAPE)
    assert small == _cifar_resnet_macs(8, (16, 16, 32, 64))
    r8x4 = count_flops(build_model("resnet8x4", 100, SHAPE), SHAPE)
    assert r8x4 == _cifar_resnet_macs(8, (32, 64, 128, 256))
    assert 0.17e9 < r8x4 < 0.19e9  # the benchmark tables' 0.18 GMACs
    r32x4 = count_flops(build_model("resnet32x4", 100, SHAPE), SHAPE)
    assert r32x4 == _cifar_resnet_macs(32, (32, 64, 128, 256))
    assert 1.0e9 < r32x4 < 1.15e9  # 1.08 GMACs
