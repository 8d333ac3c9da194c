"""Killed at random points (issue 13, item 9): kill -9 mid-epoch, during a checkpoint write, during a metrics
append, during the teacher-cache build and inside a study with two workers; the restarted run (`--resume`, or the
study started again) must end with the weights, checkpoints and metrics of an uninterrupted run, bit for bit.

Every killed run is a child process. Where the kill must land on a given step or write, the child patches the
engine in itself (`python -c`: wrap a function, then `kdflow.cli.main`) and sends itself SIGKILL there; the step
or write is drawn from a seeded RNG. Elsewhere the test sends SIGKILL from outside after a seeded random delay,
and the assertion must hold wherever the kill lands. docs/reliability.md, "Killed at random points", lists
these tests."""
from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_teacher
from kdflow.checkpoint import load_safe, read_model_file
from kdflow.cli import main
from kdflow.engine.rundir import read_jsonl

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL and /proc")

SAMPLES, HELD_OUT, BATCH, EPOCHS = 1920, 384, 32, 3
STEPS = (SAMPLES - HELD_OUT) // BATCH  # per epoch: 48
TIME_KEYS = {"time_s", "images_per_sec"}  # wall clock: the only fields a resumed run may change
CHILD_TIMEOUT = 300  # s: generous, the machine may be shared

# The killed child: it wraps one engine function so that its n-th call (spec["n"]) ends the process with SIGKILL
# at the place named by spec["at"], then runs `kdflow ARGV...` as the command line does.
KILLER = r"""
import io, json, os, signal, sys
from pathlib import Path
spec, argv = json.loads(sys.argv[1]), sys.argv[2:]
calls = [0]
def nth():
    calls[0] += 1
    return calls[0] == spec["n"]
def die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
at = spec["at"]
if at == "step":  # the n-th training step, on entering its forward pass (evaluation does not go through Flow)
    from kdflow.flow.graph import Flow
    forward = Flow.forward
    def forward_or_die(self, *a, **k):
        if nth():
            die()
        return forward(self, *a, **k)
    Flow.forward = forward_or_die
elif at == "write":  # the n-th atomic write of spec["file"]: its temporary file written (whole or torn), never renamed
    import kdflow.checkpoint as ck, kdflow.engine.rundir as rd
    real = ck.write_atomic
    def write_atomic(path, write, mode="wb"):
        if Path(path).name != spec["file"] or not nth():
            return real(path, write, mode)
        def write_then_die(f):
            buf = io.BytesIO() if "b" in mode else io.StringIO()
            write(buf)
            data = buf.getvalue()
            f.write(data if spec["whole"] else data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()
        return real(path, write_then_die, mode)
    ck.write_atomic = rd.write_atomic = write_atomic
elif at == "append":  # the n-th metrics.jsonl line: half of it written
    import kdflow.engine.train
    tr = sys.modules["kdflow.engine.train"]  # kdflow.engine.train is also the name of the engine's function
    append = tr.append_jsonl
    def append_or_die(path, record):
        if not nth():
            return append(path, record)
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(path, "a") as f:
            f.write(line[: len(line) // 2])
            f.flush()
        die()
    tr.append_jsonl = append_or_die
elif at == "cache-batch":  # the n-th batch of the teacher-cache build: the temporary memmap partly filled
    import kdflow.engine.teacher_cache as tc
    logits = tc.model_logits
    def logits_or_die(out):
        if nth():
            die()
        return logits(out)
    tc.model_logits = logits_or_die
elif at == "cache-meta":  # the cache's arrays renamed into place, its checksum file not yet written
    import kdflow.engine.teacher_cache as tc
    write_text = tc.write_text_atomic
    def write_text_or_die(path, text):
        if nth():
            die()
        return write_text(path, text)
    tc.write_text_atomic = write_text_or_die
else:
    raise SystemExit(f"unknown kill point {at!r}")
from kdflow.cli import main
sys.exit(main(argv))
"""


