"""The flow at run time: every node's model, its taps and connectors, and the summed loss.

`Flow` is an nn.Module holding all nodes and helpers. `flow(x, y, stage, epoch)` runs the
nodes a stage needs (frozen ones in eval mode under inference mode), evaluates supervision
and transfers, and returns one total loss for one backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdflow.checkpoint import read_model_file
from kdflow.flow.connectors import build_connector
from kdflow.flow.criteria import CRITERIA
from kdflow.flow.errors import RecipeError
from kdflow.flow.spec import FuseSpec, Recipe, StageSpec, TransferSpec, weight_at
from kdflow.flow.taps import TapRecorder
from kdflow.models import build_model


def split_tap(tap: str) -> tuple[str, str]:
    node, name = tap.split(".", 1)
    return node, name


def transfer_label(t: TransferSpec) -> str:
    src = "+".join(t.sources) if len(t.sources) > 1 else t.sources[0]
    return f"{t.criterion}({src} -> {t.to})"


@dataclass
class FlowOutput:
    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted values, by label
    weights: dict[str, float] = field(default_factory=dict)
    logits: dict[str, torch.Tensor] = field(default_factory=dict)  # trainable nodes' logits
    node_ce: dict[str, torch.Tensor] = field(default_factory=dict)


def _seeded_build(recipe: Recipe, name: str, index: int, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    spec = recipe.nodes[name]
    seed = spec.init_seed if spec.init_seed is not None else recipe.seed * 1000 + index
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return build_model(spec.arch, num_classes, input_shape, **spec.args)
        except KeyError as e:
            raise RecipeError(f"nodes.{name}.arch: {e.args[0]}") from None
        except TypeError as e:
            raise RecipeError(f"nodes.{name}.args: {e}") from None


def load_node_checkpoint(model: nn.Module, name: str, spec_arch: str, path: str) -> None:
    try:
        ckpt = read_model_file(path)
    except (FileNotFoundError, ValueError) as e:
        raise RecipeError(f"nodes.{name}.checkpoint: {e}") from None
    if "arch" in ckpt and ckpt["arch"] != spec_arch:
        raise RecipeError(f"nodes.{name}.checkpoint: {path} holds a {ckpt['arch']!r}, the recipe says {spec_arch!r}")
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise RecipeError(f"nodes.{name}.checkpoint: {path} does not fit {spec_arch!r}: {first}") from None


class Flow(nn.Module):
    def __init__(self, recipe: Recipe, num_classes: int, input_shape: tuple[int, ...], sample: torch.Tensor) -> None:
        """Build every node, hook its taps and check every transfer's shapes on `sample` (a small batch)."""
        super().__init__()
        self.recipe = recipe
        self.stages = recipe.resolved_stages()
        self.models = nn.ModuleDict()
        for i, name in enumerate(recipe.nodes):
            self.models[name] = _seeded_build(recipe, name, i, num_classes, input_shape)
            if recipe.nodes[name].checkpoint:
                load_node_checkpoint(self.models[name], name, recipe.nodes[name].arch, recipe.nodes[name].checkpoint)
        taps: dict[str, set[str]] = {name: {"logits"} for name in recipe.nodes}
        for t in recipe.transfers:
            for tap in [t.to, *t.sources]:
                node, name = split_tap(tap)
                taps[node].add(name)
        self.recorders: dict[str, TapRecorder] = {}
        for i, t in enumerate(recipe.transfers):
            for where, tap in [(f"transfers.{i}.to", t.to)] + [(f"transfers.{i}.from", s) for s in t.sources]:
                node, name = split_tap(tap)
                try:
                    TapRecorder(node, self.models[node], {name}).remove()
                except RecipeError as e:
                    raise RecipeError(f"{where}: {e}") from None
        for node in recipe.nodes:
            self.recorders[node] = TapRecorder(node, self.models[node], taps[node])
        self.connectors = nn.ModuleDict()
        self.connector_owner: dict[str, str] = {}
        self._check_shapes(sample)

    def _check_shapes(self, sample: torch.Tensor) -> None:
        shapes: dict[str, tuple[int, ...]] = {}
        was_training = {n: m.training for n, m in self.models.items()}
        self.models.eval()
        with torch.no_grad():
            for node, rec in self.recorders.items():
                for tap, value in rec.run(sample).items():
                    shapes[f"{node}.{tap}"] = tuple(value.shape[1:])
        for n, m in self.models.items():
            m.train(was_training[n])
        for i, t in enumerate(self.recipe.transfers):
            where = f"transfers.{i}"
            src_shapes = {s: shapes[s] for s in t.sources}
            if len(set(src_shapes.values())) > 1:
                listed = ", ".join(f"{s} {v}" for s, v in src_shapes.items())
                raise RecipeError(f"{where}.from: fused sources differ in shape: {listed}")
            src_shape = src_shapes[t.sources[0]]
            tgt_shape = shapes[t.to]
            if t.connector is not None:
                conn = build_connector(t.connector.kind, tgt_shape, src_shape, f"{where}.connector")
                self.connectors[str(i)] = conn
                self.connector_owner[str(i)] = split_tap(t.to)[0]
                with torch.no_grad():
                    conn.eval()
                    tgt_shape = tuple(conn(torch.zeros(2, *tgt_shape)).shape[1:])
                    conn.train()
            if CRITERIA[t.criterion].same_shape and tgt_shape != src_shape:
                raise RecipeError(
                    f"{where}: shape mismatch: {t.to} is {tgt_shape}, {t.sources[0]} is {src_shape}; "
                    "add a connector (connector: linear | conv1x1 | conv3x3)"
                )

    def parameters_of(self, node: str) -> list[nn.Parameter]:
        """A node's own parameters and those of the helpers it owns (connectors on its side)."""
        params = list(self.models[node].parameters())
        for key, owner in self.connector_owner.items():
            if owner == node:
                params += list(self.connectors[key].parameters())
        return params

    def set_stage_modes(self, stage: StageSpec) -> None:
        """Training nodes (and their helpers) in train mode with gradients; every other node eval, frozen."""
        for name, model in self.models.items():
            training = name in stage.train
            model.train(training)
            model.requires_grad_(training)
        for key, owner in self.connector_owner.items():
            self.connectors[key].train(owner in stage.train)
            self.connectors[key].requires_grad_(owner in stage.train)

    def run_nodes(self, x: torch.Tensor, stage: StageSpec) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {}
        for node, rec in self.recorders.items():
            if not self.recipe.is_used(node, stage):
                continue
            if node in stage.train:
                out = rec.run(x)
            else:
                with torch.inference_mode():
                    out = rec.run(x)
                # inference tensors cannot be saved for backward: copy them out once
                out = {k: v.clone() for k, v in out.items()}
            values.update({f"{node}.{k}": v for k, v in out.items()})
        return values

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: StageSpec, epoch: int) -> FlowOutput:
        taps = self.run_nodes(x, stage)
        out = FlowOutput(total=torch.zeros((), device=x.device))
        for node in stage.train:
            logits = taps[f"{node}.logits"]
            ce = F.cross_entropy(logits.float(), y)
            out.logits[node] = logits
            out.node_ce[node] = ce
            if node in self.recipe.supervise:
                w = weight_at(self.recipe.supervise[node], epoch)
                out.terms[f"ce({node})"], out.weights[f"ce({node})"] = ce, w
                if w:
                    out.total = out.total + w * ce
        for i, t in self.recipe.active_transfers(stage):
            w = weight_at(t.weight, epoch)
            label = transfer_label(t)
            value = self.transfer_value(i, t, taps, y)
            out.terms[label], out.weights[label] = value, w
            if w:
                out.total = out.total + w * value
        return out

    def transfer_value(self, index: int, t: TransferSpec, taps: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        sources = [taps[s] for s in t.sources]
        if isinstance(t.source, FuseSpec) and len(sources) > 1:
            ws = t.source.weights or [1.0 / len(sources)] * len(sources)
            source = sum(w * s for w, s in zip(ws, sources))
        else:
            source = sources[0]
        if t.detach:
            source = source.detach()
        target = taps[t.to]
        if str(index) in self.connectors:
            target = self.connectors[str(index)](target)
        return CRITERIA[t.criterion].call(target, source, y, t.params)
