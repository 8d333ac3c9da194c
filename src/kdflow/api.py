"""kdflow as a library: any method of `kdflow methods` inside your own training loop.

    flow = kdflow.methods.kd(teacher=teacher, student=student, temperature=4)
    distiller = kdflow.Distiller(flow)                       # an nn.Module holding every node and helper
    optimizer = torch.optim.SGD(distiller.parameters_of("student"), lr=0.05, momentum=0.9)
    out = distiller(images, labels)                          # out.total, out.terms, out.logits
    optimizer.zero_grad(); out.total.backward(); optimizer.step()

The graph is the same one the CLI runs from a recipe (`Distiller.from_recipe`), so the losses are
the engine's. Frozen nodes stay frozen whatever you call: they run in eval mode under inference
mode, never require gradients, and are left out of `parameters()` and `parameters_of`.
"""
from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from kdflow.flow.errors import RecipeError
from kdflow.flow.graph import Flow, FlowOutput
from kdflow.methods.recipe import resolve
from kdflow.flow.spec import Recipe, StageSpec
from kdflow.losses.registry import CRITERIA
from kdflow.methods.binding import FlowGraph


class Distiller(nn.Module):
    """Every node and helper of a method's graph as one nn.Module, for a user's own training loop.

    `example_inputs` (a small batch) is needed when the graph has trainable helpers (connectors,
    VID/CRD/ReviewKD modules): they are built from the taps' shapes, before you create the optimizer.
    `num_data` (the training set's size), `train_labels` (its labels, by sample index) and `indices` in the
    call are for CRD's memory bank and its negatives from the other classes.
    `channels_last=True` puts every node and helper, and each 4-D input batch, in the NHWC memory format,
    as the engine does by default (1.3-1.8× faster steps on this project's CPU benchmarks,
    docs/benchmarks.md); off by default here because a model of yours that calls `.view` on a
    feature map needs `.reshape` under it.
    """

    def __init__(
        self,
        flow: FlowGraph,
        example_inputs: torch.Tensor | None = None,
        num_classes: int | None = None,
        num_data: int = 0,
        stage: str | None = None,
        train_labels: torch.Tensor | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        graph = dict(flow.graph)
        nodes = {n: {**f, "arch": f.get("arch", f"external:{type(flow.models[n]).__name__}")} for n, f in graph.get("nodes", {}).items() if n in flow.models}
        missing = [n for n in graph.get("nodes", {}) if n not in flow.models]
        for n in missing:
            if "same_as" in graph["nodes"][n]:  # an SL-T or a generation: a fresh model of that node's architecture
                flow.models[n] = _fresh_copy(flow.models[graph["nodes"][n]["same_as"]], n, graph["nodes"][n]["same_as"])
                nodes[n] = {k: v for k, v in graph["nodes"][n].items() if k != "same_as"} | {"arch": nodes[graph["nodes"][n]["same_as"]]["arch"]}
            else:
                raise RecipeError(f"{flow.method}: node {n!r} needs a model: pass {n}=<nn.Module>")
        for n, f in nodes.items():
            f.pop("same_as", None)
            # a frozen node's weights are the module's own: mark them as given (nothing is loaded)
            f["checkpoint"] = "memory:" if f.get("role") == "frozen" else None
        graph["nodes"] = nodes
        recipe = resolve({"data": {"name": "external"}, **graph}, flow.method)
        self._setup(recipe, flow.models, example_inputs, num_classes, num_data, stage, train_labels)

    @classmethod
    def from_recipe(
        cls, recipe: Recipe, num_classes: int, input_shape: tuple[int, ...], example_inputs: torch.Tensor, num_data: int = 0,
        train_labels: torch.Tensor | None = None,
    ) -> "Distiller":
        """The engine's graph for a recipe (models built from their `arch`), for a custom loop or a parity check."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.channels_last = recipe.train.channels_last
        torch.manual_seed(recipe.seed)
        self.flow = Flow(recipe, num_classes, input_shape, example_inputs, num_data=num_data, train_labels=train_labels)
        self._finish(None)
        return self

    def _setup(self, recipe: Recipe, models, example_inputs, num_classes, num_data, stage, train_labels=None) -> None:
        needs_shapes = any(t.connector is not None for t in recipe.transfers) or any(
            _is_module_criterion(t.criterion) for t in recipe.transfers
        )
        if example_inputs is None:
            if needs_shapes:
                raise RecipeError(
                    "this graph has trainable helpers (connectors or criterion modules) built from the taps' shapes: "
                    "pass example_inputs=<a small batch> to Distiller"
                )
        self.flow = Flow(recipe, num_classes or 0, (), example_inputs, num_data=num_data, models=models, train_labels=train_labels)
        self._finish(stage)

    def _finish(self, stage: str | None) -> None:
        stages = {s.name: s for s in self.flow.stages}
        if stage is not None and stage not in stages:
            raise RecipeError(f"stage {stage!r}: the graph's stages are {', '.join(stages)}")
        self.stage = stage or self.flow.stages[0].name
        self.flow.set_stage_modes(self._stage)
        if self.channels_last:
            self.flow.to(memory_format=torch.channels_last)  # 4-D weights only; parameters keep their identity

    @property
    def _stage(self) -> StageSpec:
        return next(s for s in self.flow.stages if s.name == self.stage)

    @property
    def stages(self) -> list[str]:
        return [s.name for s in self.flow.stages]

    def set_stage(self, name: str) -> None:
        """Switch to another of the graph's stages (FitNet's hint stage, TAKD's links, ...)."""
        self._finish(name)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, epoch: int = 0, indices: torch.Tensor | None = None) -> FlowOutput:
        """Every node the stage needs runs once; returns the total loss, each term and the trainable nodes' logits.

        `epoch` drives scheduled weights (DKD's warm-up); `indices` are the samples' dataset indices (CRD)."""
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.flow(inputs, labels, self._stage, epoch, indices)

    def train(self, mode: bool = True) -> "Distiller":
        """Training mode for the stage's trainable nodes and helpers; frozen nodes stay in eval mode."""
        self.training = mode
        self.flow.set_stage_modes(self._stage)
        if not mode:
            for module in self.flow.modules():
                module.training = False
        return self

    def trainable_nodes(self) -> list[str]:
        return list(self._stage.train)

    def parameters_of(self, node: str) -> list[nn.Parameter]:
        """A trainable node's parameters and its helpers' (connectors, criterion modules): its optimizer's list."""
        if node not in self.flow.models:
            raise KeyError(f"no node {node!r}; nodes: {', '.join(self.flow.models)}")
        if node not in self._stage.train:
            return []  # frozen here: nothing to optimise
        return self.flow.parameters_of(node)

    def parameters(self, recurse: bool = True):  # noqa: D401 - nn.Module's signature
        """The trainable nodes' and helpers' parameters only: an optimizer over `parameters()` never sees a frozen node."""
        seen: set[int] = set()
        for node in self._stage.train:
            for p in self.flow.parameters_of(node):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            flow = self.__dict__.get("_modules", {}).get("flow")
            if flow is not None and name in flow.models:
                return flow.models[name]
            raise


