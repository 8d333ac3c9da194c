"""Measure kdflow's parity with the reference code and print it as a markdown table.

    python bench/parity_table.py                 # every method (about 5 minutes on a 2-core CPU)
    python bench/parity_table.py --methods kd,dkd
    python bench/parity_table.py --cases         # also every case's raw numbers

Each benchmark method is built as the parity tests build it (tests/parity_harness.py: protocol + pair +
recipes/methods/METHOD.yaml, fixed weights and batch, float64, with the tests' per-method overrides and epochs)
and its total training loss and student-gradient norm are compared with the reference values in
tests/fixtures/parity/METHOD.json. A cell gives the relative differences |kdflow − ref| / |ref| of loss and
gradient norm, the larger over the cases the fixture records for that pair (stages, warm-up epochs).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from parity_harness import (build_flow, class_contrast, fixed_batch, loss_and_grad_norm, read_fixture, rel,  # noqa: E402
                            split_labels)

PAIRS = ["resnet32x4-resnet8x4", "vgg13-MobileNetV2"]
# (row label, fixture) in the order of the benchmark tables
ROWS = [("KD", "kd"), ("FitNet", "fitnet"), ("AT", "at"), ("SP", "sp"), ("CC", "cc"), ("VID", "vid"),
        ("RKD", "rkd"), ("PKT", "pkt"), ("AB", "ab"), ("FT", "ft"), ("FSP", "fsp"), ("NST", "nst"),
        ("CRD", "crd"), ("OFD", "ofd"), ("ReviewKD", "reviewkd"), ("DKD", "dkd"), ("DIST", "dist"),
        ("KD+LS", "kd+ls"), ("DKD+LS", "dkd+ls"), ("NKD", "nkd"), ("WTTM", "wttm"), ("CTKD", "ctkd"), ("CAT-KD", "catkd"), ("DOT", "dot")]
FEATURES = {"fitnet", "vid", "ab", "ft", "fsp", "ofd"}  # tests/test_parity_features.py: per-stage values


def cases(name: str, pair: str, tmp: Path) -> list[tuple[str, float, float, float, float]]:
    """(case, loss, ref loss, grad norm, ref grad norm) for every case the tests check on `pair`."""
    fx = read_fixture("crd" if name.startswith("crd") else name)
    inputs, values = fx["inputs"], fx["values"]
    out = []
    if name in FEATURES:  # tests/test_parity_features.py
        batch = fixed_batch(inputs["batch_size"], inputs["seed"])
        flow = build_flow(name, pair, tmp, inputs["overrides"], batch=batch)
        for stage, want in values[pair].items():
            loss, norm, _ = loss_and_grad_norm(flow, batch, stage, inputs["epoch"])
            out.append((f"stage {stage}", loss, want["loss"], norm, want["grad_norm"]))
        return out
    if name in ("crd", "crd+kd", "crd-relax"):  # tests/test_parity_crd_reviewkd.py
        crd = read_fixture("crd")
        method, overrides, want = "crd", [], crd["values"].get(pair)
        if name == "crd+kd":
            method, want = "crd+kd", crd["variants"]["crd+kd"]["values"].get(pair)
        elif name == "crd-relax":
            overrides, want = ["method.mode=relax"], crd["variants"]["relax"]["values"].get(pair)
        if want is None:
            return []
        batch = fixed_batch(crd["inputs"]["batch_size"], crd["inputs"]["seed"], crd["inputs"]["num_data"])
        labels = split_labels(batch)
        flow = build_flow(method, pair, tmp, overrides, batch=batch, train_labels=labels)
        mode = "relax" if name == "crd-relax" else "exact"
        flow.criterion_modules["0"].crd.use_contrast(
            class_contrast(labels, batch.index, crd["inputs"]["nce_k"], mode, crd["inputs"]["contrast_seed"]))
        loss, norm, _ = loss_and_grad_norm(flow, batch)
        return [("one step", loss, want["loss"], norm, want["grad_norm"])]
    if name == "dot":  # tests/test_parity_dot.py: three optimizer steps; the second number is the displacement
        import math

        import torch

        from kdflow.engine.dot import backward_and_step, split_loss, supervised_labels
        from kdflow.engine.train import make_optimizers

        want = values[pair]
        flow = build_flow("dot", pair, tmp, seed=want["model_seed"])
        stage = flow.stages[-1]
        flow.set_stage_modes(stage)
        optimizers, labels = make_optimizers(flow, flow.recipe, stage), supervised_labels(flow.recipe, stage)
        student = flow.models["student"]
        start = {n: p.detach().clone() for n, p in student.named_parameters()}
        for k, step in zip(want["batch_seeds"], want["steps"]):
            b = fixed_batch(want["batch_size"], k)
            res = flow(b.x, b.y, stage, 0, b.index)
            loss = sum(t.item() for t in split_loss(res, labels))
            backward_and_step(res, labels, optimizers)
            with torch.no_grad():
                moved = math.sqrt(sum(float((p - start[n]).norm()) ** 2 for n, p in student.named_parameters()))
            ref_moved = math.sqrt(sum(v ** 2 for v in step["displacement_norm"].values()))
            out.append((f"step {k + 1}", loss, step["loss_ce"] + step["loss_kd"], moved, ref_moved))
        return out
    batch = fixed_batch(inputs["batch_size"], inputs["seed"])
    if name == "catkd":  # tests/test_parity_catkd.py: the student's classifier bias is 0 and left out of the norm
        from test_parity_catkd import loss_and_grad_norm as catkd_step
        loss, norm, _ = catkd_step(pair, tmp)
        want = values[pair]
        return [(f"epoch {inputs['epoch']}", loss, want["loss"], norm, want["grad_norm"])]
    if name == "reviewkd":
        todo = [(f"epoch {inputs['epoch']}", inputs["epoch"], values[pair])]
        todo += [(f"epoch {v['epoch']}", v["epoch"], v["values"][pair]) for v in fx["variants"].values() if pair in v["values"]]
        flow = build_flow(name, pair, tmp, inputs["overrides"], batch=batch)
        for case, epoch, want in todo:
            loss, norm, _ = loss_and_grad_norm(flow, batch, epoch=epoch)
            out.append((case, loss, want["loss"], norm, want["grad_norm"]))
        return out
    # tests/test_parity_logits_relations.py
    overrides, todo = inputs["overrides"], [(f"epoch {inputs['epoch']}", inputs["epoch"], values[pair])]
    if name == "dkd":  # per-pair beta; after and inside the warm-up
        overrides = overrides[pair]
        todo.append((f"epoch {values[pair]['warmup']['epoch']}", values[pair]["warmup"]["epoch"], values[pair]["warmup"]))
    elif name == "rkd":  # weights that undo the documented means over distinct pairs / triplets
        b = inputs["batch_size"]
        overrides = [f"method.distance_weight={25.0 * (b - 1) / b!r}", f"method.angle_weight={50.0 * (b - 1) * (b - 2) / b**2!r}"]
    elif isinstance(overrides, dict):  # per-pair overrides (dkd+ls: DKD's beta)
        overrides = overrides[pair]
    elif name == "pkt":  # weight that undoes the documented batchmean
        overrides = [f"method.weight={30000.0 / inputs['batch_size']!r}"]
    if name in ("rkd", "pkt"):
        todo = [(f"{case}, {'w_d·(B−1)/B, w_a·(B−1)(B−2)/B²' if name == 'rkd' else 'β=30000/B'}", e, w) for case, e, w in todo]
    flow = build_flow(name, pair, tmp, overrides, batch=batch)
    for case, epoch, want in todo:
        loss, norm, _ = loss_and_grad_norm(flow, batch, inputs["stage"], epoch)
        out.append((case, loss, want["loss"], norm, want["grad_norm"]))
    return out


def fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.0e}".replace("e-0", "e-")


def cell(rows: list) -> str:
    if not rows:
        return "–"
    dl = max(rel(r[1], r[2]) for r in rows)
    dg = max(0.0 if r[4] == 0.0 and r[3] == 0.0 else rel(r[3], r[4]) for r in rows)
    return f"{fmt(dl)} / {fmt(dg)}"


def reference(name: str) -> str:
    r = read_fixture(name)["reference"]
    repo = r["repository"].split(" ")[0]
    return f"{repo}@{r['commit'][:7]}: {r['file']}; {r['function']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="", help="comma-separated fixture names, plus crd-relax and crd+kd (default: all)")
    ap.add_argument("--cases", action="store_true", help="also print every case's raw numbers")
    args = ap.parse_args()
    wanted = set(args.methods.split(",")) if args.methods else None
    rows = ROWS + [("CRD (mode: relax)", "crd-relax"), ("CRD+KD", "crd+kd"), ("Tf-KD reg (form: released)", "tfkd_reg")]
    print(f"| method | reference (repository@commit: file; function) | checked | {PAIRS[0]} | {PAIRS[1]} |")
    print("|---|---|---|---|---|")
    details = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, name in rows:
            if wanted and name not in wanted:
                continue
            fixture = "crd" if name.startswith("crd") else name
            pairs = list(read_fixture(fixture)["values"]) if fixture == "ofd" else PAIRS
            cells, checked = [], []
            for pair in pairs:
                got = cases(name, pair, Path(tmp)) if pair in read_fixture(fixture)["values"] else []
                details += [(label, pair, *g) for g in got]
                c = cell(got)
                if checked and got and [g[0] for g in got] != checked:
                    c += f" ({', '.join(g[0] for g in got)} only)"
                checked = checked or [g[0] for g in got]
                cells.append(c if pair in PAIRS else f"{c} ({pair})")
            if fixture == "fsp":
                cells[1] = "refused at build, as the reference raises"
            print(f"| {label} | {reference(fixture)} | {', '.join(checked)} | {cells[0]} | {cells[1]} |", flush=True)
    if args.cases:
        print("\n| method | pair | case | loss | reference loss | grad norm | reference grad norm |\n|---|---|---|---|---|---|---|")
        for label, pair, case, loss, rloss, norm, rnorm in details:
            print(f"| {label} | {pair} | {case} | {loss:.12g} | {rloss:.12g} | {norm:.12g} | {rnorm:.12g} |")


if __name__ == "__main__":
    main()
