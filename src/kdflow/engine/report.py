"""The end-of-run summary: one row per trained node, from the metrics alone."""
from __future__ import annotations

from kdflow.flow.spec import Recipe, WeightSchedule


def _weight(w: float | WeightSchedule) -> str:
    return f"{w:g}" if not isinstance(w, WeightSchedule) else f"{w.value:g}*"


def objective(recipe: Recipe, node: str) -> str:
    """A node's loss in words, e.g. '0.1·ce + 0.9·kl(teacher.logits)'."""
    parts = []
    if node in recipe.supervise:
        sup = recipe.supervise[node]
        parts.append(f"{_weight(sup.weight)}·{sup.loss}")
    for t in recipe.transfers:
        if t.target_node == node:
            parts.append(f"{_weight(t.weight)}·{t.criterion}({'+'.join(t.sources)})")
    return " + ".join(parts) or "-"


def summarize(recipe: Recipe, records: list[dict], params: dict[str, int]) -> list[dict]:
    rows: dict[tuple[int, str], dict] = {}
    for r in records:
        key = (r["stage_index"], r["node"])
        if r.get("kind") == "ensemble":
            members = recipe.ensembles[r["node"]]
            arch, n_params, how = f"ensemble({', '.join(members)})", sum(params[m] for m in members), "mean softmax"
        else:
            arch, n_params, how = recipe.nodes[r["node"]].arch, params[r["node"]], objective(recipe, r["node"])
        row = rows.setdefault(
            key,
            {
                "node": r["node"],
                "stage": r["stage"],
                "arch": arch,
                "params": n_params,
                "objective": how,
                "best_top1": r["test_top1"],
                "best_epoch": r["epoch"],
            },
        )
        if r["test_top1"] > row["best_top1"]:
            row["best_top1"], row["best_epoch"] = r["test_top1"], r["epoch"]
        row.update(last_top1=r["test_top1"], last_top5=r["test_top5"], epochs=r["epoch"])
    return list(rows.values())


def summary_table(rows: list[dict]) -> str:
    header = ["node", "arch", "params", "trained with", "best top-1", "last top-1", "last top-5", "epochs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [
            r["node"],
            r["arch"],
            f"{r['params']:,}",
            r["objective"],
            f"{r['best_top1']:.2f} (ep {r['best_epoch']})",
            f"{r['last_top1']:.2f}",
            f"{r['last_top5']:.2f}",
            str(r["epochs"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
