"""The recipe schema: what a run is, validated before anything starts.

A recipe names the data, the nodes (models with roles), the supervision of each trainable
node, the transfers between taps, the stages, and the optimisation settings. Methods
(`kdflow.methods`) fill in nodes' roles, supervision and transfers with a paper's defaults.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

import kdflow.losses  # noqa: F401  (importing the losses fills the criterion registry)
from kdflow.flow.arguments import argument_error
from kdflow.losses.registry import SUPERVISION
from kdflow.losses.registry import CRITERIA, RENAMED


def _default_of(fn: Any, param: str) -> Any:
    """The default value of `fn`'s parameter `param` (None if it has none)."""
    default = inspect.signature(fn).parameters[param].default
    return None if default is inspect.Parameter.empty else default


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class WeightSchedule(Strict):
    """A loss weight over epochs (0-based within the stage): linear warm-up, then steps."""

    value: float
    warmup_epochs: int = Field(0, ge=0)  # value · min((epoch + 1) / warmup_epochs, 1)
    milestones: list[int] = []  # value · gamma^(number of milestones ≤ epoch)
    gamma: float = 0.1

    def at(self, epoch: int) -> float:
        w = self.value
        if self.warmup_epochs:
            w *= min((epoch + 1) / self.warmup_epochs, 1.0)
        return w * self.gamma ** sum(epoch >= m for m in self.milestones)


Weight = float | WeightSchedule


def weight_at(weight: Weight, epoch: int) -> float:
    return weight.at(epoch) if isinstance(weight, WeightSchedule) else float(weight)


class OptimSpec(Strict):
    """SGD settings; a node's `optim` overrides the fields it names. `name: dot` is DOT (Zhao, Cui, Song, Liang 2023,
    engine/dot.py): the supervised terms' gradient and the transfer terms' gradient keep separate momenta,
    `momentum - delta` and `momentum + delta`, in one step."""

    name: Literal["sgd", "dot"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    delta: float | None = Field(None, ge=0)  # dot's momentum gap Δ; 0.075 when not given (the authors' CIFAR-100 value)

    @model_validator(mode="after")
    def _dot_settings(self) -> "OptimSpec":
        if self.name != "dot":
            if self.delta is not None:
                raise ValueError("delta: a setting of DOT (its momentum gap); add name: dot, or remove delta")
            return self
        if self.delta is None:
            self.delta = 0.075
        if self.nesterov:
            raise ValueError("nesterov: DOT's two momenta are plain (heavy-ball) momenta; set nesterov: false")
        if self.delta > self.momentum:
            raise ValueError(f"delta: {self.delta:g} exceeds momentum {self.momentum:g}; the supervised gradient's "
                             "momentum (momentum - delta) cannot be negative")
        return self

    @model_serializer(mode="wrap")
    def _sgd_as_before(self, handler: Any) -> dict:
        data = handler(self)
        if self.name == "sgd":  # a recipe without DOT is written as before DOT existed (same recipe.yaml, same hash)
            data.pop("name", None)
            data.pop("delta", None)
        return data


class NodeOptim(Strict):
    lr: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0)
    weight_decay: float | None = Field(None, ge=0)
    nesterov: bool | None = None


