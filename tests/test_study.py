"""Studies: grid expansion and hashes, shards, resume, failures, teacher reuse, the store, the report."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import pytest
import yaml

import kdflow.study.execute as execute_mod
from kdflow.engine import EpochEnd
from kdflow.flow import RecipeError
from kdflow.methods.recipe import resolve
from kdflow.study.grid import expand, parse_shard, shard
from kdflow.study.locks import file_lock
from kdflow.study.report import markdown_table, write_report
from kdflow.study.runner import run_study, threads_per_worker
from kdflow.study.slurm import slurm_script
from kdflow.study.spec import parse_study
from kdflow.study.store import RUN_COLUMNS, Store
from kdflow.study.tables import build_tables

DATA = {"name": "synthetic", "options": {"num_samples": 64, "num_classes": 4, "shape": [1, 8, 8]}}
STUDENT = {"arch": "mlp", "args": {"hidden": [16]}}
STUDY = {
    "name": "tiny",
    "seeds": [0, 1],
    "datasets": [
        {
            "name": "synth",
            "data": DATA,
            "train": {"epochs": 1, "batch_size": 32},
            "method_args": {"dkd": {"warmup_epochs": 1}},
        }
    ],
    "pairs": [
        {"name": "M-S", "teacher": {"arch": "convnet_m", "args": {"width": 8}}, "student": STUDENT},
        {"name": "L-S", "teacher": {"arch": "convnet_l", "args": {"width": 8, "depth": 2}}, "student": STUDENT},
    ],
    "methods": ["ce", "kd", {"name": "dkd"}],
    "conditions": ["clean", {"name": "sym25", "noise": {"rate": 0.25}}],
    "blocks": [
        {"name": "capacity", "conditions": ["clean"], "seeds": [0]},
        {"name": "noise", "pairs": ["M-S"], "methods": ["ce", "kd"]},
    ],
}
QUIET = {"log": lambda s: None}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny runs on a shared 2-core machine: one torch thread per worker, also inline."""
    monkeypatch.setattr("kdflow.study.runner.threads_per_worker", lambda workers: 1)


