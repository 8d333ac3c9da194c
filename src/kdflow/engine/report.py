"""The end-of-run summary: one row per trained node, from the metrics alone."""
from __future__ import annotations

from kdflow.flow.spec import Recipe, WeightSchedule


def _weight(w: float | WeightSchedule) -> str:
    return f"{w:g}" if not isinstance(w, WeightSchedule) else f"{w.value:g}*"


def objective(recipe: Recipe, node: str) -> str:
    """A node's loss in words, e.g. '0.1·ce + 0.9·kd(teacher.logits)'."""
    parts = []
    if node in recipe.supervise:
        sup = recipe.supervise[node]
        parts.append(f"{_weight(sup.weight)}·{sup.loss}")
    for t in recipe.transfers:
        if t.target_node == node:
            parts.append(f"{_weight(t.weight)}·{t.criterion}({'+'.join(t.sources)})")
    return " + ".join(parts) or "-"


def summarize(recipe: Recipe, records: list[dict], params: dict[str, int]) -> list[dict]:
    """Per trained node and stage: the last epoch's test top-1/top-5; with a validation split, the test
    top-1 of the epoch with the best validation top-1 (`selected_top1`, the first such epoch); and, only
    for comparison with papers that selected on the test set, the best test top-1 over the epochs
    (`test_best_top1`, a legacy column)."""
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
                "selected_top1": None,
                "selected_epoch": None,
                "selected_val_top1": None,
                "test_best_top1": r["test_top1"],
                "test_best_epoch": r["epoch"],
            },
        )
        if "val_top1" in r and (row["selected_val_top1"] is None or r["val_top1"] > row["selected_val_top1"]):
            row.update(selected_top1=r["test_top1"], selected_epoch=r["epoch"], selected_val_top1=r["val_top1"])
        if r["test_top1"] > row["test_best_top1"]:
            row["test_best_top1"], row["test_best_epoch"] = r["test_top1"], r["epoch"]
        row.update(last_top1=r["test_top1"], last_top5=r["test_top5"], epochs=r["epoch"])
    return list(rows.values())


def summary_table(rows: list[dict]) -> str:
    """The run's table: test top-1 at the validation-selected epoch (when there is a validation split) and at
    the last epoch; the test-set best is labelled as the legacy selection it is."""
    header = ["node", "arch", "params", "trained with", "top-1 (val-selected)", "last top-1", "last top-5",
              "test-best top-1 (legacy)", "epochs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        selected = "-" if r["selected_top1"] is None else f"{r['selected_top1']:.2f} (ep {r['selected_epoch']})"
        cells = [
            r["node"],
            r["arch"],
            f"{r['params']:,}",
            r["objective"],
            selected,
            f"{r['last_top1']:.2f}",
            f"{r['last_top5']:.2f}",
            f"{r['test_best_top1']:.2f} (ep {r['test_best_epoch']})",
            str(r["epochs"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
