"""The numbers behind docs/studies/cpu-study/README.md's claims table, read from the study's store.

    python scripts/cpu_study_claims.py [docs/studies/cpu-study/results.sqlite]

Md2-S robustness rows: the convnet_s student (with the Md2 teacher, or alone). A difference of means is
"beyond the spread" (marked **) when it exceeds twice its standard error (Welch: sqrt(s1²/n1 + s2²/n2)).
`sel` is the test top-1 at the epoch of best validation top-1; `last` the last epoch's.
"""
from __future__ import annotations

import math
import sqlite3
import statistics
import sys
from collections import defaultdict

CONDITIONS = ["clean", "sym20", "sym40", "sym60", "pf20", "pf40", "exp10", "exp100", "step10"]


def load(path: str) -> dict:
    db = sqlite3.connect(path)
    rows = db.execute(
        "select dataset, condition, method, selected_top1, last_top1 from runs where role='student' and status='done' "
        "and student_arch='convnet_s' and (pair='Md2-S' or pair is null)"
    ).fetchall()
    out: dict = defaultdict(lambda: {"sel": [], "last": []})
    for dataset, condition, method, sel, last in rows:
        out[(dataset, condition, method)]["sel"].append(sel)
        out[(dataset, condition, method)]["last"].append(last)
    return out


def diff(a: list[float], b: list[float]) -> tuple[float, bool] | None:
    if len(a) < 2 or len(b) < 2:
        return None
    d = statistics.mean(a) - statistics.mean(b)
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return d, abs(d) > 2 * se


def cell(data: dict, dataset: str, condition: str, m1: str, m2: str) -> str:
    parts = []
    for key in ("sel", "last"):
        r = diff(data[(dataset, condition, m1)][key], data[(dataset, condition, m2)][key])
        parts.append("n/a" if r is None else (f"**{r[0]:+.2f}**" if r[1] else f"{r[0]:+.2f}"))
    n = (len(data[(dataset, condition, m1)]["sel"]), len(data[(dataset, condition, m2)]["sel"]))
    return " / ".join(parts) + f" (n={n[0]},{n[1]})"


def main() -> int:
    data = load(sys.argv[1] if len(sys.argv) > 1 else "docs/studies/cpu-study/results.sqlite")
    datasets = sorted({k[0] for k in data})
    for dataset in datasets:
        print(f"## {dataset}")
        for m1, m2 in [("kd", "ce"), ("kd", "ce@0.1"), ("slkd", "kd"), ("slkd", "ce")]:
            print(f"{m1} - {m2} (sel / last):")
            for c in CONDITIONS:
                if data[(dataset, c, m1)]["sel"] and data[(dataset, c, m2)]["sel"]:
                    print(f"  {c:<7} {cell(data, dataset, c, m1, m2)}")
        methods = sorted({k[2] for k in data if k[0] == dataset} - {"ce", "ce@0.1"})
        print("method vs ce (sel): gains beyond the spread / within / losses beyond, over the conditions run")
        for m in methods:
            counts, n = [0, 0, 0], 0
            for c in CONDITIONS:
                r = diff(data[(dataset, c, m)]["sel"], data[(dataset, c, "ce")]["sel"])
                if r is None:
                    continue
                n += 1
                counts[0 if r[1] and r[0] > 0 else 2 if r[1] else 1] += 1
            print(f"  {m:<8} {counts[0]}/{counts[1]}/{counts[2]}  ({n} conditions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