def write_study(tmp_path: Path, raw: dict | None = None, **train) -> Path:
    raw = copy.deepcopy(raw or STUDY)
    raw["datasets"][0]["train"].update(train)
    raw["datasets"][0]["data"].setdefault("validation", 8)  # `best` chosen on 8 held-out training samples
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Calls:
    """Wraps the engine's train() as the study calls it: records (run directory, resume), can fail or stop a run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: str | None = None, stop: str | None = None) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.fail, self.stop = fail, stop
        self.real = execute_mod.train
        monkeypatch.setattr(execute_mod, "train", self)

    def __call__(self, recipe, out, resume=False, **kw):
        name = f"{Path(out).parent.name}/{Path(out).name}"
        self.calls.append((name, resume))
        if self.fail and Path(out).name == self.fail:
            raise RuntimeError("boom: injected failure")
        callbacks = []
        if self.stop and Path(out).name == self.stop and not resume:

            def stop(info: EpochEnd) -> None:
                raise KeyboardInterrupt  # the user stops the study after this run's first epoch

            callbacks = [stop]
        return self.real(recipe, out, resume=resume, callbacks=callbacks, **kw)

    def names(self, kind: str = "") -> list[str]:
        return [n for n, _ in self.calls if n.startswith(kind)]


# the grid


def test_grid_expansion_is_deterministic_and_hashes_are_stable(tmp_path: Path) -> None:
    study = parse_study(copy.deepcopy(STUDY))
    grid = expand(study, tmp_path / "a")
    again = expand(parse_study(copy.deepcopy(STUDY)), tmp_path / "elsewhere")
    assert [r.hash for r in grid.runs] == [r.hash for r in again.runs]  # the study folder is not part of a hash
    assert list(grid.teachers) == list(again.teachers)
    # capacity: ce (shared by both pairs) + 2 pairs × {kd, dkd}; noise: M-S × {ce, kd} × 2 conditions × 2 seeds, 2 shared
    assert len(grid.runs) == 5 + 8 - 2 and len({r.hash for r in grid.runs}) == len(grid.runs)
    assert [b["runs"] for b in grid.blocks] == [5, 8]
    assert len(grid.teachers) == 5  # (M, clean, 0), (L, clean, 0), (M, clean, 1), (M, sym25, 0), (M, sym25, 1)
    first = grid.runs[0]
    assert (first.labels["method"], first.labels["pair"], first.labels["condition"], first.labels["seed"]) == (
        "ce",
        None,
        "clean",
        0,
    )
    assert [r.labels["method"] for r in grid.runs[:5]] == ["ce", "kd", "dkd", "kd", "dkd"]
    # pinned: the hash of a configuration must not drift between versions (it changed once, on purpose, when
    # each run began to carry its thread count: train.threads is part of what a run computes)
    assert first.hash == "a095f1d1a7bc"
    for run in grid.runs:
        resolve(run.recipe)  # every run is a plain, valid recipe
        teacher = grid.teacher_of(run)
        if run.labels["method"] == "ce":
            assert teacher is None and "teacher" not in run.recipe["nodes"]
        else:
            assert teacher.recipe["data"] == run.recipe["data"] and teacher.recipe["seed"] == run.recipe["seed"]
            assert run.recipe["nodes"]["teacher"]["checkpoint"].endswith(f"teachers/{teacher.hash}/nodes/teacher.pt")
    noisy = [r for r in grid.runs if r.labels["condition"] == "sym25"]
    assert all(
        r.recipe["data"]["noise"] == {"kind": "symmetric", "rate": 0.25, "seed": r.labels["seed"]} for r in noisy
    )

    renamed = copy.deepcopy(STUDY)  # labels are not configuration ...
    renamed["pairs"][0]["name"] = "medium"
    renamed["blocks"][1]["pairs"] = ["medium"]
    assert [r.hash for r in expand(parse_study(renamed), tmp_path).runs] == [r.hash for r in grid.runs]
    longer = copy.deepcopy(STUDY)  # ... training settings are
    longer["datasets"][0]["train"]["epochs"] = 2
    assert not {r.hash for r in expand(parse_study(longer), tmp_path).runs} & {r.hash for r in grid.runs}


@pytest.mark.parametrize("count", [1, 2, 3, 4, 13])
def test_shards_cover_the_grid_exactly_once(tmp_path: Path, count: int) -> None:
    runs = expand(parse_study(copy.deepcopy(STUDY)), tmp_path).runs
    shares = [shard(runs, i, count) for i in range(count)]
    hashes = [r.hash for s in shares for r in s]
    assert sorted(hashes) == sorted(r.hash for r in runs) and len(set(hashes)) == len(runs)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [r.hash for r in shard(runs, 0, count)] == [r.hash for r in shard(list(runs), 0, count)]


def test_shard_and_study_errors_are_one_line() -> None:
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x/2", "1"):
        with pytest.raises(RecipeError, match="--shard"):
            parse_shard(bad)
    raw = copy.deepcopy(STUDY)
    raw["pairs"][0]["teacher"]["archh"] = "x"
    with pytest.raises(RecipeError, match=r"pairs\.0\.teacher\.archh: unknown field"):
        parse_study(raw)
    raw = copy.deepcopy(STUDY)
    raw["blocks"][0]["methods"] = ["kd", "fitnett"]
    with pytest.raises(RecipeError, match=r"blocks\.0\.methods: no method 'fitnett'"):
        parse_study(raw)
    raw = copy.deepcopy(STUDY)
    raw["datasets"][0]["train"]["epochs"] = -1
    with pytest.raises(RecipeError, match=r"datasets\.0.*train\.epochs"):
        parse_study(raw)
    raw = copy.deepcopy(STUDY)
    raw["methods"].append("dml")  # its default peers are peer1/peer2: no 'student' node
    with pytest.raises(RecipeError, match="no node named 'student'"):
        expand(parse_study(raw), "/tmp")


# running


def test_interrupted_study_resumes_without_repeating_finished_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_study(tmp_path, epochs=2)
    out = tmp_path / "study"
    grid = expand(parse_study(yaml.safe_load(path.read_text())), out)
    victim = grid.runs[2].hash  # dkd on M-S: stopped after its first epoch
    calls = Calls(monkeypatch, stop=victim)
    with pytest.raises(KeyboardInterrupt):
        run_study(path, out, **QUIET)
    first = list(calls.calls)
    assert first[-1] == (f"runs/{victim}", False)
    assert (out / "runs" / victim / "last.pt").exists()

    calls.calls.clear()
    counts = run_study(path, out, **QUIET)
    assert counts == {"done": len(grid.runs), "failed": 0}
    finished_before = {n for n, _ in first[:-1]}
    assert not finished_before & {n for n, _ in calls.calls}  # nothing finished is trained again
    assert calls.calls[0] == (f"runs/{victim}", True)  # the stopped run resumes from its last.pt
    trained = [n for n, _ in first[:-1] + calls.calls]
    assert sorted(trained) == sorted({*trained})  # every run and teacher trained exactly once
    assert len([n for n in trained if n.startswith("teachers/")]) == len(grid.teachers)  # teachers trained once, reused
    assert len([n for n in trained if n.startswith("runs/")]) == len(grid.runs)

    calls.calls.clear()
    run_study(path, out, **QUIET)
    assert calls.calls == []  # a finished study trains nothing
    rows = {r["hash"]: r for r in Store(out / "results.sqlite").rows()}
    for run in grid.runs:
        assert rows[run.hash]["status"] == "done"
        if run.teacher:
            assert rows[run.hash]["teacher_hash"] == run.teacher and rows[run.teacher]["status"] == "done"


def test_failing_run_is_retried_once_then_recorded_and_the_rest_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_study(tmp_path)
    out = tmp_path / "study"
    grid = expand(parse_study(yaml.safe_load(path.read_text())), out)
    bad = grid.runs[1].hash
    calls = Calls(monkeypatch, fail=bad)
    counts = run_study(path, out, **QUIET)
    assert counts == {"done": len(grid.runs) - 1, "failed": 1}
    assert calls.names(f"runs/{bad}") == [f"runs/{bad}"] * 2  # the first try and one retry
    row = Store(out / "results.sqlite").row(bad)
    assert row["status"] == "failed" and row["attempts"] == 2 and "RuntimeError: boom" in row["error"]
    assert "boom" in (out / "runs" / bad / "error.log").read_text()

    calls.calls.clear()
    run_study(path, out, **QUIET)  # failed runs are not retried by default ...
    assert calls.calls == []
    calls.fail = None
    counts = run_study(path, out, retry_failed=True, **QUIET)  # ... but on request
    assert calls.names() == [f"runs/{bad}"] and counts["failed"] == 0
    assert Store(out / "results.sqlite").row(bad)["status"] == "done"


def test_failed_teacher_fails_its_students_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_study(tmp_path)
    out = tmp_path / "study"
    grid = expand(parse_study(yaml.safe_load(path.read_text())), out)
    teacher = grid.runs[1].teacher
    Calls(monkeypatch, fail=teacher)
    counts = run_study(path, out, **QUIET)
    orphans = [r for r in grid.runs if r.teacher == teacher]
    assert counts == {"done": len(grid.runs) - len(orphans), "failed": len(orphans)}
    row = Store(out / "results.sqlite").row(orphans[0].hash)
    assert row["status"] == "failed" and row["error"].startswith(f"teacher {teacher} failed: RuntimeError: boom")


def test_two_shards_into_one_directory_complete_the_study_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_study(tmp_path)
    out = tmp_path / "study"
    grid = expand(parse_study(yaml.safe_load(path.read_text())), out)
    calls = Calls(monkeypatch)
    a = run_study(path, out, shard_of=(0, 2), **QUIET)
    b = run_study(path, out, shard_of=(1, 2), **QUIET)
    assert a["done"] + b["done"] == len(grid.runs)
    trained = calls.names()
    assert len(trained) == len(set(trained)) == len(grid.runs) + len(grid.teachers)  # a shared teacher: trained once


def test_store_row_has_every_field(tmp_path: Path) -> None:
    path = write_study(tmp_path, epochs=2)
    out = tmp_path / "study"
    run_study(path, out, **QUIET)
    store = Store(out / "results.sqlite")
    rows = store.rows()
    kd = next(r for r in rows if r["method"] == "kd" and r["condition"] == "sym25")
    nullable = {"error", "imbalance_kind"}
    assert set(kd) == set(RUN_COLUMNS)
    assert all(kd[c] is not None for c in RUN_COLUMNS if c not in nullable), {
        c: kd[c] for c in RUN_COLUMNS if kd[c] is None
    }
    assert kd["status"] == "done" and kd["attempts"] == 1 and kd["epochs"] == 2
    assert len(kd["per_class_top1"]) == 4 and 0 <= kd["agreement"] <= 1 and 0 <= kd["ece"] <= 1
    assert kd["student_params"] < kd["teacher_params"] and kd["wall_time_s"] > 0
    assert abs(kd["realised_noise"] - 0.25) < 0.02 and sum(kd["train_class_counts"]) == 64 - 8  # 8 held out for validation
    assert (out / kd["run_dir"] / "summary.json").exists()
    ce = next(r for r in rows if r["method"] == "ce")
    assert (
        ce["pair"] is None and ce["agreement"] is None and ce["teacher_params"] is None and ce["teacher_arch"] is None
    )
    teacher = next(r for r in rows if r["role"] == "teacher")
    assert teacher["method"] == "teacher" and teacher["teacher_params"] > 0 and teacher["student_arch"] is None
    curve = [c for c in store.curves() if c["hash"] == kd["hash"]]
    assert [c["step"] for c in curve] == [1, 2] and curve[-1]["test_top1"] == kd["last_top1"]
    meta = store.meta()
    assert meta["name"] == "tiny" and [b["name"] for b in meta["blocks"]] == ["capacity", "noise"]

    report = write_report(out)  # the whole report from this store: tables, LaTeX, plots
    md = (report / "report.md").read_text()
    assert (
        "### synth · clean: methods × teacher–student pairs" in md
        and "### synth · pair M-S: methods × conditions" in md
    )
    assert "\\begin{tabular}" in (report / "report.tex").read_text()
    pngs = {p.name for p in report.glob("*.png")}
    assert {"noise-symmetric-synth-M_S.png", "capacity-synth-clean-M_S-L_S.png", "curves-synth-M_S-clean.png"} <= pngs
    assert all(f"({name})" in md for name in pngs)


def test_worker_processes_run_the_study(tmp_path: Path) -> None:
    raw = copy.deepcopy(STUDY)
    raw["blocks"] = [{"name": "small", "pairs": ["M-S"], "methods": ["ce", "kd"], "conditions": ["clean"]}]
    path = write_study(tmp_path, raw)
    out = tmp_path / "study"
    lines: list[str] = []
    counts = run_study(path, out, workers=2, log=lines.append)
    assert counts == {"done": 4, "failed": 0}
    assert sum(line.startswith("[") for line in lines) == 4 + 2  # a progress line per run and teacher
    assert {r["status"] for r in Store(out / "results.sqlite").rows()} == {"done"}


def test_rows_do_not_depend_on_the_number_of_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inline (--workers 1: the process's threads, all cores) and 2 worker processes (1 thread each) give the
    same numbers: every run fixes its own thread count (train.threads, the study's `threads`)."""
    monkeypatch.setattr("kdflow.study.runner.threads_per_worker", threads_per_worker)  # the real split
    monkeypatch.setattr("kdflow.study.runner.cpu_cores", lambda: 2)
    raw = copy.deepcopy(STUDY)
    raw["pairs"][0]["student"] = {"arch": "convnet_s", "args": {"width": 8}}
    raw["blocks"] = [{"name": "small", "pairs": ["M-S"], "methods": ["ce", "kd"], "conditions": ["clean"]}]
    path = write_study(tmp_path, raw, epochs=2)
    keys = ("selected_top1", "last_top1", "test_best_top1", "ece")
    results = []
    for workers in (1, 2):
        run_study(path, tmp_path / f"w{workers}", workers=workers, **QUIET)
        rows = Store(tmp_path / f"w{workers}" / "results.sqlite").rows()
        results.append({r["hash"]: tuple(r[k] for k in keys) for r in rows})
    assert results[0] == results[1] and len(results[0]) == 6


