"""The flow at run time: every node's model, its taps and connectors, and the summed loss.

`Flow` is an nn.Module holding all nodes and helpers. `flow(x, y, stage, epoch)` runs the
nodes a stage needs (frozen ones in eval mode under inference mode), evaluates supervision
and transfers, and returns one total loss for one backward pass.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdflow.checkpoint import read_model_file, state_dict_mismatch
from kdflow.flow.batch_norm import batch_statistics
from kdflow.flow.connectors import build_connector
from kdflow.flow.errors import RecipeError
from kdflow.flow.spec import (
    FuseSpec,
    GroupSpec,
    Recipe,
    StageSpec,
    TransferSpec,
    weight_at,
)
from kdflow.losses.registry import SUPERVISION
from kdflow.flow.stage_taps import expand_stage_taps
from kdflow.flow.taps import TapRecorder, resolve_module
from kdflow.models import build_model
from kdflow.losses.logits import standardize
from kdflow.losses.registry import CRITERIA, BuildInfo
from kdflow.teachers import resolve_checkpoint


def split_tap(tap: str) -> tuple[str, str]:
    node, name = tap.split(".", 1)
    return node, name


def transfer_label(t: TransferSpec) -> str:
    return f"{t.criterion}({'+'.join(t.sources)} -> {'+'.join(t.targets)})"


@dataclass
class FlowOutput:
    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted values, by label
    weights: dict[str, float] = field(default_factory=dict)
    logits: dict[str, torch.Tensor] = field(default_factory=dict)  # trainable nodes' logits
    node_ce: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # labels of transfers dropped this step (DGKD)


def _seeded_build(recipe: Recipe, name: str, index: int, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    spec = recipe.nodes[name]
    seed = spec.init_seed if spec.init_seed is not None else recipe.seed * 1000 + index
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % 2**64)  # torch reads a negative seed as this; seed·1000 may pass 2**64
        try:
            return build_model(spec.arch, num_classes, input_shape, **spec.args)
        except KeyError as e:
            raise RecipeError(f"nodes.{name}.arch: {e.args[0]}") from None
        # an unknown argument, a value the model refuses (a dropout of 1.5), a size torch refuses (a width of -1)
        # or cannot allocate
        except (TypeError, ValueError, RuntimeError) as e:
            raise RecipeError(f"nodes.{name}.args: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_node_checkpoint(model: nn.Module, name: str, spec_arch: str, path: str) -> None:
    path = resolve_checkpoint(path, f"nodes.{name}.checkpoint")
    try:
        ckpt = read_model_file(path)
    except (FileNotFoundError, ValueError) as e:
        raise RecipeError(f"nodes.{name}.checkpoint: {e}") from None
    if "arch" in ckpt and ckpt["arch"] != spec_arch:
        raise RecipeError(f"nodes.{name}.checkpoint: {path} holds a {ckpt['arch']!r}, the recipe says {spec_arch!r}")
    mismatch = state_dict_mismatch(model, ckpt["state_dict"])
    if mismatch:
        raise RecipeError(f"nodes.{name}.checkpoint: {path} does not fit {spec_arch!r}: {mismatch}")
    model.load_state_dict(ckpt["state_dict"], strict=True)


def fuse(sources: list[torch.Tensor], spec: FuseSpec) -> torch.Tensor:
    """Combine source taps: their mean, a weighted sum, or per sample by each source's confidence
    (its top softmax probability, normalised over the sources)."""
    if spec.mode == "confidence":
        conf = torch.stack([s.detach().float().softmax(dim=1).amax(dim=1) for s in sources])  # K×B
        w = conf / conf.sum(dim=0, keepdim=True)
        return sum(w[k].unsqueeze(1) * s for k, s in enumerate(sources))
    ws = spec.weights if spec.mode == "weights" else [1.0 / len(sources)] * len(sources)
    return sum(w * s for w, s in zip(ws, sources))


class Flow(nn.Module):
    def __init__(
        self,
        recipe: Recipe,
        num_classes: int,
        input_shape: tuple[int, ...],
        sample: torch.Tensor | None,
        num_data: int = 0,
        models: dict[str, nn.Module] | None = None,
        train_labels: torch.Tensor | None = None,
    ) -> None:
        """Build every node, hook its taps and check every transfer's shapes on `sample` (a small batch;
        None skips the check, for graphs without shape-dependent helpers).

        `num_data` is the size of the training split (criteria with a per-sample memory need it);
        `train_labels` its labels by sample index (CRD draws negatives from the other classes).
        `models` supplies ready nn.Modules for some nodes (the library API); those are used as they are.
        """
        super().__init__()
        self.recipe = recipe
        self.stages = recipe.resolved_stages()
        self.models = nn.ModuleDict()
        for i, name in enumerate(recipe.nodes):
            if models and name in models:
                self.models[name] = models[name]
                continue
            self.models[name] = _seeded_build(recipe, name, i, num_classes, input_shape)
            if recipe.nodes[name].checkpoint:
                load_node_checkpoint(self.models[name], name, recipe.nodes[name].arch, recipe.nodes[name].checkpoint)
        # stage positions (last_stage, all_stages, stage[i]) become concrete taps now that the models exist
        # notes: stages all_stages left out where two models' stage counts differ (the engine prints them)
        recipe, self.transfer_origin, self.notes = expand_stage_taps(recipe, dict(self.models))
        self.recipe = recipe
        taps: dict[str, set[str]] = {name: {"logits"} for name in recipe.nodes}
        for t in recipe.transfers:
            for tap in [*t.targets, *t.sources]:
                node, name = split_tap(tap)
                taps[node].add(name)
        self.recorders: dict[str, TapRecorder] = {}
        for i, t in enumerate(recipe.transfers):
            for where, tap in [(f"{self.where(i)}.to", s) for s in t.targets] + [(f"{self.where(i)}.from", s) for s in t.sources]:
                node, name = split_tap(tap)
                try:
                    TapRecorder(node, self.models[node], {name}).remove()
                except RecipeError as e:
                    raise RecipeError(f"{where}: {e}") from None
        for node in recipe.nodes:
            self.recorders[node] = TapRecorder(node, self.models[node], taps[node])
        self.connectors = nn.ModuleDict()  # by transfer index
        self.criterion_modules = nn.ModuleDict()  # by transfer index
        self.num_data = num_data
        self.train_labels = train_labels
        self.runners: dict[str, nn.Module] = {}  # node -> a wrapper to run it through (DDP); not in the state dict
        # node -> {parameter: requires_grad} as they were when set_stage_modes froze the node: unfreezing restores
        # them, so parameters the user froze stay frozen
        self.frozen_flags: dict[str, dict[str, bool]] = {}
        self.autocast_dtype: torch.dtype | None = None  # mixed precision for the nodes' forward passes
        if sample is not None:
            self._check_shapes(sample)

    def where(self, i: int) -> str:
        """The recipe place of the Flow's transfer `i` (transfers expanded from all_stages share their recipe index)."""
        origin = self.transfer_origin[i]
        taps = self.recipe.transfers[i].targets
        expanded = self.transfer_origin.count(origin) > 1
        return f"transfers.{origin}" + (f" ({taps[0].split('.', 1)[1]})" if expanded else "")

    def _check_shapes(self, sample: torch.Tensor) -> None:
        shapes: dict[str, tuple[int, ...]] = {}
        values: dict[str, torch.Tensor] = {}
        was_training = {n: m.training for n, m in self.models.items()}
        self.models.eval()
        with torch.no_grad():
            for node, rec in self.recorders.items():
                try:
                    out = rec.run(sample)
                except (RuntimeError, ValueError) as e:  # a model that does not take the data's inputs (too small)
                    first = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise RecipeError(
                        f"nodes.{node}: {self.recipe.nodes[node].arch} cannot run on the data's inputs "
                        f"of shape {tuple(sample.shape[1:])}: {first}"
                    ) from None
                for tap, value in out.items():
                    shapes[f"{node}.{tap}"] = tuple(value.shape[1:])
                    values[f"{node}.{tap}"] = value
        for n, m in self.models.items():
            m.train(was_training[n])
        for i, t in enumerate(self.recipe.transfers):
            where = self.where(i)
            crit = CRITERIA[t.criterion]
            if isinstance(t.source, FuseSpec) and len({shapes[s] for s in t.sources}) > 1:
                listed = ", ".join(f"{s} {shapes[s]}" for s in t.sources)
                raise RecipeError(f"{where}.from: fused sources differ in shape: {listed}")
            grouped = isinstance(t.source, GroupSpec)
            src_shape = [shapes[s] for s in t.sources] if grouped else shapes[t.sources[0]]
            tgt_shape = [shapes[s] for s in t.targets] if grouped else shapes[t.targets[0]]
            if t.connector is not None:
                conn = build_connector(t.connector.kind, tgt_shape, src_shape, f"{where}.connector")
                self.connectors[str(i)] = conn
                with torch.no_grad():
                    conn.eval()
                    tgt_shape = tuple(conn(torch.zeros(2, *tgt_shape)).shape[1:])
                    conn.train()
            if crit.same_shape and tgt_shape != src_shape:
                raise RecipeError(
                    f"{where}: shape mismatch: {t.to} is {tgt_shape}, {t.sources[0]} is {src_shape}; "
                    "add a connector (connector: linear | conv1x1 | conv3x3 | regressor)"
                )
            if crit.module:
                self.criterion_modules[str(i)] = self._build_criterion(i, t, tgt_shape, src_shape)
            else:
                self._try_criterion(i, t, values, sample)

    def _try_criterion(self, i: int, t: TransferSpec, values: dict[str, torch.Tensor], sample: torch.Tensor) -> None:
        """Evaluate a plain criterion once on the dry run's taps, so taps it cannot compare (FSP's channel
        counts, say) stop the run here rather than at its first step. Module criteria check in their factory."""
        n = sample.shape[0]
        context = {"target": torch.zeros(n, dtype=torch.long), "epoch": 0, "epochs": 1,
                   "indices": torch.arange(n), "stage": self.stages[0].name, "x": sample}
        try:
            with torch.no_grad():
                self.transfer_value(i, t, values, context)
        except (RuntimeError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RecipeError(f"{self.where(i)}: criterion {t.criterion!r} cannot compare these taps: {first}") from None
        except (TypeError, ArithmeticError) as e:  # a parameter's value the loss cannot compute with (an int beyond int64)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            given = ", ".join(f"{k}={v!r}" for k, v in t.params.items())
            raise RecipeError(f"{self.where(i)}: criterion {t.criterion!r} fails with its parameters ({given}): {first}") from None

    def _build_criterion(self, i: int, t: TransferSpec, tgt_shape, src_shape) -> nn.Module:
        src_node, src_tap = split_tap(t.sources[0])
        tgt_node, tgt_tap = split_tap(t.targets[0])

        def module_name(node: str, tap: str) -> str | None:
            return None if tap == "logits" else resolve_module(self.models[node], node, tap)[0]

        info = BuildInfo(
            num_data=self.num_data,
            train_labels=self.train_labels,
            source_model=None if isinstance(t.source, FuseSpec) else self.models[src_node],
            target_model=self.models[tgt_node],
            source_module=None if isinstance(t.source, FuseSpec) else module_name(src_node, src_tap),
            target_module=module_name(tgt_node, tgt_tap),
            source_modules=() if isinstance(t.source, FuseSpec) else tuple(module_name(*split_tap(s)) for s in t.sources),
        )
        try:
            return CRITERIA[t.criterion].fn(tgt_shape, src_shape, info, **t.params)
        except (ValueError, TypeError, RuntimeError, ArithmeticError) as e:  # also a size torch refuses (feat_dim: -1, 0)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RecipeError(f"{self.where(i)}: criterion {t.criterion!r}: {first}") from None

    def helpers_of(self, node: str) -> list[nn.Module]:
        """The trainable helpers a node owns: connectors and criterion modules of transfers into it."""
        return [
            group[str(i)]
            for i, t in enumerate(self.recipe.transfers)
            if t.target_node == node
            for group in (self.connectors, self.criterion_modules)
            if str(i) in group
        ]

    def parameters_of(self, node: str) -> list[nn.Parameter]:
        """A node's own parameters and those of the helpers it owns."""
        params = list(self.models[node].parameters())
        for helper in self.helpers_of(node):
            params += list(helper.parameters())
        return params

    def compile_nodes(self) -> list[str]:
        """torch.compile every node's forward (`train.compile`): each tap recorder calls the compiled module,
        while `models` keep the originals (their parameters, state dicts and optimizers are unchanged).
        Compilation happens on a node's first calls, in train and in eval mode; returns the nodes."""
        for node, recorder in self.recorders.items():
            recorder.model = torch.compile(self.models[node])
        return list(self.recorders)

    def set_stage_modes(self, stage: StageSpec) -> None:
        """Training nodes (and their helpers) in train mode with gradients; every other node eval, frozen.

        A node's own parameters are frozen by this call and given back as they were: a parameter its owner set
        to requires_grad=False stays so when the node trains."""
        for name, model in self.models.items():
            training = name in stage.train
            if training and name in self.frozen_flags:
                flags = self.frozen_flags.pop(name)
                for key, p in model.named_parameters():
                    p.requires_grad_(flags.get(key, True))
            elif not training and name not in self.frozen_flags:
                self.frozen_flags[name] = {key: p.requires_grad for key, p in model.named_parameters()}
                model.requires_grad_(False)
            model.train(training)
            for helper in self.helpers_of(name):
                helper.train(training)
                helper.requires_grad_(training)

    def run_nodes(
        self, x: torch.Tensor, stage: StageSpec, cached: dict[str, torch.Tensor] | None = None, only: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Every tap the stage needs. `cached` holds taps read from a teacher-output cache: their nodes do not run.
        With `only` (an alternating update), the stage's other training nodes run in train mode without gradient."""
        values: dict[str, torch.Tensor] = dict(cached or {})
        for node, rec in self.recorders.items():
            if not self.recipe.is_used(node, stage) or f"{node}.logits" in values:
                continue
            if node in stage.train and only is not None and node != only:
                with torch.no_grad():
                    out = rec.run(x, self.runners.get(node))
            elif node in stage.train:
                out = rec.run(x, self.runners.get(node))
            else:
                # frozen is a property of the node: whatever put it in train mode since (a parent module's .train(),
                # the user's), it runs in eval mode, so dropout is off and batch-norm statistics never move
                self.models[node].eval()
                batch_stats = self.recipe.nodes[node].batch_norm == "batch"
                with torch.inference_mode(), batch_statistics(self.models[node]) if batch_stats else nullcontext():
                    out = rec.run(x)
                # inference tensors cannot be saved for backward: copy them out once
                out = {k: v.clone() for k, v in out.items()}
            values.update({f"{node}.{k}": v for k, v in out.items()})
        return values

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        stage: StageSpec,
        epoch: int,
        indices: torch.Tensor | None = None,
        cached: dict[str, torch.Tensor] | None = None,
        only: str | None = None,
    ) -> FlowOutput:
        """All losses of one batch. `indices` are the samples' positions in the training split.
        With `only`, the losses of that training node alone (its supervision, the transfers into it): one
        node's part of an alternating update (`StageSpec.updates`).

        With `autocast_dtype` set, the nodes run under autocast and every loss is computed in fp32."""
        if self.autocast_dtype is None:
            taps = self.run_nodes(x, stage, cached, only)
        else:
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                taps = self.run_nodes(x, stage, cached, only)
            taps = {k: v.float() if v.is_floating_point() else v for k, v in taps.items()}
        # the sum is float32, or float64 when the nodes run in float64 (parity checks)
        loss_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = FlowOutput(total=torch.zeros((), device=x.device, dtype=loss_dtype))
        for node in stage.train:
            logits = taps[f"{node}.logits"]
            out.logits[node] = logits
            out.node_ce[node] = F.cross_entropy(logits.to(loss_dtype), y)
        for node, sup in self.recipe.active_supervision(stage).items():
            if only is not None and node != only:
                continue
            w = weight_at(sup.weight, epoch)
            label = f"{sup.loss}({node})"
            value = out.node_ce[node] if sup.loss == "ce" else SUPERVISION[sup.loss].fn(out.logits[node], y, **sup.params)
            out.terms[label], out.weights[label] = value, w
            if w:
                out.total = out.total + w * value
        context = {"target": y, "epoch": epoch, "epochs": stage.epochs, "indices": indices, "stage": stage.name, "x": x}
        active = [(i, t) for i, t in self.recipe.active_transfers(stage) if only is None or t.target_node == only]
        dropped = self._drawn_drops(active)
        for i, t in active:
            label = transfer_label(t)
            if i in dropped:
                out.dropped.append(label)
                continue
            w = weight_at(t.weight, epoch)
            value = self.transfer_value(i, t, taps, context)
            out.terms[label], out.weights[label] = value, w
            if w:
                out.total = out.total + w * value
        return out

    def cacheable_nodes(self, stage: StageSpec) -> list[str]:
        """Frozen nodes this stage reads only the logits of: their outputs can come from a teacher cache."""
        out = []
        for node in self.recipe.nodes:
            if node in stage.train or not self.recipe.is_used(node, stage) or self.recipe.nodes[node].batch_norm == "batch":
                continue
            taps = {s for _, t in self.recipe.active_transfers(stage) for s in t.sources if s.split(".", 1)[0] == node}
            if taps == {f"{node}.logits"}:
                out.append(node)
        return out

    def _drawn_drops(self, active: list[tuple[int, TransferSpec]]) -> set[int]:
        """Indices of the transfers to skip this step: `drop[pool]` drawn uniformly from each pool's active ones."""
        dropped: set[int] = set()
        for pool, k in self.recipe.drop.items():
            members = [i for i, t in active if t.pool == pool]
            if k and members:
                order = torch.randperm(len(members))  # the global RNG: checkpointed, so resume replays it
                dropped.update(members[j] for j in order[:k].tolist())
        return dropped

    def transfer_value(self, index: int, t: TransferSpec, taps: dict[str, torch.Tensor], context: dict) -> torch.Tensor:
        sources = [taps[s] for s in t.sources]
        if isinstance(t.source, GroupSpec):
            source = [s.detach() if t.detach else s for s in sources]
            target = [taps[s] for s in t.targets]
        else:
            if isinstance(t.source, FuseSpec) and len(sources) > 1:
                source = fuse(sources, t.source)
            else:
                source = sources[0]
            if t.detach:
                source = source.detach()
            target = taps[t.targets[0]]
            if str(index) in self.connectors:
                target = self.connectors[str(index)](target)
            if t.logit_standardization:
                source, target = standardize(source), standardize(target)
        crit = CRITERIA[t.criterion]
        if crit.module:
            return crit.call(self.criterion_modules[str(index)], target, source, {}, context)
        return crit.call(crit.fn, target, source, t.params, context)
