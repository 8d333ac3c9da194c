"""Reliability (issue 13): nothing non-finite is saved, values that cannot train are refused, no user-supplied
file runs code, frozen stays frozen. docs/reliability.md lists these tests by failure class."""
from __future__ import annotations

import copy
import errno
import math
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

import kdflow
from conftest import SYNTH
from formats import dump, make_cifar10, make_cifar100
from kdflow.checkpoint import load_safe, read_model_file
from kdflow.cli import main
from kdflow.data import load_dataset
from kdflow.data.base import DatasetError
from kdflow.engine import train
from kdflow.engine.evaluate import evaluate
from kdflow.engine.nonfinite import NonFiniteError, check_evaluation, check_state
from kdflow.engine.rundir import read_jsonl
from kdflow.engine.train import _same_recipe
from kdflow.flow import RecipeError
from kdflow.methods.recipe import resolve
from kdflow.flow.recipe import dump_recipe
from kdflow.flow.graph import Flow
from kdflow.models import build_model

QUIET = {"progress": False, "log": lambda s: None}


def bn_raw(raw: dict, **train_fields) -> dict:
    """kd_raw with a batch-norm student (convnet_s), a validation split (so best-NODE.pt is written) and 3 steps an epoch."""
    raw = copy.deepcopy(raw)
    raw["data"] = {**SYNTH, "validation": 0.25}
    raw["nodes"]["student"] = {"arch": "convnet_s"}
    raw["train"] = {"epochs": 2, "batch_size": 24, "optim": {"lr": 0.05}, **train_fields}
    return raw


def poison(monkeypatch: pytest.MonkeyPatch, bad: callable) -> None:
    """Make the flow's total loss NaN on the forward passes for which bad(epoch, call) holds (call counts from 1)."""
    forward, calls = Flow.forward, [0]

    def poisoned(self, x, y, stage, epoch, *args, **kwargs):
        out = forward(self, x, y, stage, epoch, *args, **kwargs)
        calls[0] += 1
        if bad(epoch, calls[0]):
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(Flow, "forward", poisoned)


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# 1. non-finite values