def test_student_lock_is_not_shared(tmp_path: Path) -> None:
    with file_lock(tmp_path / "x.lock") as held:
        assert held
        with file_lock(tmp_path / "x.lock", blocking=False) as again:
            assert not again  # another open of the lock (another process or shard) is refused
    with file_lock(tmp_path / "x.lock", blocking=False) as free:
        assert free


def test_cli_and_slurm_script(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kdflow.cli_study import add_study_commands

    path = write_study(tmp_path)
    parser = argparse.ArgumentParser(prog="kdflow")
    add_study_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["study", str(path), "--out", str(tmp_path / "s"), "--dry-run", "--shard", "1/2"])
    assert args.fn(args) == 0
    assert "shard 1/2: 6 runs" in capsys.readouterr().out
    args = parser.parse_args(
        [
            "study",
            "slurm",
            str(path),
            "--out",
            str(tmp_path / "s"),
            "--shards",
            "4",
            "--workers",
            "2",
            "--time",
            "02:00:00",
        ]
    )
    assert args.fn(args) == 0
    script = (tmp_path / "s" / "slurm.sh").read_text()
    assert (
        "#SBATCH --array=0-3" in script
        and "#SBATCH --cpus-per-task=2" in script
        and "#SBATCH --time=02:00:00" in script
    )
    assert '--shard "$SLURM_ARRAY_TASK_ID/4"' in script and "-m kdflow study" in script
    assert (
        slurm_script(path, tmp_path / "s", 4, workers=2, time_limit="02:00:00") == script
    )  # what `kdflow study slurm` wrote


