"""Multi-process training on torch.distributed: set-up from torchrun's environment, sharding, reductions.

Under `torchrun --nproc_per_node=N -m kdflow train ...` every process runs the same loop on
its shard of each global batch (`train.batch_size` is the global batch); trainable nodes are
wrapped in DistributedDataParallel (NCCL on GPUs, gloo on the CPU), frozen nodes are not; the
helpers' gradients (connectors, criterion modules) are averaged explicitly, and after every step
`sync_buffers` makes the buffers of the training nodes and helpers equal on every rank (per-sample
memories all-gathered, other floating buffers averaged; DDP's own buffer broadcast is off). With
`train.sync_bn`, batch norms use the global batch's statistics (`engine/sync_bn.py`). Rank 0 alone
writes the run directory. docs/benchmark-protocol.md, "Multi-process runs", says what equals a
single-process run and what does not.
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


def sync_buffers(modules: list[torch.nn.Module], indices: torch.Tensor, info: DistInfo) -> None:
    """Make the buffers of `modules` (the training nodes and their helpers) equal on every rank after a step.

    `indices` are the global batch's sample indices (rank r trained on `indices[DistInfo(r, world).shard(n)]`).
    Per-sample memories, which a module names in its `per_sample_buffers` attribute (CRD's banks: rows
    indexed by the training split's sample index): each rank updated the rows of its own samples; those
    rows are all-gathered and written on every rank, so every rank holds all the step's updates (a global
    batch's indices are distinct, so the order of the writes does not matter). Every other floating buffer
    (batch-norm running statistics, CRD's normalisers estimated from the first batch) is averaged over the
    ranks, summed in float64: a buffer already equal everywhere (synchronised batch norms, constants such as
    OFD's margin) stays bit-identical. Integer buffers (num_batches_tracked, CRD's class index) advance
    alike on every rank or never change, and are left alone. Buffers are looked up on every call: a module
    may replace a buffer's tensor (CRD's matmul form does)."""
    if not info.enabled:
        return
    memories: list[tuple[torch.nn.Module, str]] = []
    for module in modules:
        for m in module.modules():
            memories += [(m, name) for name in getattr(m, "per_sample_buffers", ())]
    skip = {id(getattr(m, name)) for m, name in memories}
    others: dict[int, torch.Tensor] = {}
    for module in modules:
        for b in module.buffers():
            if id(b) not in skip and b.is_floating_point():
                others[id(b)] = b
    n = indices.shape[0]
    parts = [DistInfo(r, info.world).shard(n) for r in range(info.world)]
    size = max(p.stop - p.start for p in parts)
    mine = indices[info.shard(n)]
    with torch.no_grad():
        for m, name in memories:
            bank = getattr(m, name)
            rows = bank[mine]
            if rows.shape[0] < size:
                rows = torch.cat([rows, rows.new_zeros(size - rows.shape[0], *rows.shape[1:])])
            gathered = [torch.empty_like(rows) for _ in range(info.world)]
            dist.all_gather(gathered, rows.contiguous())
            for p, g in zip(parts, gathered):
                bank[indices[p]] = g[: p.stop - p.start]
        if others:
            flat = torch.cat([b.reshape(-1).double() for b in others.values()])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= info.world
            offset = 0
            for b in others.values():
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
