"""DOT, the Distillation-Oriented Trainer (Zhao, Cui, Song, Liang 2023, "DOT: A Distillation-Oriented Trainer", ICCV):
SGD whose step comes from two gradients with two momenta. `train.optim: {name: dot, delta: 0.075}`.

A node's loss is split into its supervised terms (`supervise`: cross-entropy, label smoothing, ...) and its
transfer terms (every criterion of a transfer into it). Each is differentiated on its own (two backward passes
over one forward pass) and each gradient keeps its own heavy-ball buffer, with momentum μ − Δ for the
supervised (task) gradient and μ + Δ for the distillation gradient, so the distillation gradient's direction
carries more weight from step to step. One step applies both buffers:

    b_task ← (μ − Δ)·b_task + g_task + λ·w        b_distill ← (μ + Δ)·b_distill + g_distill
    w ← w − lr·b_task − lr·b_distill

Each buffer starts at its first gradient, as torch.optim.SGD's does (no dampening). A parameter that only one
of the two losses reaches in a step (a connector only the transfer sees; a classifier a feature transfer does
not) takes that gradient with the mean momentum μ, i.e. plain SGD with momentum. The weight decay λ·w is
added once per step: to the supervised gradient when there is one, else to the distillation gradient.

With Δ = 0 the step is torch.optim.SGD's step on the summed loss: the momentum recursion is linear, so the
two buffers, both started at their first gradients and both multiplied by μ, always add up to the single
buffer of the summed gradient g_task + g_distill + λ·w (equal up to float rounding).

Reference: megvii-research/mdistiller@a08d46f, mdistiller/engine/dot.py (`DistillationOrientedTrainer`,
`dot()`) and mdistiller/engine/trainer.py (class `DOT`: momentum μ − Δ for the task loss, μ + Δ for the KD
loss; `loss_kd.backward(retain_graph=True)`, `step_kd()`, `zero_grad`, `loss_ce.backward()`, `step()`);
Δ = 0.075 in configs/cifar100/dot/*.yaml and configs/tiny_imagenet/dot/*.yaml, 0.09 in
configs/imagenet/*/dot.yaml, with μ = 0.9. One deviation: the reference adds no weight decay on the first
step of a parameter only the distillation loss reaches (its buffer starts from the raw gradient there);
here that parameter is decayed on every step, as every other one is.

Not supported (one-line errors from `check_recipe`): fp16 (the GradScaler scales and checks one backward
pass), torchrun (DistributedDataParallel reduces once per forward pass), stages with `updates: alternating`,
Nesterov momentum, and a node that has no transfer term in any stage it trains in.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from kdflow.flow.errors import RecipeError
from kdflow.flow.graph import FlowOutput
from kdflow.flow.spec import Recipe, StageSpec

__all__ = ["DOT", "backward_and_step", "check_recipe", "split_loss", "supervised_labels"]


class DOT(torch.optim.Optimizer):
    """SGD with a momentum buffer for the supervised gradient (μ − Δ) and one for the distillation gradient (μ + Δ).

    Per step: backward the distillation loss, `hold_distill_grads()`, backward the supervised loss, `step()`
    (`backward_and_step` does all of it for a FlowOutput). The buffers are the optimizer's state (saved by
    `state_dict`); the held gradients live for one step only."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, delta: float = 0.075,
                 weight_decay: float = 0.0) -> None:
        if not lr >= 0:
            raise ValueError(f"lr: {lr!r} must be ≥ 0")
        if not 0 <= delta <= momentum:
            raise ValueError(f"delta: {delta!r} must lie in [0, momentum = {momentum!r}] (momentum - delta is a momentum)")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay: {weight_decay!r} must be ≥ 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "delta": delta, "weight_decay": weight_decay})
        self._distill: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def hold_distill_grads(self) -> None:
        """After the distillation loss's backward pass: keep each parameter's `.grad` as its distillation gradient
        and clear `.grad` for the supervised loss's backward pass."""
        self._distill = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._distill[p] = p.grad
                    p.grad = None

    def discard_distill_grads(self) -> None:
        """Forget the held gradients (a step that is skipped)."""
        self._distill = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update with `.grad` as the supervised gradient and the held one as the distillation gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            task_m, distill_m = group["momentum"] - group["delta"], group["momentum"] + group["delta"]
            one_m = (task_m + distill_m) / 2  # a parameter only one loss reaches: plain momentum μ
            for p in group["params"]:
                task, distill = p.grad, self._distill.get(p)
                if task is None and distill is None:
                    continue
                both = task is not None and distill is not None
                state = self.state[p]
                if task is not None:
                    if decay:
                        task = task.add(p, alpha=decay)
                    _accumulate(state, "task_buffer", task, task_m if both else one_m)
                if distill is not None:
                    if decay and task is None:
                        distill = distill.add(p, alpha=decay)
                    _accumulate(state, "distill_buffer", distill, distill_m if both else one_m)
                if task is not None:
                    p.add_(state["task_buffer"], alpha=-lr)
                if distill is not None:
                    p.add_(state["distill_buffer"], alpha=-lr)
        self._distill = {}
        return loss


