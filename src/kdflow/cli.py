"""The `kdflow` command: train, eval, methods, describe."""
from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from kdflow.cli_study import add_study_commands
from kdflow.flow.errors import RecipeError


def cmd_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from kdflow.engine import train
    from kdflow.methods.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    # composed recipes (protocol + pair + method) are named by their files, so each combination has its own folder
    default = recipe.name if len(args.recipe) == 1 else "+".join(Path(p).stem for p in args.recipe if Path(p).stem != "protocol")
    out = Path(args.out) if args.out else Path("runs") / default
    try:
        train(recipe, out, resume=args.resume, progress=None if not args.no_progress else False)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run directory: {out}")
    return 0


def cmd_teacher_train(args: argparse.Namespace) -> int:
    from kdflow.engine import train
    from kdflow.methods.recipe import load_recipe
    from kdflow.teachers import register_teacher, registry_path

    if args.recipe:
        files = [Path(args.recipe)]
    else:  # the data set's protocol, then its teacher file
        files = [p for p in (Path(f"recipes/{args.data}/protocol.yaml"), Path(f"recipes/{args.data}/teacher.yaml")) if p.exists()]
        if not files:
            raise RecipeError(f"no recipes/{args.data}/teacher.yaml here; run from the repository root or pass --recipe")
    # --data names the recipes folder; its protocol names the data set (recipes/imagenet -> image_folder)
    recipe = load_recipe(files, [f"nodes.teacher.arch={args.arch}", *args.set])
    key = args.key or f"{args.data}-{args.arch}" + (f"-seed{recipe.seed}" if recipe.seed else "")
    out = Path(args.out) if args.out else Path("runs") / "teachers" / key
    summary = train(recipe, out, resume=args.resume, progress=None if not args.no_progress else False)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    top1 = summary[-1]["last_top1"] if summary else None  # None: trained for 0 epochs
    entry = register_teacher(key, out / "nodes" / "teacher.pt", args.arch, args.data, out / "recipe.yaml", top1)
    shown = f"{top1:.2f}" if top1 is not None else "untrained"
    print(f"registered teacher {key!r} in {registry_path()}: top-1 {shown}, sha256 {entry['sha256'][:12]}…")
    print(f"use it in a recipe as   checkpoint: registry:{key}")
    return 0


