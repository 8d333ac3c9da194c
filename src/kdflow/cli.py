"""The `kdflow` command: train, eval, methods, describe."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kdflow.flow.errors import RecipeError


def cmd_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from kdflow.engine import train
    from kdflow.flow import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    try:
        train(recipe, out, resume=args.resume, progress=None if not args.no_progress else False)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run directory: {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kdflow.checkpoint import read_model_file
    from kdflow.data import load_dataset
    from kdflow.data.base import DatasetError
    from kdflow.data.loader import to_device
    from kdflow.engine import evaluate
    from kdflow.engine.train import pick_device
    from kdflow.models import build_model

    try:
        ckpt = read_model_file(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise RecipeError(str(e)) from None
    if "arch" not in ckpt:
        raise RecipeError(f"{args.checkpoint}: a bare state dict; eval needs a kdflow model file (nodes/NODE.pt, best-NODE.pt)")
    data = ckpt.get("data", {})
    name = args.data or data.get("dataset")
    try:
        test = load_dataset(name, "test", args.root or data.get("root"), **data.get("options", {}))
    except DatasetError as e:
        raise RecipeError(f"data: {e}") from None
    device = pick_device(args.device)
    model = build_model(ckpt["arch"], ckpt["num_classes"], tuple(ckpt["input_shape"]), **ckpt["args"])
    model.load_state_dict(ckpt["state_dict"])
    metrics = evaluate(model.to(device), to_device(test, device))
    print(
        f"{args.checkpoint}: {ckpt['arch']} on {name} test ({len(test)} samples): "
        f"top-1 {metrics['test_top1']:.2f}  top-5 {metrics['test_top5']:.2f}  loss {metrics['test_loss']:.4f}"
    )
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from kdflow.methods import METHODS

    width = max(len(n) for n in METHODS)
    for name, m in sorted(METHODS.items()):
        print(f"{name:<{width}}  {m.knowledge:<9}  {m.citation}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from kdflow.flow.describe import describe_markdown, describe_mermaid, describe_text
    from kdflow.methods import METHODS, method_graph

    if args.method == "all":
        print(describe_markdown(METHODS))
        return 0
    graph = method_graph(args.method)
    m = METHODS[args.method]
    if args.mermaid:
        print(describe_mermaid(graph))
    else:
        print(f"{m.name}: {m.citation}  [{m.knowledge}]")
        print(describe_text(graph))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdflow", description="Knowledge distillation as a flow graph.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run a recipe")
    t.add_argument("recipe", nargs="+", help="recipe YAML file(s); later files override earlier ones (pair + method)")
    t.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", nargs="+", help="override recipe fields")
    t.add_argument("--out", help="run directory (default runs/RECIPE_NAME)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (epoch summaries only)")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate a model checkpoint on its dataset's test split")
    e.add_argument("checkpoint")
    e.add_argument("--data", help="dataset name (default: the one the model was trained on)")
    e.add_argument("--root", help="dataset folder")
    e.add_argument("--device", default="auto")
    e.set_defaults(fn=cmd_eval)

    m = sub.add_parser("methods", help="list the methods")
    m.set_defaults(fn=cmd_methods)

    d = sub.add_parser("describe", help="show a method's flow graph")
    d.add_argument("method", help="a method name, or 'all' for every method as Markdown (text and Mermaid)")
    d.add_argument("--mermaid", action="store_true", help="print a Mermaid flowchart")
    d.set_defaults(fn=cmd_describe)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "set", None):
        args.set = [item for group in args.set for item in group]
    try:
        return args.fn(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
