"""`kdflow report STUDY_DIR`: report.md, report.tex and PNG plots in STUDY_DIR/report/, from the store alone.

The store (results.sqlite) holds every run's row, its per-epoch curve and the study's design, so
the report can be regenerated at any time, also while a study is running (it shows what is done).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kdflow.study.store import Store
from kdflow.study.tables import METRICS, Cell, Table, build_tables, cells_of, pairs_of, teacher_cell

TOP1 = ("selected_top1", "last_top1")


# Markdown


def _md_cell(c: Cell | None, seeds: int) -> str:
    if c is None:
        return "–"
    core = f"{c.mean:.2f} ± {c.std:.2f}" if c.std is not None else f"{c.mean:.2f}"
    text = f"**{core}**" if c.bold else core
    if c.gains:
        text += " (" + ", ".join(f"{base} {g:+.2f}{'†' if beyond else ''}" for base, g, beyond in c.gains) + ")"
    return text + (f" [n={c.n}]" if c.n < seeds else "")


def markdown_table(t: Table, metric: str) -> str:
    """One table for one metric, as Markdown: a teacher row, then one row per method."""
    cells = cells_of(t, metric)
    lines = ["| method | " + " | ".join(t.columns) + " |", "|---|" + "---|" * len(t.columns)]
    if any(t.teacher.get(c) for c in t.columns) and metric != "agreement":
        tcells = [teacher_cell(t, c, metric) for c in t.columns]
        lines.append("| teacher | " + " | ".join(_md_cell(c, t.seeds) for c in tcells) + " |")
    for m in [m for m in t.methods if any((m, c) in cells for c in t.columns)]:
        lines.append(f"| {m} | " + " | ".join(_md_cell(cells.get((m, c)), t.seeds) for c in t.columns) + " |")
    return "\n".join(lines)


def _has(t: Table, metric: str) -> bool:
    return any(r.get(metric) is not None for rows in t.cells.values() for r in rows)


def metric_caption(metric: str, seeds: int) -> str:
    what, better = METRICS[metric]
    text = f"{what[0].upper() + what[1:]}, " + (f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed")
    if metric in TOP1:
        text += ("; in brackets the gain over the student alone (ce), over kd, and over the method's control (a run that "
                 "differs from it in the label weight only) where the study names one, in the same column; † marks a "
                 "difference beyond the seed spread (more than twice its standard error over the seeds), the others "
                 "are within it")
    return text + f"; {'highest' if better == 'max' else 'lowest'} per column in bold."


def _fmt_model(ref: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={v}" for k, v in ref.get("args", {}).items())
    return f"{ref['arch']}({args})"


def _design(meta: dict[str, Any]) -> list[str]:
    lines = []
    for b in meta.get("blocks", []):
        axes = " × ".join(
            f"{a} [{', '.join(map(str, b[a]))}]" for a in ("datasets", "pairs", "methods", "conditions", "seeds")
        )
        lines.append(f"- block **{b['name']}** ({b['runs']} runs): {axes}")
    for p in meta.get("pairs", []):
        lines.append(f"- pair `{p['name']}`: teacher {_fmt_model(p['teacher'])} → student {_fmt_model(p['student'])}")
    for c in meta.get("conditions", []):
        parts = [f"{k} {json.dumps(v)}" for k, v in c.items() if k != "name" and v]
        lines.append(f"- condition `{c['name']}`: {', '.join(parts) or 'clean training labels, balanced classes'}")
    return lines


def _params_line(t: Table, pairs: dict[str, dict[str, Any]]) -> str:
    names = t.columns if t.axis == "pairs" else [t.fixed]
    parts = []
    for name in names:
        tp, sp = pairs[name]["datasets"].get(t.dataset, (None, None))
        if tp and sp:
            parts.append(f"`{name}` teacher {tp:,} / student {sp:,} parameters ({tp / sp:.1f}×)")
    return "Parameters: " + "; ".join(parts) + "." if parts else ""


def render_markdown(rows: list[dict[str, Any]], meta: dict[str, Any], plots: dict[str, list[tuple[str, str]]]) -> str:
    tables = build_tables(rows, meta)
    pairs = pairs_of(rows, meta)
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    out = [f"# Study: {meta.get('name', 'study')}", ""]
    if meta.get("description"):
        out += [meta["description"].strip(), ""]
    out += [
        f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} from `results.sqlite`: "
        f"{sum(r['role'] == 'student' for r in done)} student runs and {sum(r['role'] == 'teacher' for r in done)} "
        f"teacher runs done, {len(failed)} failed"
        + (f" (the study has {meta['runs']} student runs and {meta['teachers']} teachers)." if "runs" in meta else "."),
        "",
        "## Design: what was crossed with what",
        "",
        *_design(meta),
        "",
        (
            "Teachers are trained once per (dataset, teacher architecture, condition, seed), on the same corrupted "
            "training split as their students; the test split is always clean and balanced. The student alone (`ce`) "
            "does not depend on the teacher: one run serves every pair with its student."
        ),
        "",
    ]
    for dataset in dict.fromkeys(t.dataset for t in tables):
        out += [f"## {dataset}", ""]
        for t in [t for t in tables if t.dataset == dataset]:
            out += [f"### {t.title}", ""]
            params = _params_line(t, pairs)
            if params:
                out += [params, ""]
            for metric in METRICS:
                if not _has(t, metric):  # agreement without teachers, val-selected top-1 without validation
                    continue
                out += [metric_caption(metric, t.seeds), "", markdown_table(t, metric), ""]
            if t.omitted:
                out += [
                    f"Run on one of these pairs only, so in its methods × conditions table: {', '.join(t.omitted)}.",
                    "",
                ]
        if plots.get(dataset):
            out += [f"### {dataset}: plots", ""]
            out += [f"![{title}]({name})\n\n*{title}*\n" for title, name in plots[dataset]]
    if failed:
        out += [
            "## Failed runs",
            "",
            "| run | dataset | pair | method | condition | seed | error |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in failed:
            err = (r.get("error") or "").replace("|", "\\|").replace("\n", " ")
            cells = [r["hash"], r["dataset"], r["pair"] or "–", r["method"], r["condition"], r["seed"], err]
            out.append("| " + " | ".join(map(str, cells)) + " |")
        out.append("")
    return "\n".join(out)


# LaTeX


def _tex(s: Any) -> str:
    text = str(s)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("$", r"\$")):
        text = text.replace(a, b)
    return (
        text.replace("±", r"$\pm$")
        .replace("→", r"$\rightarrow$")
        .replace("×", r"$\times$")
        .replace("–", "--")
        .replace("·", r"$\cdot$")
    )


def _tex_cell(c: Cell | None, seeds: int) -> str:
    if c is None:
        return "--"
    core = f"{c.mean:.2f} $\\pm$ {c.std:.2f}" if c.std is not None else f"{c.mean:.2f}"
    text = f"\\textbf{{{core}}}" if c.bold else core
    if c.gains:
        dagger = "$^\\dagger$"
        text += " {\\scriptsize(" + ", ".join(f"{_tex(base)} {g:+.2f}{dagger if beyond else ''}" for base, g, beyond in c.gains) + ")}"
    return text + (f"$^{{n={c.n}}}$" if c.n < seeds else "")


def latex_table(t: Table, metric: str) -> str:
    cells = cells_of(t, metric)
    lines = [
        r"\begin{table}[t]",
        r"\centering\small",
        f"\\caption{{{_tex(t.title)}. {_tex(metric_caption(metric, t.seeds))}}}",
        r"\begin{tabular}{l" + "c" * len(t.columns) + "}",
        r"\toprule",
        "Method & " + " & ".join(_tex(c) for c in t.columns) + r" \\",
        r"\midrule",
    ]
    if any(t.teacher.get(c) for c in t.columns) and metric != "agreement":
        lines += [
            "Teacher & " + " & ".join(_tex_cell(teacher_cell(t, c, metric), t.seeds) for c in t.columns) + r" \\",
            r"\midrule",
        ]
    for m in [m for m in t.methods if any((m, c) in cells for c in t.columns)]:
        lines.append(f"{_tex(m)} & " + " & ".join(_tex_cell(cells.get((m, c)), t.seeds) for c in t.columns) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def render_latex(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Every table (top-1 validation-selected, last and legacy test-best, agreement, ECE) as booktabs tables, ready to \\input."""
    out = [
        f"% kdflow study {meta.get('name', '')}: tables generated from results.sqlite; needs \\usepackage{{booktabs}}",
        "",
    ]
    for t in build_tables(rows, meta):
        for metric in METRICS:
            if not _has(t, metric):
                continue
            out += [latex_table(t, metric), ""]
    return "\n".join(out)


def write_report(study_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write report.md, report.tex and the plots into `out` (default STUDY_DIR/report); returns `out`."""
    from kdflow.study.plots import make_plots

    store = Store(Path(study_dir) / "results.sqlite")
    rows, meta, curves = store.rows(), store.meta(), store.curves()
    out = Path(out) if out else Path(study_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(rows, meta, curves, out)
    (out / "report.md").write_text(render_markdown(rows, meta, plots))
    (out / "report.tex").write_text(render_latex(rows, meta))
    return out