# the report of a fixed store


def _row(
    h: str,
    method: str,
    pair: str | None,
    seed: int,
    best: float,
    condition: str = "clean",
    role: str = "student",
    teacher: str = "tA",
) -> dict:
    return {
        "hash": h,
        "role": role,
        "dataset": "d",
        "pair": pair,
        "method": method,
        "condition": condition,
        "seed": seed,
        "teacher_key": teacher if (pair or role == "teacher") else None,
        "student_key": None if role == "teacher" else "s",
        "status": "done",
        "selected_top1": best,
        "last_top1": best - 1,
    }


def test_report_of_a_fixed_store_matches_the_expected_tables(tmp_path: Path) -> None:
    store = Store(tmp_path / "results.sqlite")
    rows = [
        _row("c0", "ce", None, 0, 80.0), _row("c1", "ce", None, 1, 82.0),
        _row("ka0", "kd", "A", 0, 83.0), _row("ka1", "kd", "A", 1, 85.0),
        _row("kb0", "kd", "B", 0, 82.0, teacher="tB"), _row("kb1", "kd", "B", 1, 83.0, teacher="tB"),
        _row("da0", "dkd", "A", 0, 84.0), _row("da1", "dkd", "A", 1, 86.0),
        _row("db0", "dkd", "B", 0, 81.0, teacher="tB"),
        _row("ta0", "teacher", None, 0, 90.0, role="teacher"), _row("ta1", "teacher", None, 1, 92.0, role="teacher"),
        _row("tb0", "teacher", None, 0, 93.0, role="teacher", teacher="tB"),
        _row("tb1", "teacher", None, 1, 93.0, role="teacher", teacher="tB"),
        _row("n0", "ce", None, 0, 70.0, "sym20"), _row("n1", "ce", None, 1, 72.0, "sym20"),
        _row("nk0", "kd", "A", 0, 75.0, "sym20"), _row("nk1", "kd", "A", 1, 76.0, "sym20"),
        _row("nt0", "teacher", None, 0, 85.0, "sym20", role="teacher"),
        {**_row("bad", "dkd", "A", 1, 0.0, "sym20"), "status": "failed", "selected_top1": None, "last_top1": None, "error": "x"},
    ]  # fmt: skip
    for r in rows:
        store.record(r)
    tables = build_tables(store.rows(), store.meta())
    assert [t.title for t in tables] == [
        "d · clean: methods × teacher–student pairs",
        "d · pair A: methods × conditions",
    ]
    assert markdown_table(tables[0], "selected_top1") == "\n".join(
        [
            "| method | A | B |",
            "|---|---|---|",
            "| teacher | 91.00 ± 1.41 | 93.00 ± 0.00 |",
            "| ce | 81.00 ± 1.41 | 81.00 ± 1.41 |",
            "| kd | 84.00 ± 1.41 (ce +3.00†) | **82.50 ± 0.71** (ce +1.50) |",  # † 3.00 > 2·√(1.41²/2 + 1.41²/2) = 2.83
            "| dkd | **85.00 ± 1.41** (ce +4.00†, kd +1.00) | 81.00 (ce +0.00, kd -1.50) [n=1] |",
        ]
    )
    assert markdown_table(tables[1], "last_top1") == "\n".join(
        [
            "| method | clean | sym20 |",
            "|---|---|---|",
            "| teacher | 90.00 ± 1.41 | 84.00 [n=1] |",
            "| ce | 80.00 ± 1.41 | 70.00 ± 1.41 |",
            "| kd | 83.00 ± 1.41 (ce +3.00†) | **74.50 ± 0.71** (ce +4.50†) |",
            "| dkd | **84.00 ± 1.41** (ce +4.00†, kd +1.00) | – |",
        ]
    )
    md = (write_report(tmp_path) / "report.md").read_text()
    assert "Test top-1 at the epoch of best validation top-1" in md and "legacy" not in md  # no table selects on test
    assert "## Failed runs" in md and "| bad | d | A | dkd | sym20 | 1 | x |" in md
    assert json.dumps(store.meta()) == "{}"


