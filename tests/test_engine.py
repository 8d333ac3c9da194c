"""The engine: resume equals an uninterrupted run, the teacher never changes, the run directory is complete."""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
from pathlib import Path

import pytest
import torch

from conftest import SYNTH
from kdflow.checkpoint import load_safe, read_model_file, save_atomic
from kdflow.data.loader import stratified_split
from kdflow.engine import EpochEnd, train
from kdflow.engine.rundir import read_jsonl
from kdflow.engine.schedule import lr_factor
from kdflow.engine.train import load_data
from kdflow.flow import RecipeError
from kdflow.methods.recipe import load_recipe, resolve
from kdflow.flow.spec import ScheduleSpec

QUIET = {"progress": False, "log": lambda s: None}
TIMING = {"time_s", "images_per_sec"}


def two_stage_raw() -> dict:
    """Stage 1 trains a teacher (MLP with dropout: the global RNG matters); stage 2 distils two students."""
    return {
        "name": "two-stage",
        "seed": 5,
        "data": {**SYNTH, "augment": {"crop_padding": 1, "flip": True}},
        "nodes": {
            "teacher": {"arch": "mlp", "args": {"hidden": [32], "dropout": 0.3}},
            "student": {"arch": "convnet_s", "init_seed": 1},
            "student_kd": {"arch": "convnet_s", "init_seed": 1},
        },
        "method": {"name": "kd", "student": "student_kd"},
        "supervise": {"teacher": 1.0, "student": 1.0},
        "stages": [{"name": "teacher", "train": ["teacher"]}, {"name": "students", "train": ["student", "student_kd"]}],
        "train": {"epochs": 3, "batch_size": 32, "optim": {"lr": 0.05}, "schedule": {"kind": "multistep", "milestones": [2], "warmup_epochs": 1}},
    }


class Stop(Exception):
    pass


def stop_at(stage_index: int, epoch: int):
    def cb(info: EpochEnd) -> None:
        if (info.stage_index, info.epoch) == (stage_index, epoch):
            raise Stop

    return cb


def weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.stem: read_model_file(p)["state_dict"] for p in sorted((run / "nodes").glob("*.pt"))}


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run / "metrics.jsonl")]


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    recipe = resolve(two_stage_raw())
    full = tmp_path / "full"
    train(recipe, full, **QUIET)
    cut = tmp_path / "cut"
    with pytest.raises(Stop):  # stopped in the middle of the first stage ...
        train(recipe, cut, callbacks=[stop_at(0, 2)], **QUIET)
    with pytest.raises(Stop):  # ... and again in the middle of the second
        train(recipe, cut, resume=True, callbacks=[stop_at(1, 1)], **QUIET)
    train(recipe, cut, resume=True, **QUIET)
    a, b = weights(full), weights(cut)
    assert set(a) == {"teacher", "student", "student_kd"} == set(b)
    for node in a:
        for k in a[node]:
            assert torch.equal(a[node][k], b[node][k]), f"{node}.{k}"
    assert metrics(full) == metrics(cut)
    assert len(metrics(full)) == 3 + 2 * 3
    assert json.loads((full / "summary.json").read_text()) == json.loads((cut / "summary.json").read_text())


def test_same_command_same_numbers_and_students_differ_only_by_kd(tmp_path: Path) -> None:
    raw = two_stage_raw()
    raw["train"]["epochs"] = 1
    train(resolve(raw), tmp_path / "a", **QUIET)
    train(resolve(raw), tmp_path / "b", **QUIET)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    # same init_seed, same batches: the two students start equal and diverge only through the KD term
    w = weights(tmp_path / "a")
    assert any(not torch.equal(w["student"][k], w["student_kd"][k]) for k in w["student"])
    raw["nodes"]["student_kd"]["init_seed"] = 1
    first = resolve(raw)
    from kdflow.flow.graph import Flow

    flow = Flow(first, 4, (1, 8, 8), torch.zeros(2, 1, 8, 8))
    for k, v in flow.models["student"].state_dict().items():
        assert torch.equal(v, flow.models["student_kd"].state_dict()[k])


