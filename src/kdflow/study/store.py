"""The results store: SQLite in STUDY_DIR/results.sqlite, one row per finished run.

A row (and its per-epoch curve) is written in one `BEGIN IMMEDIATE` transaction when the run
finishes, so a reader never sees half of it; worker processes and shards on other machines write
concurrently through SQLite's own file locks (a busy writer waits up to `timeout` seconds).
The rollback journal is kept (not WAL), since WAL needs shared memory that network file systems
lack. The `study` table holds the study's design (its file, blocks, pairs, label orders), so the
report needs nothing but this file.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    hash TEXT PRIMARY KEY,          -- configuration hash (the run directory's name)
    role TEXT NOT NULL,             -- 'student' or 'teacher'
    dataset TEXT NOT NULL,
    pair TEXT,                      -- NULL for runs without a teacher: they serve every pair with their student
    method TEXT NOT NULL,           -- the method's label; 'teacher' for teacher runs
    condition TEXT NOT NULL,
    seed INTEGER NOT NULL,
    method_name TEXT, method_args TEXT,              -- registry name, arguments (JSON)
    teacher_arch TEXT, teacher_args TEXT, teacher_key TEXT,
    student_arch TEXT, student_args TEXT, student_key TEXT,
    noise_kind TEXT, noise_rate REAL, imbalance_kind TEXT, imbalance_ratio REAL,
    status TEXT NOT NULL,           -- 'done' or 'failed'
    error TEXT,                     -- the last error of a failed run
    attempts INTEGER,
    selected_top1 REAL, selected_epoch INTEGER, -- test top-1 at the epoch of best validation top-1 (NULL: no validation split)
    last_top1 REAL, last_top5 REAL, epochs INTEGER,
    test_best_top1 REAL,            -- legacy: the best test top-1 over the epochs (selection on the test set)
    per_class_top1 TEXT,            -- JSON list, last epoch
    ece REAL,                       -- expected calibration error, last epoch
    agreement REAL,                 -- fraction of test samples where student and teacher argmax agree (NULL: no teacher)
    teacher_hash TEXT, teacher_top1 REAL,
    student_params INTEGER, teacher_params INTEGER,
    realised_noise REAL, train_class_counts TEXT,
    wall_time_s REAL,
    run_dir TEXT,                   -- relative to the study directory
    host TEXT, finished TEXT
);
CREATE TABLE IF NOT EXISTS curves (
    hash TEXT NOT NULL, node TEXT NOT NULL, stage_index INTEGER NOT NULL, stage TEXT, epoch INTEGER NOT NULL,
    step INTEGER NOT NULL,          -- epoch counted across stages (1-based)
    test_top1 REAL, test_loss REAL, train_top1 REAL, train_loss REAL, ece REAL, val_top1 REAL,
    PRIMARY KEY (hash, node, stage_index, epoch)
);
CREATE TABLE IF NOT EXISTS study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

RUN_COLUMNS = (
    "hash role dataset pair method condition seed method_name method_args teacher_arch teacher_args teacher_key "
    "student_arch student_args student_key noise_kind noise_rate imbalance_kind imbalance_ratio status error attempts "
    "selected_top1 selected_epoch last_top1 last_top5 epochs test_best_top1 per_class_top1 ece agreement teacher_hash teacher_top1 "
    "student_params teacher_params realised_noise train_class_counts wall_time_s run_dir host finished"
).split()
JSON_COLUMNS = {"method_args", "teacher_args", "student_args", "per_class_top1", "train_class_counts"}
CURVE_COLUMNS = "hash node stage_index stage epoch step test_top1 test_loss train_top1 train_loss ece val_top1".split()
LABEL_COLUMNS = ("dataset", "pair", "method", "condition")


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """A store written by an earlier kdflow gains the columns added since (NULL in its old rows)."""
    for table, columns in (("runs", RUN_COLUMNS), ("curves", CURVE_COLUMNS)):
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        for c in columns:
            if c not in have:
                kind = "INTEGER" if c.endswith("epoch") else "TEXT" if c in JSON_COLUMNS else "REAL"
                db.execute(f"ALTER TABLE {table} ADD COLUMN {c} {kind}")


class Store:
    """A connection per call: safe to use from any process; each write is one transaction."""

    def __init__(self, path: str | Path, timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.executescript(SCHEMA)  # each CREATE ... IF NOT EXISTS commits on its own
            _add_missing_columns(db)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE (the write lock up front, so two writers never deadlock), COMMIT or ROLLBACK."""
        with self.connect() as db:
            for attempt in range(20):
                try:
                    db.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as e:  # busy beyond the timeout: wait and try again
                    if "locked" not in str(e) or attempt == 19:
                        raise
                    time.sleep(0.5 + attempt)
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    # writing

    def record(self, row: dict[str, Any], curves: list[dict[str, Any]] = ()) -> None:
        """Write a finished run's row and its curve (replacing earlier ones) in one transaction."""
        unknown = set(row) - set(RUN_COLUMNS)
        if unknown:
            raise ValueError(f"unknown store columns {sorted(unknown)}")
        values = [_encode(c, row.get(c)) for c in RUN_COLUMNS]
        with self.transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})",
                values,
            )
            db.execute("DELETE FROM curves WHERE hash = ?", (row["hash"],))
            db.executemany(
                f"INSERT INTO curves ({', '.join(CURVE_COLUMNS)}) VALUES ({', '.join('?' * len(CURVE_COLUMNS))})",
                [[{**c, "hash": row["hash"]}.get(k) for k in CURVE_COLUMNS] for c in curves],
            )

    def write_meta(self, meta: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO study (key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()]
            )

    def refresh_labels(self, labels: dict[str, dict[str, Any]]) -> None:
        """Rewrite the labels of stored runs from the current study file (hashes do not depend on labels)."""
        with self.transaction() as db:
            db.executemany(
                f"UPDATE runs SET {', '.join(f'{c} = ?' for c in LABEL_COLUMNS)} WHERE hash = ?",
                [[lab[c] for c in LABEL_COLUMNS] + [h] for h, lab in labels.items()],
            )

    # reading

    def statuses(self) -> dict[str, str]:
        with self.connect() as db:
            return {r["hash"]: r["status"] for r in db.execute("SELECT hash, status FROM runs")}

    def status(self, hash: str) -> str | None:
        with self.connect() as db:
            r = db.execute("SELECT status FROM runs WHERE hash = ?", (hash,)).fetchone()
        return r["status"] if r else None

    def rows(self, status: str | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM runs", ()
        if status is not None:
            query, args = query + " WHERE status = ?", (status,)
        with self.connect() as db:
            return [_decode(dict(r)) for r in db.execute(query + " ORDER BY rowid", args)]

    def row(self, hash: str) -> dict[str, Any] | None:
        with self.connect() as db:
            r = db.execute("SELECT * FROM runs WHERE hash = ?", (hash,)).fetchone()
        return _decode(dict(r)) if r else None

    def curves(self) -> list[dict[str, Any]]:
        with self.connect() as db:
            return [dict(r) for r in db.execute("SELECT * FROM curves ORDER BY hash, node, step")]

    def meta(self) -> dict[str, Any]:
        with self.connect() as db:
            return {r["key"]: json.loads(r["value"]) for r in db.execute("SELECT key, value FROM study")}


def _encode(column: str, value: Any) -> Any:
    return json.dumps(value) if column in JSON_COLUMNS and value is not None else value


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: json.loads(v) if k in JSON_COLUMNS and v is not None else v for k, v in row.items()}