def test_a_moved_study_directory_keeps_its_finished_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_study(tmp_path, epochs=2)
    grid = expand(parse_study(yaml.safe_load(path.read_text())), tmp_path / "a")
    victim = grid.runs[2].hash
    calls = Calls(monkeypatch, stop=victim)
    with pytest.raises(KeyboardInterrupt):
        run_study(path, tmp_path / "a", **QUIET)
    done = {n for n, _ in calls.calls[:-1]}
    (tmp_path / "a").rename(tmp_path / "b")
    calls.calls.clear()
    calls.stop = None
    assert run_study(path, tmp_path / "b", **QUIET)["done"] == len(grid.runs)
    assert not done & {n for n, _ in calls.calls}  # hashes do not depend on where the study lives
    # the stopped run's recipe now names the teacher at its new path: it starts afresh rather than resume
    assert calls.calls[0] == (f"runs/{victim}", False)


def test_a_store_from_before_validation_gains_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "results.sqlite"
    with sqlite3.connect(path) as db:  # the runs table as kdflow wrote it before selection on validation
        db.execute("CREATE TABLE runs (hash TEXT PRIMARY KEY, role TEXT NOT NULL, best_top1 REAL, last_top1 REAL)")
        db.execute("INSERT INTO runs VALUES ('old', 'student', 80.0, 79.0)")
    store = Store(path)
    with store.connect() as db:
        columns = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
        old = dict(db.execute("SELECT * FROM runs WHERE hash = 'old'").fetchone())
    assert {"selected_top1", "selected_epoch", "test_best_top1"} <= columns
    assert old["selected_top1"] is None and old["last_top1"] == 79.0