def cmd_teacher_list(args: argparse.Namespace) -> int:
    from kdflow.teachers import read_registry, registry_path

    entries = read_registry()
    if not entries:
        print(f"no teachers registered in {registry_path()}")
    for key, e in sorted(entries.items()):
        top1 = f"{e['top1']:6.2f}" if e["top1"] is not None else "     -"
        print(f"{key:<28} {e['arch']:<14} {e['data']:<14} top-1 {top1}  sha256 {e['sha256'][:12]}  {e['checkpoint']}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from kdflow.models import MODELS, build_model, count_parameters
    from kdflow.models.flops import count_flops, stage_shapes

    shape = tuple(int(v) for v in args.input.split("x"))
    print(f"{'arch':<22} {'params':>12} {'MACs':>10}  stages at {args.input} (C×H×W after each)")
    for name in sorted(MODELS):
        try:
            model = build_model(name, args.classes, shape)
            flops = count_flops(model, shape)
            stages = stage_shapes(model, shape) if getattr(model, "tap_names", None) else {}
        except Exception as e:  # a model that does not take this input size
            print(f"{name:<22} (not for {args.input}: {type(e).__name__})")
            continue
        shown = "  ".join(f"{k} {'×'.join(map(str, v))}" for k, v in stages.items() if not k.endswith("_pre"))
        print(f"{name:<22} {count_parameters(model):>12,} {flops / 1e6:>9.1f}M  {shown}")
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
    from kdflow.flow.recipe import parse_override
    from kdflow.methods import METHODS, method_graph
    from kdflow.methods.variants import arguments, recipe_variants

    if args.method == "all":
        print(describe_markdown(METHODS))
        return 0
    if args.method not in METHODS:
        raise RecipeError(f"describe: unknown method {args.method!r}; known: {', '.join(sorted(METHODS))}")
    chosen: dict[str, Any] = {}
    for item in args.args:
        path, value = parse_override(item)
        chosen[".".join(path)] = value
    graph = method_graph(args.method, **chosen)
    if args.mermaid:
        print(describe_mermaid(graph))
        return 0
    m = METHODS[args.method]
    print(f"{m.name}: {m.citation}  [{m.knowledge}]")
    print(describe_text(graph))
    print("arguments (default; * = set here):")
    for arg, default, kind in arguments(args.method):
        shown = f"{chosen[arg]!r}  * (default {default!r})" if arg in chosen else repr(default)
        print(f"  {arg:<22} {kind:<18} {shown}")
    root = Path(args.recipes)
    variants = recipe_variants(args.method, root) if root.is_dir() else []
    if variants:
        print(f"variants in {root}/ (what each changes; `kdflow describe {args.method} KEY=VALUE ...` draws one):")
        for where, changes in variants:
            print(f"  {where}: " + ", ".join(f"{k}={v}" for k, v in changes.items()))
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

    tp = sub.add_parser("teacher", help="train and register teachers").add_subparsers(dest="teacher_command", required=True)
    tt = tp.add_parser("train", help="train a teacher with the data set's standard recipe and register it")
    tt.add_argument("arch")
    tt.add_argument("--data", required=True, help="data set name (recipes/DATA/protocol.yaml + teacher.yaml)")
    tt.add_argument("--recipe", help="teacher recipe to use instead of recipes/DATA/teacher.yaml")
    tt.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", nargs="+")
    tt.add_argument("--key", help="registry key (default DATA-ARCH)")
    tt.add_argument("--out")
    tt.add_argument("--resume", action="store_true")
    tt.add_argument("--no-progress", action="store_true")
    tt.set_defaults(fn=cmd_teacher_train)
    tl = tp.add_parser("list", help="list registered teachers")
    tl.set_defaults(fn=cmd_teacher_list)

    mo = sub.add_parser("models", help="list the model zoo: parameters, MACs and stage shapes")
    mo.add_argument("--input", default="3x32x32", help="input shape C×H×W as 3x32x32 (default)")
    mo.add_argument("--classes", type=int, default=100)
    mo.set_defaults(fn=cmd_models)

    m = sub.add_parser("methods", help="list the methods")
    m.set_defaults(fn=cmd_methods)

    d = sub.add_parser("describe", help="show a method's flow graph")
    d.add_argument("method", help="a method name, or 'all' for every method as Markdown (text and Mermaid)")
    d.add_argument("args", nargs="*", metavar="KEY=VALUE", help="method arguments: draw that variant's graph")
    d.add_argument("--recipes", default="recipes", help="folder whose recipes' variants of the method are listed")
    d.add_argument("--mermaid", action="store_true", help="print a Mermaid flowchart")
    d.set_defaults(fn=cmd_describe)

    add_study_commands(sub)
    return p


def continue_hint(args: argparse.Namespace) -> str:
    """What to run to continue an interrupted command."""
    if args.command == "study" and args.target[0] != "slurm":
        cmd = ["kdflow", "study", *args.target]
        cmd += ["--out", args.out] if args.out else []
        cmd += ["--shard", args.shard] if args.shard != "0/1" else []
        cmd += ["--workers", str(args.workers)] if args.workers != 1 else []
        return f"interrupted; continue with `{shlex.join(cmd)}` (finished runs are kept)"
    if args.command == "train" or getattr(args, "teacher_command", None) == "train":
        return "interrupted; continue with the same command and --resume"
    return "interrupted"


def os_error_line(e: OSError, args: argparse.Namespace) -> str:
    """`PATH: reason`, and for a run that stopped on a write, that its finished checkpoints are intact."""
    what = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
        resume = continue_hint(args).removeprefix("interrupted; ")
        if resume != "interrupted":
            return f"{what} (files are written whole or not at all: what was saved before is intact; fix this, then {resume})"
    return what


def _quiet_broken_pipe() -> int:
    """stdout's reader went away (`kdflow models | head`): point stdout at /dev/null so the interpreter's
    final flush does not fail again, and exit like a program killed by SIGPIPE, without a traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
    return 141


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "set", None):
        args.set = [item for group in args.set for item in group]
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a closed pipe shows here rather than at the interpreter's exit
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or forbidden folder: one line naming the file
        print(f"error: {os_error_line(e, args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(continue_hint(args), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