def test_diverging_run_stops_with_one_line_and_saves_nothing(kd_raw: dict, tmp_path: Path, capsys) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(bn_raw(kd_raw)))
    out = tmp_path / "run"
    code = main(["train", str(path), "--set", "train.optim.lr=1000", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0, err
    assert re.match(r"error: non-finite values in stage 'main', epoch \d+, step \d+: node student \(lr 1000\): ", err)
    assert "lower the learning rate" in err and "train.on_nonfinite: skip_step" in err
    assert not (out / "nodes").exists(), "no node file"
    saved = list(out.glob("*.pt"))  # the epochs before the divergence: last.pt, best-student.pt
    assert all(all_finite(load_safe(p)["flow"] if p.name == "last.pt" else read_model_file(p)["state_dict"]) for p in saved)


def full_and_cut_in_epoch_two(kd_raw: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, match: str | None = None):
    """The batch-norm KD recipe run uninterrupted into `full`, and into `cut` stopped by a NaN gradient at the
    first step of its second epoch (the NonFiniteError matching `match`); returns (recipe, full, cut)."""
    recipe = resolve(bn_raw(kd_raw))
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(recipe, full, **QUIET)
    with monkeypatch.context() as m:
        poison(m, lambda epoch, call: epoch == 1)
        with pytest.raises(NonFiniteError, match=match):
            train(recipe, cut, **QUIET)
    return recipe, full, cut


def test_nonfinite_stop_keeps_the_last_good_checkpoint_and_resume_continues(
    kd_raw: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, full, cut = full_and_cut_in_epoch_two(
        kd_raw, tmp_path, monkeypatch,
        r"^non-finite values in stage 'main', epoch 2, step 1: node student \(lr 0\.05\): gradient of .*; lower the learning rate",
    )
    assert load_safe(cut / "last.pt")["epoch"] == 1 and read_model_file(cut / "best-student.pt")["epoch"] == 1
    assert all_finite(read_model_file(cut / "best-student.pt")["state_dict"])
    train(recipe, cut, resume=True, **QUIET)
    a, b = read_model_file(full / "nodes" / "student.pt")["state_dict"], read_model_file(cut / "nodes" / "student.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_skip_step_skips_and_counts_nonfinite_steps(kd_raw: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    poison(monkeypatch, lambda epoch, call: call in (2, 4, 5))  # steps 2 of epoch 1, 1 and 2 of epoch 2
    out = tmp_path / "run"
    train(resolve(bn_raw(kd_raw, on_nonfinite="skip_step")), out, **QUIET)
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["nonfinite_steps"] for r in records] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["total_loss"]) for r in records)
    for name in ("best-student.pt", "nodes/student.pt"):
        assert all_finite(read_model_file(out / name)["state_dict"])


def test_nonfinite_weights_are_named_before_anything_is_saved(kd_raw: dict) -> None:
    flow = Flow(resolve(bn_raw(kd_raw)), 4, (1, 8, 8), None)
    check_state(flow, ["student"], {}, "main", 1)
    flow.models["student"].stage1[2].running_var[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"after stage 'main', epoch 3: node student \(lr \?\): stage1\.2\.running_var"):
        check_state(flow, ["student"], {}, "main", 3)
    check_evaluation({"test_loss": 1.2, "val_loss": 1.3}, "student", {}, "main", 3)
    with pytest.raises(NonFiniteError, match=r"node student \(lr \?\): evaluation val_loss is nan"):  # before best-NODE.pt
        check_evaluation({"test_loss": 1.2, "val_loss": float("nan")}, "student", {}, "main", 3)


def test_resume_reads_a_recipe_file_written_before_on_nonfinite(kd_raw: dict, tmp_path: Path) -> None:
    recipe = resolve(kd_raw)
    old = yaml.safe_load(dump_recipe(recipe))
    del old["train"]["on_nonfinite"]  # a run directory from before the field existed
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert _same_recipe(tmp_path / "recipe.yaml", recipe)
    assert not _same_recipe(tmp_path / "recipe.yaml", resolve({**kd_raw, "seed": 4}))


def test_evaluating_a_nan_model_reports_nan_rather_than_crashing() -> None:
    ds = load_dataset("synthetic", "test", num_samples=40, num_classes=4, shape=(1, 8, 8))
    model = build_model("mlp", 4, (1, 8, 8))
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    assert math.isnan(evaluate(model, ds)["test_loss"])  # was: bincount only supports 1-d non-negative integral inputs


# 2. values that cannot train


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda r: r["train"].update(epochs=0), r"train\.epochs: stage 'main' runs 0 epochs and student trains in no other stage"),
        (lambda r: r.update(stages=[{"name": "warm", "epochs": 0}]), r"stages\.0\.epochs: stage 'warm' runs 0 epochs"),
        (lambda r: r.update(stages=[{"name": "a", "train": []}]), r"stages\.0\.train: stage 'a' trains no node"),
        (lambda r: r["train"].update(batch_size=97), r"train\.batch_size: 97 is larger than the training split \(96 samples"),
        (lambda r: r["train"].update(batch_size=0), r"train\.batch_size: Input should be greater than 0"),
        (lambda r: r["train"].update(views=0), r"train\.views: Input should be greater than or equal to 1"),
        (lambda r: r["data"].update(noise={"rate": 1.5}), r"data\.noise\.rate: Input should be less than or equal to 1"),
        (lambda r: r.update(supervise={"student": {"loss": "label_smoothing", "epsilon": 1.5}}),
         r"supervise\.student: epsilon: 1\.5 is a probability; it must lie in \[0, 1\]"),
        (lambda r: r["nodes"]["student"]["args"].update(dropout=1.5), r"nodes\.student\.args: dropout probability has to be between 0 and 1"),
        (lambda r: r["data"].update(validation=1.5), r"data\.validation: size: 1\.5 is neither a fraction below 1 nor a whole number"),
        (lambda r: r["nodes"]["student"].update(optim={"lr": 0}), r"nodes\.student\.optim\.lr: Input should be greater than 0"),
        (lambda r: r["train"]["optim"].update(momentum=-0.9), r"train\.optim\.momentum: Input should be greater than or equal to 0"),
    ],
)
def test_values_that_cannot_train_are_refused(kd_raw: dict, tmp_path: Path, edit, pattern: str) -> None:
    raw = copy.deepcopy(kd_raw)
    raw["train"]["epochs"] = 1
    raw.pop("method")
    raw["supervise"] = {"student": 1.0}
    edit(raw)
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=pattern) as info:
        train(resolve(raw), out, **QUIET)
    assert "\n" not in str(info.value) and not out.exists()