def test_a_control_gives_its_own_gain(tmp_path: Path) -> None:
    """kd's CE weight is 0.1: the study names `ce@0.1` (the student alone at that weight) as kd's control, and
    kd's cells give the gain over it beside the gain over ce."""
    store = Store(tmp_path / "results.sqlite")
    rows = [_row("c0", "ce", None, 0, 80.0), _row("c1", "ce", None, 1, 82.0),
            _row("w0", "ce@0.1", None, 0, 78.0), _row("w1", "ce@0.1", None, 1, 78.0),
            _row("k0", "kd", "A", 0, 83.0), _row("k1", "kd", "A", 1, 85.0),
            _row("d0", "dkd", "A", 0, 84.0), _row("d1", "dkd", "A", 1, 86.0),
            _row("n0", "ce", None, 0, 70.0, "sym20"), _row("nk0", "kd", "A", 0, 75.0, "sym20")]  # fmt: skip
    for r in rows:
        store.record(r)
    store.write_meta({"methods": ["ce", "ce@0.1", "kd", "dkd"], "controls": {"kd": "ce@0.1"}})
    (t,) = [t for t in build_tables(store.rows(), store.meta()) if t.axis == "conditions"]
    table = markdown_table(t, "selected_top1")
    assert "| kd | 84.00 ± 1.41 (ce +3.00†, ce@0.1 +6.00†) |" in table
    assert "| dkd | **85.00 ± 1.41** (ce +4.00†, kd +1.00) |" in table  # no control named for dkd
    with pytest.raises(RecipeError, match="controls: no method labelled .ce@0.5."):
        parse_study({**copy.deepcopy(STUDY), "controls": {"kd": "ce@0.5"}})


