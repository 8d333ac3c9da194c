"""Running one run of a study (in a worker process or inline): train, retried once, then one store row.

A run that raises is tried a second time, resuming from its `last.pt` when there is one; after
the second failure its row records `status = 'failed'` and the error (the traceback is in the
run directory's `error.log`). A RecipeError (a recipe that cannot run, a non-finite stop) would fail
the same way again: it is recorded as failed after the first attempt. Teachers train under a blocking per-teacher file lock, so a shard
that needs a teacher another shard is training waits for it and then reuses it; a student takes
its own lock without waiting, so two processes never train the same run.
"""

from __future__ import annotations

import json
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from kdflow.checkpoint import read_model_file
from kdflow.data.augment import augment_batch
from kdflow.data.loader import batches
from kdflow.engine import train
from kdflow.engine.rundir import read_jsonl
from kdflow.engine.train import load_data
from kdflow.flow.errors import RecipeError
from kdflow.flow.recipe import dump_recipe
from kdflow.methods.recipe import resolve
from kdflow.flow.spec import Recipe
from kdflow.flow.taps import model_logits
from kdflow.models import build_model, count_parameters
from kdflow.study.grid import Run
from kdflow.study.locks import file_lock
from kdflow.study.store import RUN_COLUMNS, Store

MAX_ATTEMPTS = 2  # the first try and one retry
CURVE_KEYS = ("node", "stage_index", "stage", "epoch", "test_top1", "test_loss", "train_top1", "train_loss", "ece", "val_top1")


@dataclass(frozen=True)
class Task:
    run: Run
    study_dir: str
    attempt: int = 1  # 2 when a worker died during the first attempt
    retry_failed: bool = False


def store_of(study_dir: str | Path) -> Store:
    return Store(Path(study_dir) / "results.sqlite")


def node_of(run: Run) -> str:
    return "teacher" if run.role == "teacher" else "student"


def base_row(run: Run) -> dict[str, Any]:
    """The run's identity: hash, labels and configuration fields."""
    row = {"hash": run.hash, "role": run.role, "run_dir": run.run_dir, "teacher_hash": run.teacher, **run.labels}
    row.update({k: v for k, v in run.fields.items() if k in RUN_COLUMNS})
    return row


def failed_row(run: Run, error: str, attempts: int, wall: float = 0.0) -> dict[str, Any]:
    return {**base_row(run), "status": "failed", "error": error, "attempts": attempts, "wall_time_s": wall, **_stamp()}