def run_child(argv: list[str], log: Path, kill: dict | None = None, env: dict | None = None) -> int:
    """`kdflow ARGV` in a child process (killed as `kill` says); returns its exit code (-9: killed)."""
    command = [sys.executable, *(["-c", KILLER, json.dumps(kill)] if kill else ["-m", "kdflow"]), *argv]
    with open(log, "w") as f:
        proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                              timeout=CHILD_TIMEOUT)
    return proc.returncode


def train_argv(recipe: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(recipe), "--out", str(out), "--no-progress", *extra]


def restart(recipe: Path, out: Path, capsys: pytest.CaptureFixture) -> str:
    """What a user does after the kill: the same command with --resume; when the kill came before the first
    checkpoint, --resume says there is nothing to continue and the run is started again. Returns which."""
    if (out / "last.pt").exists():
        assert main(train_argv(recipe, out, "--resume")) == 0, capsys.readouterr().err
        return "resumed"
    capsys.readouterr()
    assert main(train_argv(recipe, out, "--resume")) == 2
    assert capsys.readouterr().err.strip() == f"error: --resume: {out} holds no last.pt to resume from"
    assert main(train_argv(recipe, out)) == 0, capsys.readouterr().err
    return "started again"


def same(a, b, where: str = "") -> None:
    """Equal containers, tensors bit for bit (torch.equal: same dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in read_jsonl(run / "metrics.jsonl")]


def assert_same_run(ref: Path, run: Path) -> None:
    """The run directory `run` ends as the uninterrupted `ref`: node files and best-NODE.pt (state dicts and
    metadata), last.pt (flow, optimizers, position, best, RNG states), metrics.jsonl less wall-clock fields,
    summary.json; no temporary file is left."""
    def model_files(folder: Path) -> list[Path]:
        return sorted(p.relative_to(folder) for p in [*folder.glob("best-*.pt"), *folder.glob("nodes/*.pt")])

    assert model_files(ref) and model_files(run) == model_files(ref)
    for rel in model_files(ref):
        same(read_model_file(ref / rel), read_model_file(run / rel), str(rel))
    same(load_safe(ref / "last.pt"), load_safe(run / "last.pt"), "last.pt")
    assert metrics(run) == metrics(ref)
    assert json.loads((run / "summary.json").read_text()) == json.loads((ref / "summary.json").read_text())
    assert not [*run.glob(".*.tmp"), *run.glob("nodes/.*.tmp")]


# the recipes


def kd_recipe(folder: Path, **train) -> Path:
    """KD from a frozen convnet teacher into an MLP with dropout (the RNG state matters), SGD with momentum and
    weight decay (the optimizer state matters), crop-and-flip augmentation, a validation split (best-student.pt),
    one torch thread; 3 epochs of 48 steps."""
    teacher = make_teacher(folder / "teacher.pt")
    raw = {
        "name": "kill-kd",
        "seed": 5,
        "data": {"name": "synthetic", "options": {"num_samples": SAMPLES, "num_classes": 4, "shape": [1, 8, 8]},
                 "validation": HELD_OUT, "augment": {"crop_padding": 1, "flip": True}},
        "nodes": {"teacher": {"arch": "convnet_s", "checkpoint": str(teacher)},
                  "student": {"arch": "mlp", "args": {"hidden": [32], "dropout": 0.2}}},
        "method": "kd",
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "optim": {"lr": 0.05}, "threads": 1, **train},
    }
    path = folder / ("kd.yaml" if not train else "kd-cache.yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def kd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The KD recipe and its uninterrupted run (a child process, as the killed runs are)."""
    folder = tmp_path_factory.mktemp("kd")
    recipe = kd_recipe(folder)
    assert run_child(train_argv(recipe, folder / "ref"), folder / "ref.log") == 0, (folder / "ref.log").read_text()
    assert len(read_jsonl(folder / "ref" / "metrics.jsonl")) == EPOCHS
    return recipe, folder / "ref"