def _accumulate(state: dict, key: str, grad: torch.Tensor, momentum: float) -> None:
    buf = state.get(key)
    if buf is None:
        state[key] = grad.detach().clone()
    else:
        buf.mul_(momentum).add_(grad)


def supervised_labels(recipe: Recipe, stage: StageSpec) -> set[str]:
    """The FlowOutput term labels of the stage's supervised terms; every other term is a transfer's."""
    return {f"{sup.loss}({node})" for node, sup in recipe.active_supervision(stage).items()}


def split_loss(out: FlowOutput, supervised: set[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(supervised loss, distillation loss): the weighted terms of `out` (those `out.total` sums) in two sums."""
    task = torch.zeros_like(out.total)
    distill = torch.zeros_like(out.total)
    for label, value in out.terms.items():
        w = out.weights[label]
        if not w:
            continue
        if label in supervised:
            task = task + w * value
        else:
            distill = distill + w * value
    return task, distill


def backward_and_step(out: FlowOutput, supervised: set[str], optimizers: dict[str, DOT],
                      ok: Callable[[], bool] = lambda: True) -> bool:
    """The engine's DOT step after a forward pass: the distillation loss's backward pass (graph kept), its
    gradients held, the supervised loss's backward pass, every optimizer's step. `ok()` sees each backward
    pass's gradients in `.grad` (the non-finite guard); when it says no, nothing steps. Returns whether they stepped."""
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    task, distill = split_loss(out, supervised)
    if distill.requires_grad:
        distill.backward(retain_graph=task.requires_grad)
    if not ok():
        return False
    for opt in optimizers.values():
        opt.hold_distill_grads()
    if task.requires_grad:
        task.backward()
    if not ok():
        for opt in optimizers.values():
            opt.discard_distill_grads()
        return False
    for opt in optimizers.values():
        opt.step()
    return True


def check_recipe(recipe: Recipe, distributed: bool = False, log: Callable[[str], None] = print) -> None:
    """With `train.optim.name: dot`: a RecipeError line for a combination DOT does not support, and a logged note
    for each stage in which a node steps from one kind of term only (plain SGD with momentum there)."""
    if recipe.train.optim.name != "dot":
        return
    if recipe.train.precision == "fp16":
        raise RecipeError("train.precision: fp16's GradScaler scales and checks one backward pass, DOT (train.optim.name: dot) "
                          "takes two per step; use bf16 or fp32")
    if distributed:
        raise RecipeError("train.optim.name: dot is not supported under torchrun yet (two backward passes per forward pass, "
                          "DistributedDataParallel reduces once); run it in one process")
    delta = recipe.train.optim.delta
    for name, spec in recipe.nodes.items():
        o = spec.optim
        if o is not None and o.nesterov:
            raise RecipeError(f"nodes.{name}.optim.nesterov: DOT's two momenta are plain (heavy-ball) momenta; set nesterov: false")
        if o is not None and o.momentum is not None and o.momentum < delta:
            raise RecipeError(f"nodes.{name}.optim.momentum: {o.momentum:g} is below train.optim.delta {delta:g}; the supervised "
                              "gradient's momentum (momentum - delta) cannot be negative")
    distilled: dict[str, bool] = {}
    for i, stage in enumerate(recipe.resolved_stages()):
        if stage.updates == "alternating":
            raise RecipeError(f"stages.{i}.updates: alternating (one node's step after another's) is not supported with "
                              "train.optim.name: dot; use updates: joint or name: sgd")
        into = {t.target_node for _, t in recipe.active_transfers(stage) if not (isinstance(t.weight, (int, float)) and t.weight == 0)}
        supervised = {n for n, sup in recipe.active_supervision(stage).items()
                      if not (isinstance(sup.weight, (int, float)) and sup.weight == 0)}
        for node in stage.train or []:
            distilled[node] = distilled.get(node, False) or node in into
            lacks = [kind for kind, has in (("transfer", node in into), ("supervised", node in supervised)) if not has]
            if len(lacks) == 1:
                o = recipe.nodes[node].optim
                momentum = o.momentum if o is not None and o.momentum is not None else recipe.train.optim.momentum
                log(f"train.optim dot: node {node} has no {lacks[0]} term in stage {stage.name!r}; its steps there are SGD "
                    f"with momentum {momentum:g}")
    never = [n for n, has in distilled.items() if not has]
    if never:
        raise RecipeError(f"train.optim.name: dot steps from a distillation gradient, but node {never[0]} has no transfer into it "
                          "in any stage it trains in; add a transfer or use name: sgd")
