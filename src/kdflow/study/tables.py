"""The report's tables, in the papers' layout: methods as rows, pairs or conditions as columns.

Built from the store's rows alone. A cell is the mean ± sample standard deviation over seeds of
one metric; `[n=k]` marks a cell with fewer seeds than the study has. For top-1 the cell also
gives the gain of its mean over the student alone (`ce`) and over `kd` in the same column, and
the best mean per column is bold (ties too; the teacher row is not a contender).

Which tables: per dataset, one methods × pairs table for each condition with runs from at least
two pairs (the capacity gap), and one methods × conditions table for each pair with runs under at
least two conditions (noise and imbalance); a dataset with neither gets one methods × pairs table
per condition. Runs without a teacher (the student alone) fill the column of every pair with their
student; a column exists only where some run used that pair's teacher. A methods × pairs table
leaves out the methods run on only one of its pairs (their numbers are in that pair's methods ×
conditions table) and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

METRICS = {
    "selected_top1": ("test top-1 at the epoch of best validation top-1 (%)", "max"),
    "last_top1": ("last-epoch test top-1 (%)", "max"),
    "agreement": ("teacher–student agreement on the test split (% of equal argmax, last epoch)", "max"),
    "ece": ("expected calibration error (%, 15 bins, last epoch)", "min"),
}
GAIN_METRICS = ("selected_top1", "last_top1")
# The store also keeps `test_best_top1` (the best test top-1 over the epochs: selection on the test set, the
# legacy of papers that reported it); no table reads it, so no report selects on the test set.
BASELINE, KD = "ce", "kd"


@dataclass
class Table:
    dataset: str
    axis: str  # "pairs" or "conditions"
    fixed: str  # the condition (axis pairs) or the pair (axis conditions)
    columns: list[str]
    methods: list[str]
    cells: dict[tuple[str, str], list[dict[str, Any]]]  # (method, column) -> rows
    teacher: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # column -> teacher rows
    seeds: int = 0  # the number of seeds a full cell has
    omitted: list[str] = field(default_factory=list)  # methods left out of a pairs table: run on one of its pairs only
    controls: dict[str, str] = field(default_factory=dict)  # method -> its matched-label-weight control

    @property
    def title(self) -> str:
        if self.axis == "pairs":
            return f"{self.dataset} · {self.fixed}: methods × teacher–student pairs"
        return f"{self.dataset} · pair {self.fixed}: methods × conditions"


def _order(preferred: list[str], seen: list[Any]) -> list[Any]:
    """The study's order for the labels it names, then the others in order of appearance."""
    out = [x for x in preferred if x in seen]
    return out + [x for x in dict.fromkeys(seen) if x not in out]