def _is_module_criterion(name: str) -> bool:
    return name in CRITERIA and CRITERIA[name].module


def _fresh_copy(model: nn.Module, node: str, source: str) -> nn.Module:
    """An untrained model of `model`'s architecture for node `node` (``same_as: source``), built again by its
    class, so the class's own initialisation runs for every parameter, raw nn.Parameters included.

    The constructor's arguments are read back from the model's attributes of the same names (else their
    defaults), and the rebuilt model must print like `model` and hold the same state-dict shapes; nn.Sequential,
    nn.ModuleList and nn.ModuleDict are rebuilt child by child. A class that cannot be rebuilt that way is
    deep-copied and its own `reset_parameters()` called; without one, RecipeError says what to add."""
    fresh = _rebuild(model)
    if fresh is None and callable(getattr(type(model), "reset_parameters", None)):
        fresh = copy.deepcopy(model)
        fresh.reset_parameters()
    if fresh is None:
        cls = type(model).__name__
        raise RecipeError(
            f"nodes.{node}: same_as {source!r}: cannot build a fresh {cls}: its constructor's arguments are not "
            f"attributes of the same names; store them (self.width = width), give {cls} a reset_parameters(), "
            f"or pass the model yourself (flow.models[{node!r}] = {cls}(...)) before building the Distiller"
        )
    like = next(iter([*model.parameters(), *model.buffers()]), None)
    if like is not None:
        fresh = fresh.to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)
    return fresh


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _rebuild(model: nn.Module) -> nn.Module | None:
    """`type(model)(...)` with the constructor's arguments read from `model`, or kdflow's `build_model` call for
    a model of its zoo (None when that does not rebuild the same architecture)."""
    built = getattr(model, "kdflow_build", None)
    if isinstance(built, dict):
        from kdflow.models import build_model

        fresh = build_model(**built)
    elif type(model) in _CONTAINERS:
        children = {name: _rebuild(child) for name, child in model.named_children()}
        if any(c is None for c in children.values()):
            return None
        if type(model) is nn.ModuleList:
            fresh = nn.ModuleList(children.values())
        else:
            fresh = type(model)(OrderedDict(children))
    else:
        args: dict[str, Any] = {}
        for name, param in list(inspect.signature(type(model).__init__).parameters.items())[1:]:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            value = getattr(model, name, inspect.Parameter.empty)
            if value is not inspect.Parameter.empty and not isinstance(value, (nn.Module, torch.Tensor)):
                args[name] = value
            elif param.default is inspect.Parameter.empty:
                return None
        try:
            fresh = type(model)(**args)
        except Exception:  # arguments read back wrongly: not this architecture
            return None
    own, new = model.state_dict(), fresh.state_dict()
    same_shapes = own.keys() == new.keys() and all(own[k].shape == new[k].shape for k in own)
    return fresh if same_shapes and repr(fresh) == repr(model) else None