def _stamp() -> dict[str, str]:
    return {"host": socket.gethostname(), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _load_model(path: Path) -> torch.nn.Module:
    ckpt = read_model_file(path)
    model = build_model(ckpt["arch"], ckpt["num_classes"], tuple(ckpt["input_shape"]), **ckpt["args"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def agreement(recipe: Recipe, student_file: Path, teacher_file: Path) -> float:
    """Fraction of the run's test split on which student and teacher predict the same class."""
    test = load_data(recipe)[2]
    student, teacher = _load_model(student_file), _load_model(teacher_file)
    same = 0
    with torch.inference_mode():
        for x, _, _ in batches(test, 1000):
            x = augment_batch(x, test.mean, test.std)
            same += int((model_logits(student(x)).argmax(1) == model_logits(teacher(x)).argmax(1)).sum())
    return same / max(len(test), 1)


def _param_count(arch: str, args: dict, model_file: Path) -> int:
    ckpt = read_model_file(model_file)
    return count_parameters(build_model(arch, ckpt["num_classes"], tuple(ckpt["input_shape"]), **(args or {})))


def collect(run: Run, out: Path, study_dir: Path, recipe: Recipe) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The store row's results and the per-epoch curve of the run's trained node, from its run directory."""
    node = node_of(run)
    summary = [r for r in json.loads((out / "summary.json").read_text()) if r["node"] == node]
    final = summary[-1]  # the last stage (FSP and AB train the student in an init stage first)
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r["node"] == node and r.get("kind") != "ensemble"]
    last = records[-1]
    curves = [{k: r.get(k) for k in CURVE_KEYS} | {"step": i + 1} for i, r in enumerate(records)]
    data = json.loads((out / "data.json").read_text())
    row: dict[str, Any] = {
        "selected_top1": final["selected_top1"],
        "selected_epoch": final["selected_epoch"],
        "test_best_top1": final["test_best_top1"],
        "last_top1": final["last_top1"],
        "last_top5": final["last_top5"],
        "epochs": len(records),
        "per_class_top1": last.get("per_class_top1"),
        "ece": last.get("ece"),
        "realised_noise": data.get("noise", {}).get("realised_rate"),
        "train_class_counts": data.get("train_class_counts"),
    }
    own_file = out / "nodes" / f"{node}.pt"
    if run.role == "teacher":
        row["teacher_params"] = final["params"]
        return row, curves
    row["student_params"] = final["params"]
    if run.fields.get("teacher_arch"):
        row["teacher_params"] = _param_count(run.fields["teacher_arch"], run.fields["teacher_args"], own_file)
    if run.teacher:
        teacher_dir = study_dir / "teachers" / run.teacher
        row["agreement"] = agreement(recipe, own_file, teacher_dir / "nodes" / "teacher.pt")
        teacher_summary = json.loads((teacher_dir / "summary.json").read_text())
        row["teacher_top1"] = [r for r in teacher_summary if r["node"] == "teacher"][-1]["last_top1"]
    return row, curves


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 2000 else text[:2000] + " …"


def _resumable(out: Path, recipe: Recipe, log: Callable[[str], None]) -> bool:
    """Resume from last.pt when the run directory holds this very recipe; otherwise start afresh (a moved
    study directory changes the teacher's path, a newer kdflow may write the recipe differently)."""
    last = out / "last.pt"
    if not last.exists():
        return False
    recipe_file = out / "recipe.yaml"
    if recipe_file.exists() and recipe_file.read_text() == dump_recipe(recipe):
        return True
    log("last.pt belongs to a different recipe text: starting afresh")
    last.unlink()
    return False


def train_and_record(task: Task, store: Store) -> dict[str, Any]:
    """Train the run (first try, then one retry resuming from last.pt, none after a RecipeError), write its
    row; return the row."""
    run, study_dir = task.run, Path(task.study_dir)
    out = study_dir / run.run_dir
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    attempt, error = task.attempt, ""
    while attempt <= MAX_ATTEMPTS:
        try:
            recipe = resolve(run.recipe, f"run {run.hash}")
            with open(out / "train.log", "a") as logf:

                def log(line: str) -> None:
                    logf.write(line + "\n")
                    logf.flush()

                log(f"== attempt {attempt} at {_stamp()['finished']} on {_stamp()['host']}")
                train(recipe, out, resume=_resumable(out, recipe, log), progress=False, log=log)
            results, curves = collect(run, out, study_dir, recipe)
            row = {**base_row(run), **results, "status": "done", "attempts": attempt}
            row.update(wall_time_s=time.perf_counter() - start, **_stamp())
            store.record(row, curves)
            return row
        except Exception as e:  # one failed run never stops the others
            error = _error_text(e)
            with open(out / "error.log", "a") as f:
                f.write(f"== attempt {attempt}\n{traceback.format_exc()}\n")
            if isinstance(e, RecipeError):  # deterministic (a recipe that cannot run): a retry fails the same way
                break
            attempt += 1
    row = failed_row(run, error, min(attempt, MAX_ATTEMPTS), time.perf_counter() - start)
    store.record(row)
    return row


def execute(task: Task) -> dict[str, Any]:
    """Run one task; returns its store row, or {'status': 'skipped'|'busy', ...} when nothing was trained."""
    run, study_dir = task.run, Path(task.study_dir)
    store = store_of(study_dir)
    lock = study_dir / "locks" / f"{run.hash}.lock"
    blocking = run.role == "teacher"  # wait for a teacher another process is training; never for a student
    with file_lock(lock, blocking=blocking) as held:
        if not held:
            return {"hash": run.hash, "status": "busy"}
        row = store.row(run.hash)
        if row and row["status"] == "done" and (study_dir / run.run_dir / "nodes" / f"{node_of(run)}.pt").exists():
            return {**row, "status": "skipped", "stored_status": "done"}
        if row and row["status"] == "failed" and not task.retry_failed:
            return {**row, "status": "skipped", "stored_status": "failed"}
        return train_and_record(task, store)