def test_a_zero_epoch_stage_is_fine_when_its_nodes_train_elsewhere(kd_raw: dict) -> None:
    raw = copy.deepcopy(kd_raw)
    raw["stages"] = [{"name": "init", "epochs": 0}, {"name": "main"}]  # AB's init_epochs: 0
    assert [s.epochs for s in resolve(raw).resolved_stages()] == [0, 2]


def test_zero_epochs_at_the_cli_writes_nothing(kd_raw: dict, tmp_path: Path, capsys) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(kd_raw))
    out = tmp_path / "run"
    assert main(["train", str(path), "--set", "train.epochs=0", "--out", str(out)]) == 2
    assert "train.epochs: stage 'main' runs 0 epochs" in capsys.readouterr().err and not out.exists()


# 3. no user-supplied file runs code


class Payload:
    """Unpickling calls open(marker, 'w'): the file appears if the loader runs what the pickle says."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("layout, name", [("cifar10", "data_batch_1"), ("cifar10", "batches.meta"), ("cifar100", "train")])
def test_cifar_pickle_with_a_payload_is_refused_unrun(tmp_path: Path, layout: str, name: str) -> None:
    folder = make_cifar10(tmp_path) if layout == "cifar10" else make_cifar100(tmp_path)
    assert len(load_dataset(layout, "train", str(tmp_path))) > 0  # the clean files load
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker))).close()
    assert marker.exists()  # the payload runs when unpickled plainly ...
    marker.unlink()
    dump(folder / name, {b"data": Payload(marker), b"labels": [0], b"fine_labels": [0], b"label_names": Payload(marker)})
    with pytest.raises(DatasetError, match=rf"{name}: not a plain CIFAR pickle: refused global [\w.]*open ") as info:
        load_dataset(layout, "train", str(tmp_path))
    assert "\n" not in str(info.value)
    assert not marker.exists()  # ... and never through the loader


# 4. frozen stays frozen


class Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(torch.relu(self.bn(self.conv(x))), 1)))


class Parent(nn.Module):
    """A Lightning-style module: it owns the teacher and the Distiller and calls .train() on everything."""

    def __init__(self) -> None:
        super().__init__()
        teacher, student = Teacher(), Teacher()
        self.distiller = kdflow.Distiller(kdflow.methods.kd(teacher=teacher, student=student))
        self.teacher, self.student = teacher, student  # registered after the Distiller: .train() reaches them last


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_frozen_teacher_runs_in_eval_mode_whatever_put_it_in_train_mode() -> None:
    parent = Parent()
    seen: list[bool] = []
    parent.teacher.drop.register_forward_hook(lambda m, i, o: seen.append(m.training))
    before = copy.deepcopy(parent.teacher.state_dict())
    for put_in_train_mode in (parent.train, parent.teacher.train, parent.distiller.teacher.train):
        put_in_train_mode()
        parent.distiller(*batch())
    assert seen == [False, False, False]  # dropout off
    assert all(torch.equal(v, before[k]) for k, v in parent.teacher.state_dict().items())  # batch-norm statistics still


def test_parameters_the_user_froze_stay_frozen() -> None:
    teacher, student = Teacher(), Teacher()
    student.conv.requires_grad_(False)
    distiller = kdflow.Distiller(kdflow.methods.kd(teacher=teacher, student=student))
    distiller.train()
    assert not student.conv.weight.requires_grad and student.fc.weight.requires_grad
    conv = student.conv.weight.clone()
    opt = torch.optim.SGD(distiller.parameters(), lr=0.5, weight_decay=0.1)
    out = distiller(*batch())
    out.total.backward()
    opt.step()
    assert torch.equal(student.conv.weight, conv) and student.conv.weight.grad is None
    # a node the Distiller freezes (gen1 while gen2 trains) and unfreezes keeps its owner's choice
    flow = kdflow.methods.born_again(teacher=Teacher(), generations=2)
    gen1 = flow.models["gen1"] = Teacher()
    gen1.bn.requires_grad_(False)
    distiller = kdflow.Distiller(flow, stage="gen2")
    assert not any(p.requires_grad for p in gen1.parameters())
    distiller.set_stage("gen1")
    assert [n for n, p in gen1.named_parameters() if not p.requires_grad] == ["bn.weight", "bn.bias"]


class Scaled(nn.Module):
    """Constructor arguments kept as attributes; a raw nn.Parameter and an initialisation of its own."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.width = width
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 4))
        nn.init.constant_(self.body[1].bias, 0.5)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale


def test_same_as_copies_are_built_fresh_by_the_models_class() -> None:
    source = Scaled(width=16)
    with torch.no_grad():
        source.scale.fill_(7.0)
        source.body[1].bias.fill_(3.0)
    distiller = kdflow.Distiller(kdflow.methods.born_again(teacher=source, generations=2))
    for gen in ("gen1", "gen2"):
        fresh = distiller.flow.models[gen]
        assert type(fresh) is Scaled and fresh.width == 16
        assert fresh.scale.item() == 1.0 and torch.equal(fresh.body[1].bias, torch.full((16,), 0.5))
        assert not torch.equal(fresh.body[1].weight, source.body[1].weight)
    assert not torch.equal(distiller.flow.models["gen1"].body[1].weight, distiller.flow.models["gen2"].body[1].weight)
    zoo = build_model("convnet_s", 4, (1, 8, 8))  # kdflow's own models are built again by build_model
    assert type(kdflow.Distiller(kdflow.methods.born_again(teacher=zoo, generations=1)).flow.models["gen1"]) is type(zoo)


def test_same_as_of_a_model_that_cannot_be_rebuilt_says_what_to_add() -> None:
    class Opaque(Scaled):
        def __init__(self, w: int) -> None:  # the argument is not kept under its name
            super().__init__(w)

    with pytest.raises(RecipeError, match=r"^nodes\.gen1: same_as 'teacher': cannot build a fresh Opaque: .*reset_parameters"):
        kdflow.Distiller(kdflow.methods.born_again(teacher=Opaque(16), generations=1))


# 5. checkpoint hygiene, malformed files, closed pipes


