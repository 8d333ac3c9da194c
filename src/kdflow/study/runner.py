"""`kdflow study STUDY.yaml`: expand the grid, take this shard's share, run what is not finished.

Scheduling: tasks go out in grid order, each teacher just before the first student that needs it;
a student waits until its teacher is done (and fails at once, with the teacher's error, if the
teacher failed). Finished runs (`done` in the store) are skipped, and so are failed ones unless
`retry_failed`. With one worker everything runs in this process; with K > 1, K spawned worker
processes each take one task at a time, with torch threads = max(1, cores // K). A worker that
dies (a segfault, the OOM killer) costs its task one attempt: the task is retried once in a new
worker, resuming from its last.pt, and then recorded as failed; the other tasks go on. A worker
that dies while it waits for a task is replaced when it is given one.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from kdflow.study.execute import MAX_ATTEMPTS, Task, execute, failed_row, store_of
from kdflow.study.grid import Grid, Run, expand, shard
from kdflow.study.spec import StudySpec, load_study

Result = tuple[Task, dict[str, Any]]


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    return max(1, cpu_cores() // max(workers, 1))


def _run_safely(task: Task) -> dict[str, Any]:
    try:
        return execute(task)
    except Exception as e:  # a fault outside the training attempts (the store, a lock): one crashed attempt
        return {"hash": task.run.hash, "status": "crashed", "error": f"{type(e).__name__}: {e}"}


class InlineExecutor:
    """One task at a time in this process."""

    def __init__(self) -> None:
        self.task: Task | None = None

    def idle(self) -> int:
        return 0 if self.task else 1

    def busy(self) -> bool:
        return self.task is not None

    def submit(self, task: Task) -> None:
        self.task = task

    def wait(self) -> list[Result]:
        task, self.task = self.task, None
        return [(task, _run_safely(task))] if task else []

    def close(self) -> None:
        pass


def _die_with_parent(parent_pid: int) -> None:
    """End this worker when the study's main process ends, however it ends (kill -9 included): Linux's
    parent-death signal, and everywhere a watchdog thread that checks the parent every second. A killed
    run loses nothing: its run directory resumes from its last checkpoint."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _worker_main(conn: Connection, threads: int, parent_pid: int | None = None) -> None:
    """A worker process: set torch threads, then run tasks from the pipe until told to stop."""
    import torch

    if parent_pid is not None:
        _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it terminates us)
    torch.set_num_threads(threads)
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(_run_safely(task))


class ProcessExecutor:
    """K spawned worker processes, each fed one task at a time through its own pipe."""

    def __init__(self, workers: int) -> None:
        self.ctx = mp.get_context("spawn")
        self.threads = threads_per_worker(workers)
        self.workers: list[dict[str, Any]] = [self._start() for _ in range(workers)]

    def _start(self) -> dict[str, Any]:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(child, self.threads, os.getpid()), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "task": None}

    def idle(self) -> int:
        return sum(w["task"] is None for w in self.workers)

    def busy(self) -> bool:
        return any(w["task"] is not None for w in self.workers)

    def submit(self, task: Task) -> None:
        i = next(i for i, w in enumerate(self.workers) if w["task"] is None)
        try:
            self.workers[i]["conn"].send(task)
        except OSError:  # the worker died while it waited for a task (kill -9, the OOM killer): no attempt is lost
            self._replace(i)
            self.workers[i]["conn"].send(task)
        self.workers[i]["task"] = task

    def _replace(self, i: int) -> None:
        """A new worker in place of worker i, which has died."""
        w = self.workers[i]
        w["conn"].close()
        w["proc"].join(timeout=5)
        self.workers[i] = self._start()

    def wait(self) -> list[Result]:
        busy = [w for w in self.workers if w["task"] is not None]
        ready = wait([w["conn"] for w in busy] + [w["proc"].sentinel for w in busy])
        done: list[Result] = []
        for i, w in enumerate(self.workers):
            if w["task"] is None or (w["conn"] not in ready and w["proc"].sentinel not in ready):
                continue
            task = w["task"]
            try:
                done.append((task, w["conn"].recv()))
                w["task"] = None
            except (EOFError, OSError):  # the worker died mid-task
                w["proc"].join(timeout=5)
                code = w["proc"].exitcode
                done.append(
                    (
                        task,
                        {
                            "hash": task.run.hash,
                            "status": "crashed",
                            "error": f"worker process died (exit code {code})",
                        },
                    )
                )
                self._replace(i)
        return done

    def close(self) -> None:
        for w in self.workers:
            try:
                if w["task"] is None and w["proc"].is_alive():
                    w["conn"].send(None)
            except OSError:
                pass
        for w in self.workers:
            w["proc"].join(timeout=10 if w["task"] is None else 0)
            if w["proc"].is_alive():
                w["proc"].terminate()
                w["proc"].join()