def pairs_of(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pair name -> {teacher_key, student_key, teacher_params, student_params}, from the runs that used a teacher."""
    pairs: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["role"] == "student" and r["pair"] is not None:
            p = pairs.setdefault(
                r["pair"], {"teacher_key": r["teacher_key"], "student_key": r["student_key"], "datasets": {}}
            )
            p["datasets"].setdefault(r["dataset"], (r.get("teacher_params"), r.get("student_params")))
    order = _order([p["name"] for p in meta.get("pairs", [])], list(pairs))
    return {name: pairs[name] for name in order}


def in_pair(row: dict[str, Any], name: str, pair: dict[str, Any]) -> bool:
    if row["role"] == "teacher":
        return row["teacher_key"] == pair["teacher_key"]
    return row["pair"] == name or (row["pair"] is None and row["student_key"] == pair["student_key"])


def build_tables(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[Table]:
    """Every table of the report (see the module's docstring), from the store's done rows and design."""
    rows = [r for r in rows if r["status"] == "done"]
    students = [r for r in rows if r["role"] == "student"]
    teachers = [r for r in rows if r["role"] == "teacher"]
    pairs = pairs_of(rows, meta)
    datasets = _order(meta.get("datasets", []), [r["dataset"] for r in rows])
    conditions = _order([c["name"] for c in meta.get("conditions", [])], [r["condition"] for r in rows])
    methods = _order(meta.get("methods", []), [r["method"] for r in students])
    n_seeds = len(meta.get("seeds", [])) or len({r["seed"] for r in rows})

    def used(dataset: str, pair: str, cond: str) -> bool:
        return any(r["dataset"] == dataset and r["pair"] == pair and r["condition"] == cond for r in students)

    def table(dataset: str, axis: str, fixed: str, columns: list[str]) -> Table:
        cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
        teacher: dict[str, list[dict[str, Any]]] = {}
        for col in columns:
            pname, cond = (col, fixed) if axis == "pairs" else (fixed, col)
            for r in students:
                if r["dataset"] == dataset and r["condition"] == cond and in_pair(r, pname, pairs[pname]):
                    cells.setdefault((r["method"], col), []).append(r)
            teacher[col] = [
                t
                for t in teachers
                if t["dataset"] == dataset and t["condition"] == cond and in_pair(t, pname, pairs[pname])
            ]
        present = [m for m in methods if any((m, c) in cells for c in columns)]
        # a pairs table compares pairs: a method run on one of its pairs only is in that pair's conditions table
        single = [
            m for m in present if axis == "pairs" and len(columns) > 1 and sum((m, c) in cells for c in columns) == 1
        ]
        shown = [m for m in present if m not in single]
        return Table(dataset, axis, fixed, columns, shown, cells, teacher, n_seeds, single, dict(meta.get("controls", {})))

    tables = []
    for dataset in datasets:
        mine = []
        for cond in conditions:
            cols = [p for p in pairs if used(dataset, p, cond)]
            if len(cols) >= 2:
                mine.append(table(dataset, "pairs", cond, cols))
        for p in pairs:
            cols = [c for c in conditions if used(dataset, p, c)]
            if len(cols) >= 2:
                mine.append(table(dataset, "conditions", p, cols))
        if not mine:
            for cond in conditions:
                cols = [p for p in pairs if used(dataset, p, cond)]
                if cols:
                    mine.append(table(dataset, "pairs", cond, cols))
        tables += mine
    return tables


def beyond_spread(diff: float, a: "Cell", b: "Cell") -> bool:
    """Whether a difference of means exceeds twice its standard error over the seeds (Welch: √(s_a²/n_a + s_b²/n_b));
    with fewer than two seeds on either side there is no spread to compare with, and the answer is no."""
    if a.std is None or b.std is None or a.n < 2 or b.n < 2:
        return False
    return abs(diff) > 2 * math.sqrt(a.std**2 / a.n + b.std**2 / b.n)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _values(rows: list[dict[str, Any]], metric: str) -> list[float]:
    scale = 100.0 if metric in ("agreement", "ece") else 1.0
    return [r[metric] * scale for r in rows if r.get(metric) is not None]


@dataclass
class Cell:
    mean: float
    std: float | None
    n: int
    gains: list[tuple[str, float, bool]]  # (baseline label, mean − the baseline's mean, beyond the seed spread?)
    bold: bool = False


def cells_of(t: Table, metric: str) -> dict[tuple[str, str], Cell]:
    """The table's cells for one metric, with gains (top-1 only) and the bold best per column."""
    out: dict[tuple[str, str], Cell] = {}
    for (method, col), rows in t.cells.items():
        values = _values(rows, metric)
        if values:
            m, s = mean_std(values)
            out[(method, col)] = Cell(m, s, len(values), [])
    better = max if METRICS[metric][1] == "max" else min
    for col in t.columns:
        if metric in GAIN_METRICS:
            for method in t.methods:
                cell = out.get((method, col))
                if cell is None:
                    continue
                bases = [BASELINE, KD] + ([t.controls[method]] if t.controls.get(method) not in (None, BASELINE, KD) else [])
                for base in bases:
                    ref = out.get((base, col))
                    if ref is not None and method != base and not (base == KD and method == BASELINE):
                        diff = cell.mean - ref.mean
                        cell.gains.append((base, diff, beyond_spread(diff, cell, ref)))
        column = [out[(m, col)] for m in t.methods if (m, col) in out]
        if column:
            best = round(better(c.mean for c in column), 2)
            for c in column:
                c.bold = round(c.mean, 2) == best
    return out


def teacher_cell(t: Table, col: str, metric: str) -> Cell | None:
    values = _values(t.teacher.get(col, []), metric)
    if not values:
        return None
    m, s = mean_std(values)
    return Cell(m, s, len(values), [])
