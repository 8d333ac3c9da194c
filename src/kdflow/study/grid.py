"""Expanding a study into runs: plain recipe dicts with stable configuration hashes.

Order is deterministic: blocks in file order, and within a block datasets > conditions > seeds >
pairs > methods, each in the order of the study file; a run that two blocks share (or that two
pairs share: the student alone does not depend on the teacher) appears once, where it first
appears. The hash of a run is a digest of its resolved recipe (non-default fields only, without
its name, the data folder or the teacher checkpoint's path, which is replaced by the teacher
run's hash), so labels can be renamed without rerunning anything and two spellings of one
configuration are one run.

Teachers are runs of their own, one per (dataset, teacher architecture, condition, seed), on the
same data (the same `data` block, corruptions and seed, hence the same subset, noise mask and
class counts) as every student that uses them.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdflow.flow.errors import RecipeError
from kdflow.methods.recipe import resolve
from kdflow.losses.registry import RENAMED
from kdflow.methods import method_graph
from kdflow.study.spec import ConditionSpec, DatasetSpec, MethodEntry, PairSpec, StudySpec

HASH_LENGTH = 12


@dataclass(frozen=True)
class Run:
    """One training run of the grid: a student (role 'student') or a teacher (role 'teacher')."""

    hash: str
    role: str
    recipe: dict[str, Any]  # a plain recipe dict; kdflow.methods.recipe.resolve(recipe) validates it
    labels: dict[str, Any]  # dataset, pair, method, condition, seed (pair None: serves every pair with its student)
    fields: dict[str, Any]  # architectures, method name and arguments, corruption levels
    teacher: str | None = None  # hash of the pretrained teacher run this run needs

    @property
    def run_dir(self) -> str:
        """The run directory, relative to the study directory."""
        return f"{'teachers' if self.role == 'teacher' else 'runs'}/{self.hash}"

    def title(self) -> str:
        lab = self.labels
        if self.role == "teacher":
            return f"{lab['dataset']} · teacher {self.fields['teacher_arch']} · {lab['condition']} · seed {lab['seed']}"
        who = lab["pair"] or f"{self.fields['student_arch']} alone"
        return f"{lab['dataset']} · {who} · {lab['method']} · {lab['condition']} · seed {lab['seed']}"


@dataclass
class Grid:
    runs: list[Run]  # student runs, in order
    teachers: dict[str, Run]  # teacher runs by hash, in order of first need
    blocks: list[dict[str, Any]] = field(default_factory=list)  # what each block crosses, and its run count

    def teacher_of(self, run: Run) -> Run | None:
        return self.teachers.get(run.teacher) if run.teacher else None


def model_key(ref: dict[str, Any]) -> str:
    """A canonical text for an architecture and its arguments (joins rows to pairs in the report)."""
    return json.dumps({"arch": ref["arch"], "args": ref.get("args", {})}, sort_keys=True, separators=(",", ":"))


_NAME_IN_HASH = {new: old for old, new in RENAMED.items()}


def config_hash(raw: dict[str, Any], teacher_hash: str | None = None) -> str:
    """A digest of what a run computes: its resolved recipe's non-default fields, without name, description,
    data folder and teacher path (the teacher's own hash stands for its checkpoint)."""
    recipe = resolve(raw)
    d = recipe.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    for key in ("name", "description"):
        d.pop(key, None)
    d.get("data", {}).pop("root", None)
    for name, node in d.get("nodes", {}).items():
        if node.get("checkpoint"):
            node["checkpoint"] = f"teacher:{teacher_hash}" if name == "teacher" and teacher_hash else node["checkpoint"]
    for transfer in d.get("transfers", []):
        # hashes predate the criteria's renaming to their losses' names: keep stored studies' rows valid
        transfer["criterion"] = _NAME_IN_HASH.get(transfer.get("criterion"), transfer.get("criterion"))
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def _data(ds: DatasetSpec, cond: ConditionSpec, seed: int) -> dict[str, Any]:
    data = copy.deepcopy(ds.data)
    if cond.noise is not None:
        data["noise"] = {**cond.noise.model_dump(), "seed": seed}
    if cond.imbalance is not None:
        data["imbalance"] = {**cond.imbalance.model_dump(), "seed": seed}
    return data


def _condition_fields(cond: ConditionSpec) -> dict[str, Any]:
    return {
        "noise_kind": cond.noise.kind if cond.noise else None,
        "noise_rate": cond.noise.rate if cond.noise else 0.0,
        "imbalance_kind": cond.imbalance.kind if cond.imbalance else None,
        "imbalance_ratio": cond.imbalance.ratio if cond.imbalance else 1.0,
    }


def teacher_role(entry: MethodEntry, args: dict[str, Any], where: str) -> str | None:
    """'frozen' when the method distils from a pretrained teacher, 'trainable' when it trains the
    teacher-sized node from scratch (DML between student and teacher), None when it has no teacher."""
    try:
        graph = method_graph(entry.name, **args)
    except (RecipeError, ValueError, TypeError) as e:
        raise RecipeError(f"{where}: {e}") from None
    nodes = {**{k: dict(v) for k, v in graph.get("nodes", {}).items()}}
    for name, extra in entry.nodes.items():
        nodes.setdefault(name, {}).update(extra)
    if "student" not in nodes:
        raise RecipeError(
            f"{where}: method {entry.name!r} has no node named 'student' (the study trains 'student'; "
            "e.g. dml: args: {peers: [student, teacher]})"
        )
    if "teacher" not in nodes:
        return None
    return nodes["teacher"].get("role", "trainable")


def _train(study: StudySpec, train: dict[str, Any]) -> dict[str, Any]:
    """A run's train section: the dataset's, with the study's thread count unless the dataset sets its own."""
    return {**copy.deepcopy(train), "threads": train.get("threads", study.threads)}


def _teacher_run(study: StudySpec, ds: DatasetSpec, pair: PairSpec, cond: ConditionSpec, seed: int) -> Run:
    teacher = pair.teacher.model_dump()
    raw = {
        "name": f"{study.name}/{ds.name}/teacher-{teacher['arch']}/{cond.name}/seed{seed}",
        "seed": seed,
        "data": _data(ds, cond, seed),
        "nodes": {"teacher": teacher},
        "method": {"name": "ce", "student": "teacher"},
        "train": _train(study, ds.teacher_train if ds.teacher_train is not None else ds.train),
    }
    fields = {
        "teacher_arch": teacher["arch"],
        "teacher_args": teacher["args"],
        "teacher_key": model_key(teacher),
        "student_arch": None,
        "student_args": None,
        "student_key": None,
        "method_name": "ce",
        "method_args": {},
        **_condition_fields(cond),
    }
    labels = {"dataset": ds.name, "pair": None, "method": "teacher", "condition": cond.name, "seed": seed}
    return Run(config_hash(raw), "teacher", raw, labels, fields)


def _student_run(
    study: StudySpec,
    study_dir: Path,
    ds: DatasetSpec,
    pair: PairSpec,
    entry: MethodEntry,
    cond: ConditionSpec,
    seed: int,
) -> tuple[Run, Run | None]:
    where = f"methods.{entry.label}"
    args = {**entry.args, **ds.method_args.get(entry.label, {})}
    role = teacher_role(entry, args, where)
    student = pair.student.model_dump()
    nodes: dict[str, Any] = {"student": copy.deepcopy(student)}
    teacher_run = None
    if role is not None:
        nodes["teacher"] = pair.teacher.model_dump()
    if role == "frozen":
        teacher_run = _teacher_run(study, ds, pair, cond, seed)
        ckpt = (study_dir / teacher_run.run_dir / "nodes" / "teacher.pt").resolve()
        nodes["teacher"]["checkpoint"] = str(ckpt)
    for name, extra in entry.nodes.items():
        nodes[name] = {**nodes.get(name, {}), **copy.deepcopy(extra)}
    raw = {
        "name": f"{study.name}/{ds.name}/{pair.name if role else student['arch']}/{entry.label}/{cond.name}/seed{seed}",
        "seed": seed,
        "data": _data(ds, cond, seed),
        "nodes": nodes,
        "method": {"name": entry.name, **copy.deepcopy(args)},
        "train": _train(study, ds.train),
    }
    try:
        h = config_hash(raw, teacher_run.hash if teacher_run else None)
    except RecipeError as e:
        raise RecipeError(f"study run {ds.name}/{pair.name}/{entry.label}/{cond.name}/seed{seed}: {e}") from None
    fields = {
        "teacher_arch": pair.teacher.arch if role else None,
        "teacher_args": pair.teacher.args if role else None,
        "teacher_key": model_key(pair.teacher.model_dump()) if role else None,
        "student_arch": student["arch"],
        "student_args": student["args"],
        "student_key": model_key(student),
        "method_name": entry.name,
        "method_args": args,
        "teacher_role": role,
        **_condition_fields(cond),
    }
    labels = {
        "dataset": ds.name,
        "pair": pair.name if role else None,
        "method": entry.label,
        "condition": cond.name,
        "seed": seed,
    }
    return Run(h, "student", raw, labels, fields, teacher_run.hash if teacher_run else None), teacher_run


def expand(study: StudySpec, study_dir: str | Path) -> Grid:
    """Every run of the study, each a resolvable recipe dict, in the deterministic order above."""
    study_dir = Path(study_dir)
    by_name = {
        "datasets": {d.name: d for d in study.datasets},
        "pairs": {p.name: p for p in study.pairs},
        "methods": {m.label: m for m in study.methods},
        "conditions": {c.name: c for c in study.conditions},
    }
    runs: dict[str, Run] = {}
    teachers: dict[str, Run] = {}
    blocks = []
    for block in study.resolved_blocks():
        hashes: set[str] = set()
        for dname in block.datasets:
            for cname in block.conditions:
                for seed in block.seeds:
                    for pname in block.pairs:
                        for mlabel in block.methods:
                            run, teacher = _student_run(
                                study,
                                study_dir,
                                by_name["datasets"][dname],
                                by_name["pairs"][pname],
                                by_name["methods"][mlabel],
                                by_name["conditions"][cname],
                                seed,
                            )
                            runs.setdefault(run.hash, run)
                            hashes.add(run.hash)
                            if teacher is not None:
                                teachers.setdefault(teacher.hash, teacher)
        blocks.append({**block.model_dump(), "runs": len(hashes)})
    return Grid(list(runs.values()), teachers, blocks)


def shard(runs: list[Run], index: int, count: int) -> list[Run]:
    """Share `index` (0-based) of `count`: a contiguous slice of the ordered runs, so the students of one
    teacher mostly land in one share. The shares are disjoint, differ in size by at most one, and
    together hold every run exactly once."""
    if count < 1 or not 0 <= index < count:
        raise RecipeError(f"--shard {index}/{count}: need 0 <= i < N")
    n = len(runs)
    return runs[index * n // count : (index + 1) * n // count]


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' -> (i, N)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise RecipeError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    shard([], i, n)  # range check
    return i, n