def design_meta(study: StudySpec, text: str, grid: Grid) -> dict[str, Any]:
    """What the report needs to know about the design: it reads the store alone."""
    return {
        "name": study.name,
        "description": study.description,
        "study_file": text,
        "blocks": grid.blocks,
        "datasets": [d.name for d in study.datasets],
        "pairs": [
            {"name": p.name, "teacher": p.teacher.model_dump(), "student": p.student.model_dump()} for p in study.pairs
        ],
        "methods": [m.label for m in study.methods],
        "controls": dict(study.controls),
        "conditions": [c.model_dump() for c in study.conditions],
        "seeds": list(study.seeds),
        "runs": len(grid.runs),
        "teachers": len(grid.teachers),
    }


def _task_order(grid: Grid, runs: list[Run]) -> list[Run]:
    """This share's runs in grid order, each teacher just before the first student that needs it."""
    order: list[Run] = []
    seen: set[str] = set()
    for run in runs:
        teacher = grid.teacher_of(run)
        if teacher is not None and teacher.hash not in seen:
            seen.add(teacher.hash)
            order.append(teacher)
        order.append(run)
    return order


def _line(run: Run, row: dict[str, Any]) -> str:
    status = row["status"]
    what = run.title()
    if status in ("done", "skipped") and row.get("last_top1") is not None:
        wall = f"  {row['wall_time_s']:.0f}s" if status == "done" and row.get("wall_time_s") is not None else ""
        selected = "" if row.get("selected_top1") is None else f"val-selected {row['selected_top1']:.2f} "
        return f"{status:<7} {what}  {selected}last {row['last_top1']:.2f}{wall}  [{run.hash}]"
    return f"{status:<7} {what}  {row.get('error') or ''}  [{run.hash}]".rstrip()