@pytest.fixture(scope="module")
def kd_cached(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The KD recipe with the teacher cache (3 views, built in batches of 256: 18 batches), its cache folder
    given by $KDFLOW_CACHE so that every run has the same recipe; and its uninterrupted run."""
    folder = tmp_path_factory.mktemp("kd-cache")
    recipe = kd_recipe(folder, eval_batch_size=256, teacher_cache={"enabled": True, "dtype": "float32"})
    env = {"KDFLOW_CACHE": str(folder / "cache")}
    code = run_child(train_argv(recipe, folder / "ref"), folder / "ref.log", env=env)
    assert code == 0, (folder / "ref.log").read_text()
    assert f"teacher cache: computing {SAMPLES - HELD_OUT}×3 views" in (folder / "ref.log").read_text()
    return recipe, folder / "ref"


# kill points: drawn once from seeded RNGs, so every run of the suite kills at the same places
_rng = random.Random(913)
STEP_KILLS = [_rng.randint(1, STEPS), _rng.randint(STEPS + 1, EPOCHS * STEPS)]  # in epoch 1 (no last.pt yet), later
LAST_PT_KILL = _rng.randint(1, EPOCHS)  # which epoch's last.pt write
APPEND_KILL = _rng.randint(1, EPOCHS)  # which epoch's metrics line
CACHE_KILL = _rng.randint(2, 3 * (SAMPLES - HELD_OUT) // 256)  # which batch of the cache build (after the first)
CACHE_STEP_KILL = _rng.randint(STEPS + 1, EPOCHS * STEPS)  # a step after the first epoch, the cache complete


@pytest.mark.parametrize("step", STEP_KILLS)
def test_killed_mid_epoch_resumes_to_the_uninterrupted_run(kd, tmp_path: Path, step: int, capsys) -> None:
    """The child kills itself entering the forward pass of a seeded step: in epoch 1 (before the first last.pt,
    so the run is started again) and in a later epoch (resumed from the last finished epoch)."""
    recipe, ref = kd
    out = tmp_path / "run"
    assert run_child(train_argv(recipe, out), tmp_path / "child.log", {"at": "step", "n": step}) == -signal.SIGKILL
    done = (step - 1) // STEPS  # epochs finished before the kill
    assert len(read_jsonl(out / "metrics.jsonl")) == done
    assert ((out / "last.pt").exists() and load_safe(out / "last.pt")["epoch"] == done) or done == 0
    assert restart(recipe, out, capsys) == ("resumed" if done else "started again")
    assert_same_run(ref, out)


@pytest.mark.parametrize(
    "file, n, whole",
    [("last.pt", LAST_PT_KILL, True), ("student.pt", 1, False)],
    ids=["last.pt", "nodes-student.pt-torn"],
)
def test_killed_during_a_checkpoint_write_resumes_to_the_uninterrupted_run(
    kd, tmp_path: Path, file: str, n: int, whole: bool, capsys
) -> None:
    """The kill lands inside checkpoint.write_atomic: the temporary file is written (whole, or half of it) and
    not yet renamed. The target keeps its previous content; the restart removes the temporary file."""
    recipe, ref = kd
    out = tmp_path / "run"
    kill = {"at": "write", "file": file, "n": n, "whole": whole}
    assert run_child(train_argv(recipe, out), tmp_path / "child.log", kill) == -signal.SIGKILL
    folder = out / "nodes" if file == "student.pt" else out
    assert len(list(folder.glob(f".{file}.*.tmp"))) == 1  # the kill came inside the write
    if file == "last.pt":
        assert ((out / "last.pt").exists() and load_safe(out / "last.pt")["epoch"] == n - 1) or n == 1
    restart(recipe, out, capsys)
    assert_same_run(ref, out)


def test_killed_during_a_metrics_append_resumes_to_the_uninterrupted_run(kd, tmp_path: Path, capsys) -> None:
    recipe, ref = kd
    out = tmp_path / "run"
    kill = {"at": "append", "n": APPEND_KILL}
    assert run_child(train_argv(recipe, out), tmp_path / "child.log", kill) == -signal.SIGKILL
    assert not (out / "metrics.jsonl").read_text().endswith("\n")  # a torn last line
    restart(recipe, out, capsys)
    assert_same_run(ref, out)


def poll(condition: Callable[[], object], timeout: float, proc: subprocess.Popen | None = None, every: float = 0.005):
    """Wait until condition() is truthy (its value is returned); None when `proc` ends or the time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            return None
        time.sleep(every)
    return None


@pytest.mark.parametrize("seed", [1])
def test_killed_from_outside_at_a_random_moment_resumes_to_the_uninterrupted_run(
    kd, tmp_path: Path, seed: int, capsys
) -> None:
    """kill -9 from outside, after the first epoch's metrics line and a seeded random share (0 to 1.2) of that
    epoch's time: it lands in a step, an evaluation or a write of epoch 2 or 3, wherever the scheduler puts it."""
    recipe, ref = kd
    out = tmp_path / "run"
    with open(tmp_path / "child.log", "w") as log:
        command = [sys.executable, "-m", "kdflow", *train_argv(recipe, out)]
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            first = poll(lambda: read_jsonl(out / "metrics.jsonl"), CHILD_TIMEOUT, proc)
            assert first, "the run ended before its first epoch was recorded"
            time.sleep(random.Random(seed).uniform(0, 1.2) * first[0]["time_s"])
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            code = proc.wait(timeout=CHILD_TIMEOUT)
    assert code == -signal.SIGKILL, f"the run ended ({code}) before the kill"
    restart(recipe, out, capsys)
    assert_same_run(ref, out)


@pytest.mark.parametrize(
    "at, n",
    [("cache-batch", CACHE_KILL), ("cache-meta", 1), pytest.param("step", CACHE_STEP_KILL, marks=pytest.mark.slow)],
)
def test_killed_during_the_teacher_cache_build_restarts_to_the_uninterrupted_run(
    kd_cached, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str, n: int, capsys
) -> None:
    """The cache is built before the first epoch, so a kill in the build leaves no last.pt: the run starts again
    and builds the cache again. Mid-build (its temporary arrays partly filled) and between the arrays' rename and
    the checksum file (arrays without a checksum are not trusted); and, for comparison, mid-epoch once the cache
    is complete (the resumed run reads it). The cache ends as the uninterrupted run's, with no temporary file left."""
    recipe, ref = kd_cached
    out, cache = tmp_path / "run", tmp_path / "cache"
    monkeypatch.setenv("KDFLOW_CACHE", str(cache))
    assert run_child(train_argv(recipe, out), tmp_path / "child.log", {"at": at, "n": n},
                     env={"KDFLOW_CACHE": str(cache)}) == -signal.SIGKILL
    if at == "cache-batch":
        assert len(list(cache.glob(".*.values.npy.*.tmp"))) == 1 and not list(cache.glob("*.npy"))
    elif at == "cache-meta":
        assert len(list(cache.glob("*.values.npy"))) == 1 and not list(cache.glob("*.json"))
    assert restart(recipe, out, capsys) == ("resumed" if at == "step" else "started again")
    assert_same_run(ref, out)
    ref_cache = ref.parent / "cache"
    assert sorted(p.name for p in cache.iterdir() if p.suffix != ".lock") == sorted(
        p.name for p in ref_cache.iterdir() if p.suffix != ".lock")
    for p in ref_cache.glob("*.npy"):
        assert (cache / p.name).read_bytes() == p.read_bytes()


def test_a_cache_build_that_waited_for_another_reads_its_cache(tmp_path: Path) -> None:
    """Builders of one cache take turns under its flock: one that waited while another process built the cache
    opens it and runs no teacher; temporary files left by a killed build are removed by the next build."""
    import threading

    from kdflow.data import load_dataset
    from kdflow.data.views import make_view_table
    from kdflow.engine.teacher_cache import TeacherCache, build_lock
    from kdflow.models import build_model

    ds = load_dataset("synthetic", "train", num_samples=16)
    table = make_view_table(len(ds), 2, 2, 1, True, 0)
    teacher = build_model("convnet_s", 4, (1, 8, 8))
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    cache = TeacherCache(tmp_path, {"k": 1}, 4)
    stray = tmp_path / f".{cache.digest}.values.npy.999999.tmp"  # what a build killed mid-way left
    stray.write_bytes(b"partial")
    logs: list[str] = []
    with build_lock(tmp_path / f"{cache.digest}.lock"):  # another builder holds the lock ...
        waiting = threading.Thread(target=cache.build, args=(teacher, ds, table, 8, False, logs.append))
        waiting.start()
        time.sleep(0.2)
        assert waiting.is_alive() and not calls  # ... so this one waits
        TeacherCache(tmp_path, {"k": 1}, 4)._build(teacher, ds, table, 8, False, lambda s: None)  # and builds it
        built = len(calls)
    waiting.join(timeout=60)
    assert built and len(calls) == built and cache.open() == "ok"  # the waiting build ran no teacher
    assert any("built by another process meanwhile" in line for line in logs)
    assert stray.exists()  # nothing is removed unless a build runs under the lock
    calls.clear()
    (tmp_path / f"{cache.digest}.json").unlink()
    cache.build(teacher, ds, table, 8, False, lambda s: None)
    assert calls and not stray.exists() and not list(tmp_path.glob(".*.tmp"))


# a study with two workers


STUDY = {
    "name": "kill",
    "seeds": [0],
    "datasets": [{"name": "synth",
                  "data": {"name": "synthetic", "validation": HELD_OUT,
                           "options": {"num_samples": SAMPLES, "num_classes": 4, "shape": [1, 8, 8]}},
                  "train": {"epochs": EPOCHS, "batch_size": BATCH}}],
    "pairs": [{"name": "M-S", "teacher": {"arch": "convnet_m", "args": {"width": 8}},
               "student": {"arch": "mlp", "args": {"hidden": [16]}}}],
    "methods": ["ce", "kd"],  # in this order: ce (no teacher) on worker 0, the teacher on worker 1, then kd
    "conditions": ["clean"],
}
VOLATILE = {"wall_time_s", "host", "finished", "attempts"}  # what may differ between a killed and a clean study


def study_results(folder: Path) -> tuple[dict, list]:
    from kdflow.study.store import Store

    store = Store(folder / "results.sqlite")
    rows = {r["hash"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in store.rows()}
    return rows, store.curves()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The study file and its run without faults (in this process, one worker: a study's rows do not depend on
    --workers, tests/test_study.py::test_rows_do_not_depend_on_the_number_of_workers)."""
    from kdflow.study.runner import run_study

    folder = tmp_path_factory.mktemp("study")
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(STUDY)))
    assert run_study(path, folder / "ref", log=lambda s: None) == {"done": 2, "failed": 0}
    return path, folder / "ref"


def workers_of(pid: int) -> list[int]:
    """The study's worker processes: spawned children of `pid`, oldest first."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            stat, cmd = (d / "stat").read_text(), (d / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if d.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmd:
            found.append((float(stat.rsplit(")", 1)[1].split()[19]), int(d.name)))  # field 22: start time
    return [p for _, p in sorted(found)]


def training(pid: int) -> str | None:
    """The run directory whose train.log the process holds open (it is training that run), or None."""
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.endswith("/train.log"):
                return str(Path(target).parent)
    except OSError:
        pass
    return None


def alive(pid: int) -> bool:
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False


def start_study(path: Path, out: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        command = [sys.executable, "-m", "kdflow", "study", str(path), "--out", str(out), "--workers", "2"]
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_study_with_two_workers_one_killed_mid_run_ends_as_the_uninterrupted_study(study, tmp_path: Path) -> None:
    """kill -9 of the worker that trains the teacher (the other trains ce), after the teacher's first epoch and a
    seeded random share of that epoch's time. The study retries the teacher in a new worker, resuming from its
    last.pt, then trains kd from it; it ends with the rows and curves of the uninterrupted study."""
    path, ref = study
    out = tmp_path / "s"
    proc = start_study(path, out, tmp_path / "study.log")
    try:
        def teacher_worker() -> tuple[int, str] | None:
            return next(((w, d) for w in workers_of(proc.pid) if "/teachers/" in (d := training(w) or "")), None)

        found = poll(teacher_worker, CHILD_TIMEOUT, proc, every=0.01)
        assert found, "no worker trained the teacher"
        worker, teacher = found
        first = poll(lambda: read_jsonl(Path(teacher) / "metrics.jsonl"), CHILD_TIMEOUT, proc)
        assert first, "the teacher ended before its first epoch was recorded"
        time.sleep(random.Random(7).uniform(0, 1.0) * first[0]["time_s"])
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(timeout=CHILD_TIMEOUT) == 0, (tmp_path / "study.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "study.log").read_text()
    assert "retry   synth · teacher convnet_m · clean · seed 0: worker process died (exit code -9)" in log, log
    same(study_results(ref), study_results(out), "store")


def test_a_worker_killed_while_it_waits_for_a_task_is_replaced(study) -> None:
    """kill -9 of an idle worker (the OOM killer's choice, say): the next task given to it goes to a new worker.
    It used to raise BrokenPipeError in the study's main process, which `kdflow study` ended in silence (exit
    code 141) with the rest of the study untrained."""
    from kdflow.study.execute import Task
    from kdflow.study.grid import expand
    from kdflow.study.runner import ProcessExecutor
    from kdflow.study.spec import load_study

    path, ref = study
    run = expand(load_study(path)[0], ref).runs[0]
    executor = ProcessExecutor(1)  # the first idle worker is the one given the next task: here the only one
    try:
        first = executor.workers[0]["proc"]
        first.kill()  # idle: no task yet
        first.join(timeout=CHILD_TIMEOUT)
        executor.submit(Task(run, str(ref)))  # finished in `ref`: the worker answers 'skipped' without training
        assert executor.workers[0]["proc"] is not first and executor.workers[0]["proc"].is_alive()
        ((task, row),) = executor.wait()
        assert task.run.hash == run.hash and row["status"] == "skipped", row
    finally:
        executor.close()


@pytest.mark.slow
def test_study_whose_main_process_is_killed_ends_as_the_uninterrupted_study_when_started_again(
    study, tmp_path: Path
) -> None:
    """kill -9 of the study's main process while the teacher trains (after its first epoch and a seeded random
    share of that epoch's time): the workers end with it; the same command again finishes the study, resuming the
    teacher from its last.pt, with the rows and curves of the uninterrupted study."""
    path, ref = study
    out = tmp_path / "s"
    proc = start_study(path, out, tmp_path / "study.log")
    try:
        first = poll(lambda: read_jsonl(next(iter((out / "teachers").glob("*/metrics.jsonl")), out / "none")),
                     CHILD_TIMEOUT, proc)
        assert first, "the teacher ended before its first epoch was recorded"
        workers = workers_of(proc.pid)
        time.sleep(random.Random(8).uniform(0, 1.0) * first[0]["time_s"])
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=CHILD_TIMEOUT) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert poll(lambda: not any(map(alive, workers)), 30), "workers outlived the main process"
    from kdflow.study.runner import run_study

    lines: list[str] = []
    assert run_study(path, out, workers=2, log=lines.append) == {"done": 2, "failed": 0}, lines  # in this process
    assert any(line.startswith("[") and "teacher" in line for line in lines)  # the teacher was not finished yet
    same(study_results(ref), study_results(out), "store")
