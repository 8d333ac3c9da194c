"""The report's plots (matplotlib, Agg): accuracy against noise rate and imbalance ratio per method,
student accuracy against teacher size (capacity gap), and training curves; all from the store.

Sweeps and the capacity plot have two panels, validation-selected and last-epoch top-1 (mean over seeds,
error bars one sample standard deviation). Colours are fixed per method across every plot.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kdflow.study.tables import _order, in_pair, mean_std, pairs_of  # noqa: E402

Plots = dict[str, list[tuple[str, str]]]  # dataset -> [(title, file name)]
PANELS = (("selected_top1", "top-1 at the validation-selected epoch (%)"), ("last_top1", "last-epoch top-1 (%)"))



@dataclass(frozen=True)
class Sweep:
    """One kind of accuracy-against-corruption plot: noise rate or imbalance ratio on the x axis."""

    what: str  # "noise" or "imbalance": rows carry WHAT_kind
    other: str  # the other corruption's kind column, which must be empty in the rows plotted
    value: str  # the column swept
    title: str
    xlabel: str
    x: Callable[[dict], float]
    log_x: bool = False


SWEEPS = (
    Sweep("noise", "imbalance_kind", "noise_rate", "label-noise rate", "{kind} noise rate (%)", lambda r: 100 * r["noise_rate"]),
    Sweep("imbalance", "noise_kind", "imbalance_ratio", "imbalance ratio ρ (1 = balanced)", "imbalance ratio ρ",
          lambda r: r["imbalance_ratio"], log_x=True),
)

def _slug(*parts: Any) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", str(p)).strip("_") for p in parts)


def _colors(methods: list[str]) -> dict[str, Any]:
    tab10 = plt.get_cmap("tab10")
    palette = [tab10(i) for i in range(10) if i != 7] + [
        "#000080",
        "#b8860b",
        "#00ced1",
        "#ff1493",
    ]  # grey: the teacher's
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def _series(rows: list[dict[str, Any]], x_of, metric: str) -> tuple[list[float], list[float], list[float]]:
    groups: dict[float, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(metric) is not None:
            groups[x_of(r)].append(r[metric])
    xs = sorted(groups)
    stats = [mean_std(groups[x]) for x in xs]
    return xs, [m for m, _ in stats], [s or 0.0 for _, s in stats]


def _sweep(path: Path, title: str, xlabel: str, students, teachers, methods, colors, x_of, log_x: bool = False) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    span = max((x_of(r) for r in students), default=1) - min((x_of(r) for r in students), default=0) or 1
    for ax, (metric, label) in zip(axes, PANELS):
        for i, m in enumerate(methods):
            xs, ys, es = _series([r for r in students if r["method"] == m], x_of, metric)
            shift = (i - (len(methods) - 1) / 2) * 0.006  # dodge the error bars apart
            xs = [x * (1 + shift) if log_x else x + shift * span for x in xs]
            if xs:
                ax.errorbar(
                    xs,
                    ys,
                    yerr=es,
                    marker="o",
                    ms=4,
                    capsize=2,
                    label=m,
                    color=colors[m],
                    lw=2 if m in ("ce", "kd") else 1.2,
                )
        xs, ys, es = _series(teachers, x_of, metric)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="s", ms=4, capsize=2, ls="--", color="0.4", label="teacher")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if log_x:
            ax.set_xscale("log")
    axes[1].legend(fontsize=7, ncol=2, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _capacity(
    path: Path, title: str, pnames: list[str], params: dict[str, int], students, teachers, methods, colors, pairs
) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    xs = [params[p] for p in pnames]
    # the methods compared across the ladder: the student alone, and those run with two or more of its teachers
    methods = [m for m in methods if m == "ce" or len({r["pair"] for r in students if r["method"] == m}) >= 2]
    for ax, (metric, label) in zip(axes, PANELS):
        for m in methods:
            if m == "ce":
                vals = [r[metric] for r in students if r["method"] == "ce" and r.get(metric) is not None]
                if vals:
                    mu, sd = mean_std(vals)
                    ax.axhline(mu, color=colors[m], lw=2, label="ce (student alone)")
                    ax.axhspan(mu - (sd or 0), mu + (sd or 0), color=colors[m], alpha=0.15)
                continue
            values = {
                p: [r[metric] for r in students if r["method"] == m and r["pair"] == p and r.get(metric) is not None]
                for p in pnames
            }
            pts = [(params[p], mean_std(v)) for p, v in values.items() if v]
            if pts:
                ax.errorbar(
                    [x for x, _ in pts],
                    [ms[0] for _, ms in pts],
                    yerr=[ms[1] or 0 for _, ms in pts],
                    marker="o",
                    ms=4,
                    capsize=2,
                    label=m,
                    color=colors[m],
                )
        tpts = []
        for p in pnames:
            vals = [t[metric] for t in teachers if in_pair(t, p, pairs[p]) and t.get(metric) is not None]
            if vals:
                tpts.append((params[p], mean_std(vals)[0]))
        if tpts:
            ax.plot([x for x, _ in tpts], [y for _, y in tpts], "s--", color="0.4", label="teacher")
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{p}\n{params[p] / 1000:.0f}k" for p in pnames], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("teacher parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves(path: Path, title: str, students, teachers, methods, colors, curves_by_hash) -> bool:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = False
    for m in methods:
        per_step: dict[int, list[float]] = defaultdict(list)
        for r in students:
            if r["method"] == m:
                for c in curves_by_hash.get(r["hash"], []):
                    if c["test_top1"] is not None:
                        per_step[c["step"]].append(c["test_top1"])
        if per_step:
            steps = sorted(per_step)
            ys = [mean_std(per_step[s])[0] for s in steps]
            ax.plot(steps, ys, marker=".", label=m, color=colors[m], lw=2 if m in ("ce", "kd") else 1.2)
            drawn = True
    per_step = defaultdict(list)
    for t in teachers:
        for c in curves_by_hash.get(t["hash"], []):
            if c["test_top1"] is not None:
                per_step[c["step"]].append(c["test_top1"])
    if per_step:
        steps = sorted(per_step)
        ax.plot(steps, [mean_std(per_step[s])[0] for s in steps], "--", marker=".", color="0.4", label="teacher")
    ax.set_xlabel("epoch (across stages: FSP's and AB's init stage first)")
    ax.set_ylabel("test top-1 (%), mean over seeds")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    if drawn:
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def make_plots(rows: list[dict[str, Any]], meta: dict[str, Any], curves: list[dict[str, Any]], out: Path) -> Plots:
    """Write every plot into `out`; returns, per dataset, (title, file name) in report order."""
    done = [r for r in rows if r["status"] == "done"]
    students = [r for r in done if r["role"] == "student"]
    teachers = [r for r in done if r["role"] == "teacher"]
    pairs = pairs_of(done, meta)
    methods = _order(meta.get("methods", []), [r["method"] for r in students])
    colors = _colors(methods)
    conditions = _order([c["name"] for c in meta.get("conditions", [])], [r["condition"] for r in done])
    curves_by_hash: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in curves:
        curves_by_hash[c["hash"]].append(c)
    plots: Plots = defaultdict(list)

    def emit(dataset: str, title: str, name: str) -> None:
        plots[dataset].append((title, name))

    for dataset in _order(meta.get("datasets", []), [r["dataset"] for r in done]):
        ds_students = [r for r in students if r["dataset"] == dataset]
        ds_teachers = [t for t in teachers if t["dataset"] == dataset]
        for pname, p in pairs.items():
            ps = [r for r in ds_students if in_pair(r, pname, p)]
            pt = [t for t in ds_teachers if in_pair(t, pname, p)]
            if not any(r["pair"] == pname for r in ps):
                continue
            for sweep in SWEEPS:
                axis, other = f"{sweep.what}_kind", sweep.other
                for kind in sorted({r[axis] for r in ps if r[axis] and not r[other]}):
                    sel = [r for r in ps if not r[other] and r[axis] in (None, kind)]
                    tsel = [t for t in pt if not t[other] and t[axis] in (None, kind)]
                    if len({r[sweep.value] for r in sel if r["pair"] == pname}) >= 2:
                        name = _slug(sweep.what, kind, dataset, pname) + ".png"
                        title = f"{dataset}, pair {pname}: top-1 against {kind} {sweep.title}"
                        _sweep(out / name, title, sweep.xlabel.format(kind=kind), sel, tsel, methods, colors,
                               sweep.x, log_x=sweep.log_x)
                        emit(dataset, title, name)
        for cond in conditions:
            by_student: dict[str, list[str]] = defaultdict(list)
            for pname, p in pairs.items():
                if any(r["pair"] == pname and r["condition"] == cond for r in ds_students):
                    by_student[p["student_key"]].append(pname)
            for skey, pnames in by_student.items():
                params = {pn: pairs[pn]["datasets"].get(dataset, (None, None))[0] for pn in pnames}
                if len(pnames) < 2 or any(not v for v in params.values()) or len(set(params.values())) < len(pnames):
                    continue
                pnames = sorted(pnames, key=lambda pn: params[pn])
                sel = [
                    r
                    for r in ds_students
                    if r["condition"] == cond
                    and (r["pair"] in pnames or (r["pair"] is None and r["student_key"] == skey))
                ]
                tsel = [t for t in ds_teachers if t["condition"] == cond]
                name = _slug("capacity", dataset, cond, *pnames) + ".png"
                title = f"{dataset}, {cond}: student top-1 against teacher size (pairs {', '.join(pnames)})"
                _capacity(out / name, title, pnames, params, sel, tsel, methods, colors, pairs)
                emit(dataset, title, name)
        for pname, p in pairs.items():
            for cond in conditions:
                if not any(r["pair"] == pname and r["condition"] == cond for r in ds_students):
                    continue
                sel = [r for r in ds_students if r["condition"] == cond and in_pair(r, pname, p)]
                tsel = [t for t in ds_teachers if t["condition"] == cond and in_pair(t, pname, p)]
                name = _slug("curves", dataset, pname, cond) + ".png"
                title = f"{dataset}, pair {pname}, {cond}: test top-1 per epoch"
                if _curves(out / name, title, sel, tsel, methods, colors, curves_by_hash):
                    emit(dataset, title, name)
    return dict(plots)
