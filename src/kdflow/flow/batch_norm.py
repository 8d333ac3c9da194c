"""Frozen nodes whose batch norms normalise with the batch's own statistics.

A frozen node runs in eval mode: its batch norms use their running statistics. Some reference
implementations run the teacher in train mode instead (OFD's authors' code, `t_net.train()`), so
its batch norms use each batch's mean and variance. `batch_statistics` gives that behaviour for
one forward pass without touching the node's state: the running statistics are neither used nor
updated, and every batch norm's mode is restored afterwards.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Inside the block, every batch norm of `model` normalises with the batch's statistics."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    try:
        for m in norms:
            m.training = True
            m.track_running_stats = False  # the running buffers are then neither read nor written
        yield
    finally:
        for m, (training, track) in zip(norms, saved):
            m.training, m.track_running_stats = training, track