def test_a_recipe_error_is_recorded_as_failed_without_a_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_study(tmp_path)
    out = tmp_path / "study"
    run = expand(parse_study(yaml.safe_load(path.read_text())), out).runs[0]
    calls = []

    def refuse(recipe, out, **kw):
        calls.append(out)
        raise RecipeError("train.batch_size: 32 is above the 8 training samples")  # fails the same way every time

    monkeypatch.setattr(execute_mod, "train", refuse)
    row = execute_mod.train_and_record(execute_mod.Task(run, str(out)), execute_mod.store_of(out))
    assert len(calls) == 1 and row["status"] == "failed" and row["attempts"] == 1
    assert "RecipeError: train.batch_size: 32 is above" in row["error"]
    assert Store(out / "results.sqlite").row(run.hash)["status"] == "failed"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_with_a_killed_main_process(tmp_path: Path) -> None:
    """kill -9 of the study's main process leaves no worker training on as an orphan."""
    import os
    import signal
    import subprocess
    import time

    raw = copy.deepcopy(STUDY)
    raw["blocks"] = [{"name": "small", "pairs": ["M-S"], "methods": ["ce", "kd"], "conditions": ["clean"]}]
    path = write_study(tmp_path, raw, epochs=20000)  # minutes of training: killed mid-run
    code = f"from kdflow.study.runner import run_study; run_study({str(path)!r}, {str(tmp_path / 's')!r}, workers=2)"
    main = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def workers() -> list[int]:
        found = []
        for d in Path("/proc").iterdir():
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if d.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == main.pid and b"spawn_main" in cmd:
                found.append(int(d.name))
        return found

    deadline = time.time() + 120
    while len(workers()) < 2 and time.time() < deadline:
        time.sleep(0.5)
    pids = workers()
    assert len(pids) == 2
    time.sleep(3)  # the workers are importing or training now
    os.kill(main.pid, signal.SIGKILL)
    main.wait()

    def alive(pid: int) -> bool:
        try:
            return "Z" not in (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
        except OSError:
            return False

    deadline = time.time() + 15
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids), [p for p in pids if alive(p)]


def test_a_lock_held_by_a_killed_process_is_free(tmp_path: Path) -> None:
    """flock locks die with their process: a worker or shard killed while it holds a run's lock leaves
    nothing stale, and the next process takes the lock at once."""
    import os
    import signal
    import subprocess
    import time

    lock = tmp_path / "run.lock"
    code = ("import time; from kdflow.study.locks import file_lock\n"
            f"with file_lock({str(lock)!r}) as held:\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with file_lock(lock, blocking=False) as free:
        assert not free  # held by the live process
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    time.sleep(0.1)
    with file_lock(lock, blocking=False) as free:
        assert free
