"""Multi-process training on torch.distributed: set-up from torchrun's environment, sharding, reductions.

Under `torchrun --nproc_per_node=N -m kdflow train ...` every process runs the same loop on
its shard of each global batch (`train.batch_size` is the global batch); trainable nodes are
wrapped in DistributedDataParallel (NCCL on GPUs, gloo on the CPU), frozen nodes are not; the
helpers' gradients (connectors, criterion modules) are averaged explicitly. Rank 0 alone writes
the run directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a batch of n samples."""
        bounds = [n * r // self.world for r in range(self.world + 1)]
        return slice(bounds[self.rank], bounds[self.rank + 1])


def init_distributed() -> DistInfo:
    """Join the process group that torchrun describes in the environment (a no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return info


def all_reduce_sum(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over the processes (in place); returns them for convenience."""
    if dist.is_available() and dist.is_initialized():
        for v in values:
            dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return values


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of parameters that DDP does not manage (helpers) over the processes."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or world <= 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