def test_frozen_teacher_never_changes(kd_raw: dict, teacher_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    engine = importlib.import_module("kdflow.engine.train")  # the module (kdflow.engine.train is the function)

    before = read_model_file(teacher_ckpt)["state_dict"]
    at_end = {}
    check = engine.check_unchanged
    monkeypatch.setattr(engine, "check_unchanged", lambda models, files: (at_end.update(models["teacher"].state_dict()), check(models, files)))
    train(resolve(kd_raw), tmp_path / "run", **QUIET)
    for k, v in before.items():
        assert torch.equal(at_end[k], v), k  # weights and batch-norm statistics, in memory when the run ended
    assert [p.stem for p in (tmp_path / "run" / "nodes").glob("*.pt")] == ["student"]
    # last.pt names the teacher's file and hash instead of holding its weights (issue 13: no rewrite per epoch)
    last = load_safe(tmp_path / "run" / "last.pt")
    assert not [k for k in last["flow"] if k.startswith("models.teacher.")]
    assert last["settled"] == {"teacher": {"file": str(teacher_ckpt), "sha256": hashlib.sha256(teacher_ckpt.read_bytes()).hexdigest()}}


def test_run_directory_contents(kd_raw: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = train(resolve(kd_raw), run, **QUIET)
    for name in ["recipe.yaml", "environment.json", "metrics.jsonl", "last.pt", "nodes/student.pt", "summary.md"]:
        assert (run / name).exists(), name
    assert not (run / "best-student.pt").exists()  # no validation split: nothing is chosen as best
    assert not list(run.glob(".*.tmp"))
    assert load_recipe(run / "recipe.yaml") == resolve(kd_raw)  # the resolved recipe reproduces the run
    env = json.loads((run / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["seed"] == 3 and env["device"] == "cpu"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]["terms"]) == {"ce(student)", "kd(teacher.logits -> student.logits)"}
    assert summary[0]["node"] == "student" and summary[0]["selected_top1"] is None
    assert summary[0]["test_best_top1"] == max(r["test_top1"] for r in rows) and summary[0]["last_top1"] == rows[-1]["test_top1"]
    assert "test-best top-1 (legacy)" in (run / "summary.md").read_text()
    with pytest.raises(RecipeError, match="holds a run already; pass --resume"):
        train(resolve(kd_raw), run, **QUIET)
    with pytest.raises(RecipeError, match="holds no last.pt"):
        train(resolve(kd_raw), tmp_path / "other", resume=True, **QUIET)
    changed = copy.deepcopy(kd_raw)
    changed["train"]["optim"]["lr"] = 0.5
    with pytest.raises(RecipeError, match="the recipe differs"):
        train(resolve(changed), run, resume=True, **QUIET)


def test_save_atomic_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_atomic({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        save_atomic({"a": lambda: 0}, path)  # cannot be pickled
    assert torch.equal(load_safe(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_lr_schedules() -> None:
    multi = ScheduleSpec(kind="multistep", milestones=[2, 4], gamma=0.1, warmup_epochs=1)
    # the last step of epoch index 1 (epoch 2.0 done) still runs at full lr; the first step of index 2 decays
    assert [lr_factor(multi, e, 6) for e in [0.5, 1.0, 1.5, 2.0, 2.25, 4.0, 4.25]] == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01])


def test_multistep_decays_at_the_epoch_boundary(kd_raw: dict, tmp_path: Path, monkeypatch) -> None:
    """Milestone m as the benchmark's adjust_learning_rate (RepDistiller train_student.py, called at the start of
    each 1-based epoch with `epoch > milestone`): every step of the first m epochs runs at the base lr, every step
    of epoch m + 1 at gamma times it. The engine's lr of each step is recorded through the optimizer."""
    seen: list[tuple[int, float]] = []
    real_step = torch.optim.SGD.step

    def step(self, *a, **k):
        seen.append((len(seen), self.param_groups[0]["lr"]))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    raw = {**kd_raw, "train": {"epochs": 3, "batch_size": 32, "optim": {"lr": 0.1},
                               "schedule": {"kind": "multistep", "milestones": [1, 2], "gamma": 0.1}}}
    train(resolve(raw), tmp_path / "run", **QUIET)
    lrs = [lr for _, lr in seen]
    per_epoch = len(lrs) // 3  # 96 samples, batch 32: 3 steps an epoch
    assert len(lrs) == 9 and per_epoch == 3
    assert lrs[0] == lrs[per_epoch - 1] == pytest.approx(0.1)  # first and last step of epoch 1
    assert lrs[per_epoch] == lrs[2 * per_epoch - 1] == pytest.approx(0.01)  # epoch 2 (after milestone 1)
    assert lrs[2 * per_epoch] == lrs[-1] == pytest.approx(0.001)
    cos = ScheduleSpec(kind="cosine")
    assert [lr_factor(cos, e, 4) for e in [0, 1, 2, 4]] == pytest.approx([1.0, 0.5 + 0.5 * 2**-0.5, 0.5, 0.0])


def test_best_is_chosen_on_a_stratified_validation_split(kd_raw: dict, tmp_path: Path) -> None:
    raw = copy.deepcopy(kd_raw)
    raw["train"]["epochs"] = 3
    raw["data"]["noise"] = {"kind": "symmetric", "rate": 0.5, "seed": 1}
    raw["data"]["validation"] = 0.25
    run = tmp_path / "run"
    summary = train(resolve(raw), run, **QUIET)
    train_set, val, test, record = load_data(resolve(raw))
    full = load_data(resolve({**raw, "data": {k: v for k, v in raw["data"].items() if k != "validation"}}))[0]
    assert len(val) == round(0.25 * len(full)) and len(train_set) + len(val) == len(full)
    # stratified by the clean labels: every class keeps its share within one sample
    full_counts = torch.bincount(load_data(resolve({**raw, "data": {**raw["data"], "noise": None, "validation": None}}))[0].y, minlength=4)
    val_counts = torch.tensor(record["validation"]["class_counts"])
    assert ((val_counts.double() - 0.25 * full_counts.double()).abs() <= 1).all()
    assert len(record["clean_labels"]) == len(record["noise_mask"]) == len(train_set)  # the samples left for training
    assert 0 < record["validation"]["noisy_labels"] < len(val)  # corrupted like the training split
    rows = read_jsonl(run / "metrics.jsonl")
    assert all("val_top1" in r for r in rows)
    chosen = max(range(len(rows)), key=lambda i: (rows[i]["val_top1"], -i))  # first epoch of the best validation top-1
    assert summary[0]["selected_epoch"] == rows[chosen]["epoch"] and summary[0]["selected_top1"] == rows[chosen]["test_top1"]
    best = read_model_file(run / "best-student.pt")
    assert best["epoch"] == rows[chosen]["epoch"] and best["val_top1"] == rows[chosen]["val_top1"]
    data = json.loads((run / "data.json").read_text())
    assert data["validation"]["samples"] == len(val)


def test_stratified_split_holds_out_by_class_and_seed() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    keep, held = stratified_split(labels, 0.1, 3, seed=0)
    assert torch.bincount(labels[held], minlength=3).tolist() == [5, 3, 2]
    assert sorted(torch.cat([keep, held]).tolist()) == list(range(100))
    assert not torch.equal(held, stratified_split(labels, 0.1, 3, seed=1)[1])
    assert torch.equal(held, stratified_split(labels, 0.1, 3, seed=0)[1])
    assert torch.bincount(labels[stratified_split(labels, 7, 3, seed=0)[1]], minlength=3).tolist() == [4, 2, 1]
    with pytest.raises(ValueError, match="leaves 0 of 100"):
        stratified_split(labels, 100, 3, seed=0)
