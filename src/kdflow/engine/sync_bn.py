"""Synchronised batch norm for multi-process runs (`train.sync_bn`), on any device.

`torch.nn.SyncBatchNorm` refuses CPU tensors (torch 2.13: "expected input tensor to be on GPU"),
so gloo runs cannot use it. This is its equivalent: in training mode, under an initialised
process group of more than one process, a batch norm normalises with the statistics of the
global batch (every rank's shard): per channel, the sums of (x − k) and (x − k)² and the
element count are all-reduced in one collective (k = the running mean, detached, identical on
every rank: a shift that keeps E[(x−k)²] − E[x−k]² accurate in float32). The all-reduce is
autograd-aware (`torch.distributed.nn.functional.all_reduce`), so the backward pass all-reduces
the statistics' gradients and each rank's gradient is that of the global batch's normalisation.
The running statistics are updated from the global mean and the unbiased global variance,
as one process over the global batch would. In eval mode, or without a process group, it is
the ordinary batch norm.

`convert_batch_norms` changes the class of a module's batch norms in place (BatchNorm2d →
SyncedBatchNorm2d, a subclass), rather than replacing the modules: parameters, buffers,
state-dict keys and forward hooks (the taps on a batch norm, `stageK_pre`) stay as they are,
and the checkpoints are ordinary batch-norm weights.

Every rank must call a converted batch norm the same number of times per step (the collective
would wait otherwise), as with `torch.nn.SyncBatchNorm`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_reduce


class _Synced:
    """The forward pass of a synchronised batch norm (mixed into the torch batch-norm classes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        shift = (self.running_mean.detach().float() if self.running_mean is not None else xf.new_zeros(c)).view(shape)
        d = xf - shift
        local_count = xf.new_full((1,), float(x.numel() // c))
        total = all_reduce(torch.cat([d.sum(dims), d.pow(2).sum(dims), local_count]))
        n = total[-1]
        mean_d = total[:c] / n
        var = (total[c : 2 * c] / n - mean_d.pow(2)).clamp_min(0)
        mean = mean_d + shift.view(c)
        out = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - f).add_(mean.detach().to(self.running_mean.dtype), alpha=f)
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        return out.to(x.dtype)


class SyncedBatchNorm1d(_Synced, nn.BatchNorm1d):
    pass


class SyncedBatchNorm2d(_Synced, nn.BatchNorm2d):
    pass


class SyncedBatchNorm3d(_Synced, nn.BatchNorm3d):
    pass


SYNCED = {nn.BatchNorm1d: SyncedBatchNorm1d, nn.BatchNorm2d: SyncedBatchNorm2d, nn.BatchNorm3d: SyncedBatchNorm3d}


def convert_batch_norms(module: nn.Module) -> int:
    """Make every BatchNorm1d/2d/3d in `module` synchronised, in place; returns how many were converted.
    Already converted ones and other normalisations (subclasses, LayerNorm, ...) are left alone."""
    converted = 0
    for m in module.modules():
        cls = SYNCED.get(type(m))
        if cls is not None:
            m.__class__ = cls
            converted += 1
    return converted