def test_resume_removes_stray_temp_files_and_drops_a_torn_metrics_line(
    kd_raw: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, full, cut = full_and_cut_in_epoch_two(kd_raw, tmp_path, monkeypatch)  # cut's last.pt holds epoch 1
    # what a kill mid-write leaves: temp files of atomic writes and a partial metrics line
    stray = [cut / ".last.pt.k3j9x_q1.tmp", cut / ".summary.json.a8b2c.tmp", cut / "nodes" / ".student.pt.zz81.tmp"]
    for p in stray:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"partial")
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "node": "stud')
    train(recipe, cut, resume=True, **QUIET)
    assert not any(p.exists() for p in stray)
    records = read_jsonl(cut / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [r["epoch"] for r in read_jsonl(full / "metrics.jsonl")]
    a, b = read_model_file(full / "nodes" / "student.pt")["state_dict"], read_model_file(cut / "nodes" / "student.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_an_unreadable_last_pt_is_one_line_naming_it(kd_raw: dict, tmp_path: Path, capsys) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(kd_raw))
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"PK\x03\x04 torn")  # a zip header and nothing after it
    assert main(["train", str(path), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: --resume: \S*run/last.pt cannot be read \(\w+Error: [^\n]*\); it is not a checkpoint .*", err), err


def test_resume_reads_a_last_pt_that_holds_the_frozen_teacher_itself(
    kd_raw: dict, teacher_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """last.pt names a settled node's file and hash now; one written before holds its weights, and resumes."""
    recipe, full, cut = full_and_cut_in_epoch_two(kd_raw, tmp_path, monkeypatch)
    last = load_safe(cut / "last.pt")
    assert set(last.pop("settled")) == {"teacher"}
    last["flow"].update({f"models.teacher.{k}": v for k, v in read_model_file(teacher_ckpt)["state_dict"].items()})
    torch.save(last, cut / "last.pt")
    train(recipe, cut, resume=True, **QUIET)
    a, b = read_model_file(full / "nodes" / "student.pt")["state_dict"], read_model_file(cut / "nodes" / "student.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_mid_run_is_one_line_and_resume_finishes_the_run(
    kd_raw: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The second epoch's last.pt meets a full disk (/dev/full): one line naming last.pt, epoch 1's last.pt
    intact, no temporary file left, and --resume ends with the weights of an uninterrupted run."""
    import kdflow.checkpoint as checkpoint

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(bn_raw(kd_raw)))
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", str(path), "--out", str(full)]) == 0
    real, calls = checkpoint.temp_beside, []

    def full_disk(target: Path):
        fd, tmp = real(target)
        calls.append(target.name)
        if calls.count("last.pt") == 2:
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
        return fd, tmp

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "temp_beside", full_disk)
        capsys.readouterr()
        assert main(["train", str(path), "--out", str(cut)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {cut / 'last.pt'}: No space left on device (files are written whole"), err
    assert err[0].endswith("then continue with the same command and --resume)")
    assert load_safe(cut / "last.pt")["epoch"] == 1 and not list(cut.glob(".*.tmp"))
    assert main(["train", str(path), "--out", str(cut), "--resume"]) == 0
    a, b = read_model_file(full / "nodes" / "student.pt")["state_dict"], read_model_file(cut / "nodes" / "student.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_that_cannot_be_written_is_one_line_naming_the_file(
    kd_raw: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import kdflow.checkpoint as checkpoint

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(kd_raw))

    def refuse(target: Path):  # what a read-only folder does for a user who is not root (tests may run as root)
        raise PermissionError(errno.EACCES, "Permission denied", str(target.parent / f".{target.name}.x1.tmp"))

    monkeypatch.setattr(checkpoint, "temp_beside", refuse)
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'run' / 'recipe.yaml'}: Permission denied"), err


def test_a_torn_line_before_the_last_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epo\n{"epoch": 1}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not JSON"):
        read_jsonl(path)
    path.write_text('{"epoch": 0}\n{"epo')
    assert read_jsonl(path) == [{"epoch": 0}]


def test_atomic_writes_fsync_the_file_and_then_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import stat

    from kdflow.checkpoint import save_atomic
    from kdflow.engine.rundir import write_text_atomic

    synced, fsync = [], os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    save_atomic({"w": torch.zeros(2)}, tmp_path / "a.pt")
    assert synced == ["file", "dir"]
    synced.clear()
    write_text_atomic(tmp_path / "a.json", "{}")
    assert synced == ["file", "dir"] and (tmp_path / "a.json").read_text() == "{}"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("command", ["train", "study"])
def test_malformed_yaml_is_one_line_naming_file_line_and_column(tmp_path: Path, command: str, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain:\n  epochs: [1, 2\n  batch_size: 4\n")
    code = main([command, str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0, err
    assert err.startswith(f"error: {path}, line 4, column 13: not valid YAML: expected ',' or ']', but got ':'"), err
    assert not (tmp_path / "out").exists()


def test_malformed_set_value_is_one_line(kd_raw: dict, tmp_path: Path, capsys) -> None:
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(kd_raw))
    code = main(["train", str(tmp_path / "r.yaml"), "--set", "train.epochs=[1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --set 'train.epochs=[1', line 1, column 3: not valid YAML:"), err
    assert err.strip().count("\n") == 0 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["methods"], ["describe", "all"]])  # output within, and beyond, stdout's buffer
def test_output_into_a_closed_pipe_exits_quietly(command: list[str]) -> None:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "kdflow", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written (`kdflow methods | head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_the_interrupt_message_names_the_command_that_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import kdflow.cli_study

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(kdflow.cli_study, "cmd_study", interrupted)
    assert main(["study", "s.yaml", "--out", str(tmp_path / "my study"), "--shard", "1/4"]) == 130
    err = capsys.readouterr().err
    assert err == f"interrupted; continue with `kdflow study s.yaml --out '{tmp_path / 'my study'}' --shard 1/4` (finished runs are kept)\n"
    assert "--resume" not in err
