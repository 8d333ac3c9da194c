"""A frozen node with `batch_norm: batch` normalises with each batch's statistics (as OFD's reference runs its
teacher in train mode) without changing its running statistics or its modules' modes."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from kdflow.flow.batch_norm import batch_statistics
from kdflow.models import build_model


def test_batch_statistics_equal_train_mode_and_leave_the_model_unchanged() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", 10, (3, 32, 32)).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = copy.deepcopy(model).train()(x)  # plain train mode: batch statistics
        eval_out = model(x)
        with torch.inference_mode(), batch_statistics(model):
            got = model(x)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, eval_out, atol=1e-3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # running stats untouched
    assert not any(m.training for m in model.modules()) and all(
        m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
