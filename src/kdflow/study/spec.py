"""The study schema: datasets × teacher–student pairs × methods × conditions × seeds, in blocks.

A study file names each axis once, with labels; `blocks` pick sub-grids of them (by label) so
one study can cross, say, a capacity ladder with a few methods on clean data and the full
method set on one pair across noise and imbalance levels. Without `blocks`, one block crosses
everything. Unknown fields are errors; every fault is one line naming its place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdflow.flow.errors import RecipeError, yaml_error
from kdflow.flow.recipe import format_validation_error
from kdflow.flow.spec import DataSpec, TrainSpec


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(Strict):
    """An architecture from the model registry and its arguments."""

    arch: str
    args: dict[str, Any] = {}


class PairSpec(Strict):
    """A teacher–student pair. Methods without a teacher (`ce`) use only the student."""

    name: str
    teacher: ModelRef
    student: ModelRef


class MethodEntry(Strict):
    """A method from the registry (`kdflow methods`), with arguments; `ce` is the student alone.

    `label` names the row in the tables (default: `name`); `nodes` adds or overrides recipe nodes
    (e.g. a DML peer: `{peer2: {same_as: student}}`). The study trains the node named `student`;
    a node named `teacher` gets the pair's teacher: pretrained (a checkpoint) when the method's
    graph freezes it, from scratch when the graph trains it (DML with `peers: [student, teacher]`).
    """

    name: str
    label: str = ""
    args: dict[str, Any] = {}
    nodes: dict[str, dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _default_label(self) -> "MethodEntry":
        self.label = self.label or self.name
        return self


class NoiseCondition(Strict):
    """Label noise on the training split; its seed is the run's seed."""

    kind: Literal["symmetric", "pairflip", "asymmetric_cifar10"] = "symmetric"
    rate: float = Field(ge=0, le=1)


class ImbalanceCondition(Strict):
    """A long-tailed training split; its seed is the run's seed."""

    kind: Literal["exponential", "step"] = "exponential"
    ratio: float = Field(ge=1)


class ConditionSpec(Strict):
    """A data condition: clean (neither), label noise, class imbalance, or both."""

    name: str
    noise: NoiseCondition | None = None
    imbalance: ImbalanceCondition | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        if data == "clean":
            return {"name": "clean"}
        if isinstance(data, str):
            raise ValueError(f"condition {data!r}: a bare name must be 'clean'; give {{name, noise|imbalance}}")
        return data


def _check(model: type[BaseModel], value: dict, where: str) -> None:
    """Validate a recipe block early, so its faults name the study's place rather than a run's."""
    try:
        model.model_validate(value)
    except ValidationError as e:
        raise ValueError(f"{where}.{format_validation_error(e)}") from None


class DatasetSpec(Strict):
    """A data set with its training settings. `data` is a recipe's `data:` block without corruptions
    (those are conditions); `train` is a recipe's `train:` block for students, `teacher_train` for
    the teachers (default: `train`); `method_args` overrides method arguments here, by method label
    (e.g. a DKD warm-up or an FSP init stage scaled to this data set's epochs)."""

    name: str
    data: dict[str, Any]
    train: dict[str, Any] = {}
    teacher_train: dict[str, Any] | None = None
    method_args: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _check_blocks(self) -> "DatasetSpec":
        for key in ("noise", "imbalance"):
            if key in self.data:
                raise ValueError(f"data.{key}: corruptions are study conditions, not part of a data set")
        _check(DataSpec, self.data, "data")
        _check(TrainSpec, self.train, "train")
        if self.teacher_train is not None:
            _check(TrainSpec, self.teacher_train, "teacher_train")
        return self


AXES = ("datasets", "pairs", "methods", "conditions", "seeds")


class BlockSpec(Strict):
    """A sub-grid: the labels (or seeds) of each axis it crosses; an axis left out means all of it."""

    name: str
    datasets: list[str] | None = None
    pairs: list[str] | None = None
    methods: list[str] | None = None
    conditions: list[str] | None = None
    seeds: list[int] | None = None


class StudySpec(Strict):
    name: str
    description: str = ""
    seeds: list[int] = Field(min_length=1)
    datasets: list[DatasetSpec] = Field(min_length=1)
    pairs: list[PairSpec] = Field(min_length=1)
    methods: list[MethodEntry] = Field(min_length=1)
    conditions: list[ConditionSpec] = [ConditionSpec(name="clean")]
    blocks: list[BlockSpec] = []
    # torch threads of every run (train.threads, part of each run's hash): rows do not depend on --workers
    threads: int = Field(1, ge=1)
    # method label -> the label of its control: a run that differs from it in the label weight only (e.g. kd,
    # CE weight 0.1, -> `ce@0.1`, the student alone with CE weight 0.1); the tables give the gain over it too,
    # which separates "more distillation" from "a different weight on the labels"
    controls: dict[str, str] = {}

    @model_validator(mode="after")
    def _references(self) -> "StudySpec":
        labels = {
            "datasets": [d.name for d in self.datasets],
            "pairs": [p.name for p in self.pairs],
            "methods": [m.label for m in self.methods],
            "conditions": [c.name for c in self.conditions],
            "seeds": list(self.seeds),
        }
        for axis, names in labels.items():
            dup = sorted({n for n in names if names.count(n) > 1}, key=str)
            if dup:
                raise ValueError(f"{axis}: duplicate {'seeds' if axis == 'seeds' else 'names'} {dup}")
        if "teacher" in labels["methods"]:
            raise ValueError("methods: 'teacher' is reserved for the teachers' own rows")
        for i, d in enumerate(self.datasets):
            for label in d.method_args:
                if label not in labels["methods"]:
                    raise ValueError(f"datasets.{i}.method_args: no method labelled {label!r}")
        for i, b in enumerate(self.blocks):
            for axis in AXES:
                for name in getattr(b, axis) or []:
                    if name not in labels[axis]:
                        raise ValueError(
                            f"blocks.{i}.{axis}: no {axis[:-1]} {name!r} (known: {', '.join(map(str, labels[axis]))})"
                        )
        for method, control in self.controls.items():
            for label in (method, control):
                if label not in labels["methods"]:
                    raise ValueError(f"controls: no method labelled {label!r}")
        if len({b.name for b in self.blocks}) != len(self.blocks):
            raise ValueError("blocks: names must be unique")
        return self

    def resolved_blocks(self) -> list[BlockSpec]:
        """Blocks with every axis filled in (one block crossing everything when none is given)."""
        blocks = self.blocks or [BlockSpec(name="all")]
        full = {
            "datasets": [d.name for d in self.datasets],
            "pairs": [p.name for p in self.pairs],
            "methods": [m.label for m in self.methods],
            "conditions": [c.name for c in self.conditions],
            "seeds": list(self.seeds),
        }
        return [
            BlockSpec(name=b.name, **{a: getattr(b, a) if getattr(b, a) is not None else full[a] for a in AXES})
            for b in blocks
        ]


def parse_study(raw: Any, source: str = "study") -> StudySpec:
    """Validate a study mapping; any fault is one RecipeError line naming the place."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a study is a mapping, got {type(raw).__name__}")
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{source}: {format_validation_error(e)}") from None


def load_study(path: str | Path) -> tuple[StudySpec, str]:
    """Read and validate a study file; returns the spec and the file's text (kept in the store)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such study file")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise yaml_error(str(path), e) from None
    return parse_study(raw, str(path)), text
