"""The non-finite guard: a NaN or infinite loss, gradient or batch-norm statistic never trains on or gets saved.

Per optimizer step one fused check (one host sync): the loss, the max-abs of every gradient of the nodes
about to step (left to the GradScaler under fp16, which skips overflowing steps itself) and of the stage's
batch-norm running statistics. `train.on_nonfinite: stop` (the default) ends the run with a
`NonFiniteError` naming the node, stage, epoch, step and learning rate; `skip_step` leaves the weights
as they were, restores the batch-norm statistics the forward pass moved, and counts the step. At the end
of each epoch, before evaluation and before anything is saved, every floating parameter and buffer of
the training nodes and their helpers is checked; a non-finite one stops the run under either policy.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from kdflow.engine.distributed import DistInfo, all_reduce_sum
from kdflow.flow.errors import RecipeError
from kdflow.flow.graph import Flow, FlowOutput

_BatchNorm = nn.modules.batchnorm._BatchNorm

HINT = (
    "lower the learning rate (train.optim.lr), or set train.on_nonfinite: skip_step to skip such steps "
    "(counted as nonfinite_steps in metrics.jsonl)"
)


class NonFiniteError(RecipeError):
    """A run that produced a NaN or infinite value; nothing from the failing step or epoch was saved."""


def _modules(flow: Flow, node: str) -> list[nn.Module]:
    return [flow.models[node], *flow.helpers_of(node)]


def _bn_buffers(flow: Flow, node: str) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the running statistics of every batch norm of `node` and its helpers."""
    out = []
    for module in _modules(flow, node):
        for name, m in module.named_modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                prefix = f"{name}." if name else ""
                out += [(f"{prefix}running_mean", m.running_mean), (f"{prefix}running_var", m.running_var)]
    return out


def _first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    return next((name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def _lr_text(optimizer: torch.optim.Optimizer | None) -> str:
    return f"lr {optimizer.param_groups[0]['lr']:g}" if optimizer is not None else "lr ?"


class StepGuard:
    """The per-step check of one stage's epoch; `skipped` counts the steps skipped per node."""

    def __init__(self, flow: Flow, nodes: list[str], optimizers: dict[str, torch.optim.Optimizer], policy: str,
                 stage: str, epoch: int, scaled: bool, dist_info: DistInfo = DistInfo()) -> None:
        self.flow, self.nodes, self.optimizers, self.policy = flow, nodes, optimizers, policy
        self.stage, self.epoch, self.scaled, self.dist_info = stage, epoch, scaled, dist_info
        self.bn = {n: _bn_buffers(flow, n) for n in nodes}
        self.params = {n: flow.parameters_of(n) for n in nodes}
        self.skipped = {n: 0 for n in nodes}
        self._saved: list[torch.Tensor] = []

    def snapshot(self) -> None:
        """Before a forward pass under skip_step: keep the batch-norm statistics it will move (small tensors)."""
        if self.policy == "skip_step":
            self._saved = [t.clone() for n in self.nodes for _, t in self.bn[n]]

    def ok(self, loss: torch.Tensor, nodes: list[str], step: int, out: FlowOutput | None = None) -> bool:
        """Whether `nodes` may take their optimizer step after this backward pass (step is 1-based). Under
        `stop` a non-finite value raises NonFiniteError; under `skip_step` the step is counted and False returned."""
        values = [loss.detach().float().reshape(1)]
        if not self.scaled:
            grads = [p.grad for n in nodes for p in self.params[n] if p.grad is not None]
            if grads:
                values.append(torch.stack(torch._foreach_norm(grads, math.inf)).float())
        stats = [t for n in self.nodes for _, t in self.bn[n]]
        if stats:
            values.append(torch.stack(torch._foreach_norm(stats, math.inf)).float())
        bad = (~torch.isfinite(torch.cat(values))).any().float()
        if self.dist_info.enabled:
            all_reduce_sum([bad])  # every rank takes the same decision
        if not bool(bad):
            return True
        if self.policy == "stop":
            raise NonFiniteError(self._describe(loss, nodes, step, out))
        for n in nodes:
            self.skipped[n] += 1
        for t, saved in zip((t for n in self.nodes for _, t in self.bn[n]), self._saved):
            t.copy_(saved)
        return False

    def _describe(self, loss: torch.Tensor, nodes: list[str], step: int, out: FlowOutput | None) -> str:
        """One line: where, which node (the ones whose loss, gradients or statistics are non-finite), what."""
        found = []
        for n in nodes:
            what = []
            terms = [k for k, v in (out.terms.items() if out else []) if n in k and not bool(torch.isfinite(v).all())]
            if terms:
                what.append(f"loss term {', '.join(terms)}")
            grads = [(k, p.grad) for m in _modules(self.flow, n) for k, p in m.named_parameters() if p.grad is not None]
            name = None if self.scaled else _first_nonfinite(grads)
            if name:
                what.append(f"gradient of {name}")
            stat = _first_nonfinite(self.bn[n])
            if stat:
                what.append(f"batch-norm statistic {stat}")
            if what:
                found.append(f"node {n} ({_lr_text(self.optimizers.get(n))}): {'; '.join(what)}")
        if not found:
            found = [f"node {', '.join(nodes)} ({_lr_text(self.optimizers.get(nodes[0]))}): loss {loss.item():g}"]
        where = f"stage {self.stage!r}, epoch {self.epoch}, step {step}"
        return f"non-finite values in {where}: {' | '.join(found)}; {HINT}"


def check_state(flow: Flow, nodes: list[str], optimizers: dict, stage: str, epoch: int) -> None:
    """After an epoch, before evaluation and saving: every floating parameter and buffer of the training
    nodes and their helpers is finite, or NonFiniteError names the first that is not."""
    for n in nodes:
        for module in _modules(flow, n):
            name = _first_nonfinite([*module.named_parameters(), *module.named_buffers()])
            if name:
                where = "" if module is flow.models[n] else f"{type(module).__name__} "
                raise NonFiniteError(
                    f"non-finite values after stage {stage!r}, epoch {epoch}: node {n} ({_lr_text(optimizers.get(n))}): "
                    f"{where}{name}; nothing non-finite was saved; {HINT}"
                )


def check_evaluation(ev: dict, node: str, optimizers: dict, stage: str, epoch: int) -> None:
    """A finite model whose evaluation loss is not (logits overflowing in eval mode) is not saved either."""
    bad = [k for k in ("test_loss", "val_loss") if k in ev and not math.isfinite(ev[k])]
    if bad:
        raise NonFiniteError(
            f"non-finite values after stage {stage!r}, epoch {epoch}: node {node} ({_lr_text(optimizers.get(node))}): "
            f"evaluation {bad[0]} is {ev[bad[0]]}; nothing non-finite was saved; {HINT}"
        )