def run_study(
    study_path: str | Path,
    out: str | Path | None = None,
    workers: int = 1,
    shard_of: tuple[int, int] = (0, 1),
    retry_failed: bool = False,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Run this shard's share of a study into `out` (default runs/studies/NAME); returns status counts."""
    study, text = load_study(study_path)
    study_dir = Path(out) if out else Path("runs") / "studies" / study.name
    grid = expand(study, study_dir)
    mine = shard(grid.runs, *shard_of)
    study_dir.mkdir(parents=True, exist_ok=True)
    store = store_of(study_dir)
    statuses = store.statuses()
    skip = {"done"} | (set() if retry_failed else {"failed"})
    todo = [r for r in mine if statuses.get(r.hash) not in skip]
    counts = {s: sum(statuses.get(r.hash) == s for r in mine) for s in ("done", "failed")}
    log(
        f"study {study.name}: {len(grid.runs)} runs and {len(grid.teachers)} teachers in {len(grid.blocks)} block(s); "
        f"shard {shard_of[0]}/{shard_of[1]}: {len(mine)} runs, {counts['done']} done, {counts['failed']} failed, "
        f"{len(todo)} to run; {workers} worker(s) -> {study_dir}"
    )
    for b in grid.blocks:
        axes = " × ".join(f"{len(b[a])} {a}" for a in ("datasets", "pairs", "methods", "conditions", "seeds"))
        log(f"  block {b['name']}: {axes} = {b['runs']} runs")
    if dry_run:
        return {"todo": len(todo), **counts}
    store.write_meta(design_meta(study, text, grid))
    store.refresh_labels({r.hash: r.labels for r in [*grid.runs, *grid.teachers.values()]})
    results = _schedule(grid, _task_order(grid, todo), study_dir, workers, retry_failed, log)
    statuses = store.statuses()
    counts = {s: sum(statuses.get(r.hash) == s for r in mine) for s in ("done", "failed")}
    if results.get("busy"):
        counts["busy"] = results["busy"]  # being trained by another process right now
    log(f"study {study.name}: shard {shard_of[0]}/{shard_of[1]}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return counts


def _schedule(
    grid: Grid, order: list[Run], study_dir: Path, workers: int, retry_failed: bool, log: Callable[[str], None]
) -> dict[str, int]:
    store = store_of(study_dir)
    teacher_state: dict[str, tuple[str, str]] = {}  # hash -> (status, error) once its task has returned
    statuses = store.statuses()
    for r in order:  # teachers finished earlier need no task
        if (
            r.role == "teacher"
            and statuses.get(r.hash) == "done"
            and (study_dir / r.run_dir / "nodes" / "teacher.pt").exists()
        ):
            teacher_state[r.hash] = ("done", "")
    order = [r for r in order if r.hash not in teacher_state]
    pending: deque[Task] = deque(Task(r, str(study_dir.resolve()), 1, retry_failed) for r in order)
    total, finished = len(pending), 0
    counts: dict[str, int] = {}

    def ready(task: Task) -> bool:
        return task.run.role == "teacher" or task.run.teacher is None or task.run.teacher in teacher_state

    def report(run: Run, row: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        if run.role == "student":  # 'skipped': another process finished it (done or failed) meanwhile
            key = f"{row['stored_status']} elsewhere" if row["status"] == "skipped" else row["status"]
            counts[key] = counts.get(key, 0) + 1
        log(f"[{finished}/{total}] {_line(run, row)}")

    import torch

    threads = torch.get_num_threads()
    if workers > 1:
        executor: InlineExecutor | ProcessExecutor = ProcessExecutor(workers)
    else:
        torch.set_num_threads(threads_per_worker(1))
        executor = InlineExecutor()
    try:
        while pending or executor.busy():
            while executor.idle() and (task := next((t for t in pending if ready(t)), None)):
                pending.remove(task)
                teacher = teacher_state.get(task.run.teacher or "")
                if task.run.role == "student" and teacher and teacher[0] != "done":
                    row = failed_row(task.run, f"teacher {task.run.teacher} failed: {teacher[1]}", 0)
                    store.record(row)
                    report(task.run, row)
                    continue
                executor.submit(task)
            if not executor.busy():
                break  # nothing runs and nothing is ready: cannot happen, every needed teacher is queued
            for task, row in executor.wait():
                if row["status"] == "crashed":
                    if task.attempt < MAX_ATTEMPTS:
                        log(f"retry   {task.run.title()}: {row['error']}  [{task.run.hash}]")
                        pending.appendleft(Task(task.run, task.study_dir, task.attempt + 1, task.retry_failed))
                        continue
                    row = failed_row(task.run, row["error"], MAX_ATTEMPTS)
                    store.record(row)
                if task.run.role == "teacher":
                    status = row.get("stored_status", row["status"])
                    teacher_state[task.run.hash] = (
                        "done" if status == "done" else "failed",
                        row.get("error") or status,
                    )
                report(task.run, row)
    finally:
        executor.close()
        torch.set_num_threads(threads)
    return counts