class NodeSpec(Strict):
    """A model in the graph. A node with a checkpoint and no role is frozen (a pretrained teacher);
    say `role: trainable` to fine-tune from a checkpoint."""

    arch: str
    same_as: str | None = None  # copy `arch` and `args` from that node (SLKD's SL-Ts, Born-Again generations)
    role: Literal["frozen", "trainable"] = "trainable"
    checkpoint: str | None = None
    args: dict[str, Any] = {}
    init_seed: int | None = None  # two nodes with the same arch and init_seed start equal
    optim: NodeOptim | None = None
    # a frozen node's batch norms: running statistics (eval mode), or each batch's own statistics
    # (OFD's reference runs its teacher in train mode); the running statistics are never updated
    batch_norm: Literal["running", "batch"] = "running"

    @model_validator(mode="before")
    @classmethod
    def _checkpointed_is_frozen(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("checkpoint") and "role" not in data:
            return {**data, "role": "frozen"}
        return data


class FuseSpec(Strict):
    """Several source taps combined into one: the mean, a weighted sum with `weights`, or, with
    `mode: confidence`, per sample weights proportional to each source's top softmax probability
    (the sources must be logits)."""

    fuse: list[str] = Field(min_length=1)
    weights: list[float] | None = None
    mode: Literal["mean", "weights", "confidence"] | None = None  # default: weights if given, else mean

    @model_validator(mode="after")
    def _weights_match(self) -> "FuseSpec":
        if self.weights is not None and len(self.weights) != len(self.fuse):
            raise ValueError(f"fuse has {len(self.fuse)} sources but {len(self.weights)} weights")
        if self.mode is None:
            self.mode = "weights" if self.weights is not None else "mean"
        if self.mode == "weights" and self.weights is None:
            raise ValueError("fuse mode 'weights' needs weights")
        if self.mode == "confidence" and not all(tap.endswith(".logits") for tap in self.fuse):
            raise ValueError("fuse mode 'confidence' weighs logits taps only")
        return self


class GroupSpec(Strict):
    """Several taps handed to a grouped criterion as one list (FSP's pair of stages, ReviewKD's stages)."""

    group: list[str] = Field(min_length=1)


class ConnectorSpec(Strict):
    kind: Literal["linear", "conv1x1", "conv3x3", "regressor"]


def _inline_params(data: Any, known: set[str]) -> Any:
    """Move keys that are not fields into `params` (the criterion's or the loss's parameters)."""
    if not isinstance(data, dict):
        return data
    extra = {k: v for k, v in data.items() if k not in known}
    if not extra:
        return data
    data = {k: v for k, v in data.items() if k in known}
    data["params"] = {**data.get("params", {}), **extra}
    return data


class TransferSpec(Strict):
    """An edge: source tap(s) → target tap through a criterion. Unknown keys are criterion parameters."""

    source: str | FuseSpec | GroupSpec = Field(alias="from")
    to: str | GroupSpec
    criterion: str
    weight: Weight = 1.0
    params: dict[str, Any] = {}
    connector: ConnectorSpec | None = None
    detach: bool = True
    stages: list[str] | None = None  # active only in these stages (default: whenever the target trains)
    pool: str | None = None  # a named pool of transfers of which `Recipe.drop[pool]` are dropped per step (DGKD)
    # Sun et al. 2024 (CVPR): both sides' logits z-scored per row (`kdflow.losses.standardize`) before the criterion
    logit_standardization: bool = False

    @model_validator(mode="before")
    @classmethod
    def _collect_params(cls, data: Any) -> Any:
        known = {"from", "source", "to", "criterion", "weight", "params", "connector", "detach", "stages", "pool", "logit_standardization"}
        data = _inline_params(data, known)
        if isinstance(data, dict) and isinstance(data.get("connector"), str):
            data = {**data, "connector": {"kind": data["connector"]}}
        return data

    @model_validator(mode="after")
    def _criterion_known(self) -> "TransferSpec":
        if self.criterion in RENAMED:
            raise ValueError(f"criterion {self.criterion!r} is now called {RENAMED[self.criterion]!r} (the name of its loss)")
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {self.criterion!r}; known: {', '.join(sorted(CRITERIA))}")
        crit = CRITERIA[self.criterion]
        for key in self.params:
            if key not in crit.params:
                raise ValueError(
                    f"unknown field {key!r}: criterion {self.criterion!r} takes {', '.join(crit.params) or 'no parameters'}"
                )
            problem = argument_error(crit.fn, key, self.params[key])
            if problem:
                raise ValueError(f"{problem} (criterion {self.criterion!r})")
        grouped = isinstance(self.to, GroupSpec) and isinstance(self.source, GroupSpec)
        if crit.grouped != grouped:
            need = "takes" if crit.grouped else "does not take"
            raise ValueError(f"criterion {self.criterion!r} {need} tap groups ({{group: [...]}}) on both sides")
        if grouped and self.connector is not None:
            raise ValueError("a connector maps one tap; a grouped criterion builds its own helpers")
        if self.logit_standardization:
            not_logits = [tap for tap in self.sources + self.targets if not tap.endswith(".logits")]
            if not_logits:
                raise ValueError(f"logit_standardization: z-scores logits, but {not_logits[0]!r} is not a logits tap")
            if "x" in crit.context:
                raise ValueError(f"logit_standardization: criterion {self.criterion!r} computes logits of its own inputs; it cannot be standardized from the taps")
        return self

    @property
    def sources(self) -> list[str]:
        return self.source.fuse if isinstance(self.source, FuseSpec) else self.source.group if isinstance(self.source, GroupSpec) else [self.source]

    @property
    def targets(self) -> list[str]:
        return self.to.group if isinstance(self.to, GroupSpec) else [self.to]

    @property
    def target_node(self) -> str:
        return self.targets[0].split(".", 1)[0]


PROBABILITIES = {"epsilon"}  # loss parameters that are probabilities (label smoothing's ε)


def _check_probability(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError(f"{name}: {value!r} is a probability; it must lie in [0, 1]")


class SuperviseSpec(Strict):
    """A trainable node's loss against the labels: `ce` by default; unknown keys are the loss's parameters."""

    weight: Weight = 1.0
    loss: str = "ce"
    params: dict[str, Any] = {}
    stages: list[str] | None = None  # active only in these stages (default: whenever the node trains)

    @model_validator(mode="before")
    @classmethod
    def _collect_params(cls, data: Any) -> Any:
        if isinstance(data, (int, float)) or (isinstance(data, dict) and "value" in data):
            return {"weight": data}  # a bare weight or weight schedule
        return _inline_params(data, {"weight", "loss", "params", "stages"})

    @model_validator(mode="after")
    def _loss_known(self) -> "SuperviseSpec":
        if self.loss not in SUPERVISION:
            raise ValueError(f"unknown loss {self.loss!r}; known: {', '.join(sorted(SUPERVISION))}")
        allowed = SUPERVISION[self.loss].params
        for key in self.params:
            if key not in allowed:
                raise ValueError(f"unknown field {key!r}: loss {self.loss!r} takes {', '.join(allowed) or 'no parameters'}")
            problem = argument_error(SUPERVISION[self.loss].fn, key, self.params[key])
            if problem:
                raise ValueError(f"{problem} (loss {self.loss!r})")
        for key in PROBABILITIES & set(self.params):
            _check_probability(key, self.params[key])
        return self


class StageSpec(Strict):
    name: str
    train: list[str] | None = None  # default: every node whose role is trainable
    # default: train.epochs. A stage of 0 epochs is skipped (AB's init_epochs: 0), as long as every node it
    # trains gets at least one epoch in some stage (Recipe._every_node_trains)
    epochs: int | None = Field(None, ge=0)
    # joint: one forward, one summed loss, one backward, every node stepped (the default); alternating: the
    # training nodes updated one after another on each batch, each from a fresh forward of every node (DML's
    # Algorithm 1; engine/train.py alternating_step)
    updates: Literal["joint", "alternating"] = "joint"


class ScheduleSpec(Strict):
    kind: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = []  # epochs at which lr is multiplied by gamma (multistep)
    gamma: float = 0.1
    warmup_epochs: int = Field(0, ge=0)  # linear warm-up per iteration from lr/steps


class TeacherCacheSpec(Strict):
    """Frozen teachers' logits computed once per (sample, view) and read from a memory-mapped file."""

    enabled: bool = False
    dtype: Literal["float16", "float32"] = "float16"
    topk: int | None = Field(None, gt=0)  # store only the top-k logits (exact when k = classes)
    dir: str | None = None  # default: $KDFLOW_CACHE or .kdflow-cache/


class TrainSpec(Strict):
    epochs: int = Field(10, ge=0)
    batch_size: int = Field(128, gt=0)
    eval_batch_size: int = Field(1000, gt=0)
    optim: OptimSpec = OptimSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    channels_last: bool = True  # NHWC memory format for image models: 1.3-1.8× faster here (docs/benchmarks.md)
    save_epochs: list[int] = []  # also keep nodes/NODE-epochE.pt after these epochs (ESKD's early teachers)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast for the forward passes; losses stay fp32
    compile: bool = False  # torch.compile every node's forward (0.69× the eager step time here, docs/benchmarks.md §6)
    views: int | None = Field(None, ge=1, lt=2**63)  # fixed augmented views per sample (replayable); None: fresh every epoch
    teacher_cache: TeacherCacheSpec = TeacherCacheSpec()  # needs views; views default to the stage's epochs
    # multi-process runs: training nodes' and their helpers' batch norms use the global batch's statistics
    # (engine/sync_bn.py); off: each rank normalises by its shard's. No effect in one process.
    sync_bn: bool = False
    # torch's intra-op threads for this run (None: leave the process's setting). The thread count changes the
    # order of float reductions, so runs that must give identical numbers wherever they run fix it (studies: 1).
    threads: int | None = Field(None, ge=1, lt=2**31)  # (torch.set_num_threads takes a C int)
    # a NaN or infinite loss, gradient or batch-norm statistic: stop the run with one line (the default), or
    # skip that optimizer step (batch-norm statistics restored) and count it as `nonfinite_steps` in the metrics
    on_nonfinite: Literal["stop", "skip_step"] = "stop"


class AugmentSpec(Strict):
    crop_padding: int = Field(0, ge=0)
    flip: bool = False


class NoiseSpec(Strict):
    """Label noise on the training split (test stays clean): exactly round(rate·N) labels changed."""

    kind: Literal["symmetric", "pairflip", "asymmetric_cifar10"] = "symmetric"
    rate: float = Field(ge=0, le=1)
    seed: int = 0


class ImbalanceSpec(Strict):
    """A long-tailed training split (test stays balanced): exponential n_i = n_max·ρ^(−i/(C−1)), or step."""

    kind: Literal["exponential", "step"] = "exponential"
    ratio: float = Field(ge=1)
    seed: int = 0


class ValidationSpec(Strict):
    """A validation split held out of the training split, on which `best` is chosen (never on test).

    Carved after `limit`, imbalance and label noise, so it is corrupted like the training split;
    stratified by the clean labels, seeded. `size`: a fraction of the training split (< 1) or a count."""

    size: float = Field(gt=0)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _number(cls, data: Any) -> Any:
        return {"size": data} if isinstance(data, (int, float)) and not isinstance(data, bool) else data

    @model_validator(mode="after")
    def _fraction_or_count(self) -> "ValidationSpec":
        if self.size >= 1 and (not math.isfinite(self.size) or self.size != int(self.size)):
            raise ValueError(f"size: {self.size:g} is neither a fraction below 1 nor a whole number of samples")
        return self


class DataSpec(Strict):
    name: str
    root: str | None = None
    limit: int | None = Field(None, gt=0)  # a seeded random subset of the training split
    test_limit: int | None = Field(None, ge=2)  # the graph's dry run before training takes two test samples
    options: dict[str, Any] = {}
    augment: AugmentSpec = AugmentSpec()
    imbalance: ImbalanceSpec | None = None  # applied after `limit`
    noise: NoiseSpec | None = None  # applied after imbalance
    validation: ValidationSpec | None = None  # held out last: `validation: 0.1` or {size: 500, seed: 1}


class Recipe(Strict):
    name: str = "run"
    description: str = ""
    seed: int = Field(0, ge=-(2**63), lt=2**64)  # what torch.manual_seed takes
    device: str = "auto"
    data: DataSpec
    nodes: dict[str, NodeSpec] = Field(min_length=1)
    supervise: dict[str, SuperviseSpec] = {}
    transfers: list[TransferSpec] = []
    stages: list[StageSpec] = []
    train: TrainSpec = TrainSpec()
    drop: dict[str, int] = {}  # pool name -> how many of its active transfers to drop at random each step
    ensembles: dict[str, list[str]] = {}  # name -> nodes whose mean softmax is evaluated after each stage

    @field_validator("device")
    @classmethod
    def _device_named(cls, device: str) -> str:
        """A device torch can name (whether this machine has it is known when the run starts)."""
        if device != "auto":
            try:
                torch.device(device)
            except (RuntimeError, ValueError) as e:
                raise ValueError(f"{device!r} is not a device (auto, cpu, cuda, cuda:N, mps, ...): {str(e).splitlines()[0]}") from None
        return device

    @model_validator(mode="before")
    @classmethod
    def _same_as(cls, data: Any) -> Any:
        nodes = data.get("nodes") if isinstance(data, dict) else None
        if not isinstance(nodes, dict):
            return data
        out = {}
        for name, node in nodes.items():
            if isinstance(name, str) and (not name or "." in name):  # a tap is NODE.TAP, split at the first dot
                raise ValueError(f"nodes: {name!r} cannot name a node; a node's name is not empty and has no '.'")
            ref = node.get("same_as") if isinstance(node, dict) else None
            if ref is not None:
                if not isinstance(ref, str) or ref not in nodes or not isinstance(nodes[ref], dict) or nodes[ref].get("same_as"):
                    raise ValueError(f"nodes.{name}.same_as: {ref!r} is not a node with its own arch")
                node = {"arch": nodes[ref].get("arch"), "args": nodes[ref].get("args", {}), **node}
            out[name] = node
        return {**data, "nodes": out}

    @model_validator(mode="before")
    @classmethod
    def _fan_out(cls, data: Any) -> Any:
        """`to: [a.logits, b.logits]` is one transfer per target (DESIGN's SLKD sketch)."""
        if not isinstance(data, dict) or not isinstance(data.get("transfers"), list):
            return data
        out = []
        for t in data["transfers"]:
            if isinstance(t, dict) and isinstance(t.get("to"), list):
                out += [{**t, "to": target} for target in t["to"]]
            else:
                out.append(t)
        return {**data, "transfers": out}

    @model_validator(mode="after")
    def _references(self) -> "Recipe":
        names = set(self.nodes)

        def node_of(tap: str, where: str) -> str:
            node = tap.split(".", 1)[0]
            if "." not in tap or node not in names:
                raise ValueError(f"{where}: tap {tap!r} must be NODE.TAP with NODE one of {', '.join(sorted(names))}")
            return node

        for node in self.supervise:
            if node not in names:
                raise ValueError(f"supervise.{node}: no such node (nodes: {', '.join(sorted(names))})")
        stage_names = [s.name for s in self.stages] or ["main"]
        if len(set(stage_names)) != len(stage_names):
            raise ValueError(f"stages: names must be unique, got {stage_names}")
        for i, t in enumerate(self.transfers):
            targets = {node_of(tap, f"transfers.{i}.to") for tap in t.targets}
            if len(targets) > 1:
                raise ValueError(f"transfers.{i}.to: a group's taps must all be on one node, got {sorted(targets)}")
            for s in t.sources:
                node_of(s, f"transfers.{i}.from")
            for name in t.stages or []:
                if name not in stage_names:
                    raise ValueError(f"transfers.{i}.stages: no stage {name!r} (stages: {', '.join(stage_names)})")
            for param in CRITERIA[t.criterion].stage_params:
                name = t.params.get(param, _default_of(CRITERIA[t.criterion].fn, param))
                if name is not None and name not in stage_names:
                    raise ValueError(
                        f"transfers.{i}: criterion {t.criterion!r} refers to stage {name!r} ({param}) which the recipe "
                        f"does not have (stages: {', '.join(stage_names)})"
                    )
        pools = {t.pool for t in self.transfers if t.pool}
        for pool, k in self.drop.items():
            if pool not in pools:
                raise ValueError(f"drop.{pool}: no transfer has pool {pool!r}")
            if k < 0:
                raise ValueError(f"drop.{pool}: cannot drop {k} transfers")
        for ens, members in self.ensembles.items():
            for node in members:
                if node not in names:
                    raise ValueError(f"ensembles.{ens}: no such node {node!r}")
        for node, sup in self.supervise.items():
            for name in sup.stages or []:
                if name not in stage_names:
                    raise ValueError(f"supervise.{node}.stages: no stage {name!r} (stages: {', '.join(stage_names)})")
        for i, stage in enumerate(self.stages):
            for node in stage.train or []:
                if node not in names:
                    raise ValueError(f"stages.{i}.train: no such node {node!r} (nodes: {', '.join(sorted(names))})")
        trained: set[str] = set()
        for stage in self.resolved_stages():
            for name, node in self.nodes.items():
                unready = name not in stage.train and name not in trained and node.checkpoint is None
                if unready and (node.role == "frozen" or self.is_used(name, stage)):
                    raise ValueError(
                        f"nodes.{name}: frozen in stage {stage.name!r} but has no checkpoint and no earlier stage trains it"
                    )
            trained.update(stage.train)
        self._every_node_trains()
        return self

    def _every_node_trains(self) -> None:
        """Every node a stage trains gets at least one epoch somewhere: otherwise it would be saved untrained
        (nodes/NODE.pt) and later recipes would load it as trained. A stage of 0 epochs is fine (skipped) when
        its nodes train in another stage."""
        stages = self.resolved_stages()
        epochs: dict[str, int] = {}
        for i, stage in enumerate(stages):
            if not stage.train:
                field = f"stages.{i}.train" if self.stages and self.stages[i].train is not None else "nodes"
                raise ValueError(f"{field}: stage {stage.name!r} trains no node; a stage trains at least one")
            for node in stage.train:
                epochs[node] = epochs.get(node, 0) + (stage.epochs or 0)
        for i, stage in enumerate(stages):
            idle = [n for n in stage.train if epochs[n] == 0]
            if idle:
                field = f"stages.{i}.epochs" if self.stages and self.stages[i].epochs is not None else "train.epochs"
                raise ValueError(
                    f"{field}: stage {stage.name!r} runs 0 epochs and {', '.join(idle)} "
                    f"{'trains' if len(idle) == 1 else 'train'} in no other stage, so would be saved untrained; "
                    "give it at least 1 epoch"
                )

    def resolved_stages(self) -> list[StageSpec]:
        """Stages with `train` and `epochs` filled in; one stage training every trainable node by default."""
        stages = self.stages or [StageSpec(name="main")]
        default_train = [n for n, node in self.nodes.items() if node.role == "trainable"]
        return [
            StageSpec(
                name=s.name,
                train=list(s.train) if s.train is not None else default_train,
                epochs=s.epochs if s.epochs is not None else self.train.epochs,
                updates=s.updates,
            )
            for s in stages
        ]

    def active_transfers(self, stage: StageSpec) -> list[tuple[int, TransferSpec]]:
        """Transfers whose target node trains in `stage` (and that are not limited to other stages)."""
        return [
            (i, t)
            for i, t in enumerate(self.transfers)
            if t.target_node in (stage.train or []) and (t.stages is None or stage.name in t.stages)
        ]

    def active_supervision(self, stage: StageSpec) -> dict[str, SuperviseSpec]:
        return {
            node: sup
            for node, sup in self.supervise.items()
            if node in (stage.train or []) and (sup.stages is None or stage.name in sup.stages)
        }

    def is_used(self, node: str, stage: StageSpec) -> bool:
        """A node runs in a stage if it trains there or feeds an active transfer."""
        if node in (stage.train or []):
            return True
        return any(s.split(".", 1)[0] == node for _, t in self.active_transfers(stage) for s in t.sources)
