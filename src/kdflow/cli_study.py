"""The study commands of `kdflow`: `study` (run a study, or `study slurm` to write a job-array script)
and `report` (tables and plots from a study's store)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdflow.flow.errors import RecipeError


def cmd_study(args: argparse.Namespace) -> int:
    from kdflow.study.grid import parse_shard
    from kdflow.study.runner import run_study
    from kdflow.study.spec import load_study

    if args.target[0] == "slurm":
        if len(args.target) != 2:
            raise RecipeError("usage: kdflow study slurm STUDY.yaml --shards N [--out DIR]")
        from kdflow.study.slurm import write_slurm

        study, _ = load_study(args.target[1])
        out = Path(args.out) if args.out else Path("runs") / "studies" / study.name
        path = write_slurm(
            args.target[1],
            out,
            args.shards,
            script=args.script,
            workers=args.workers,
            cpus_per_task=args.cpus_per_task,
            time_limit=args.time,
            partition=args.partition,
            extra=args.sbatch,
        )
        print(f"wrote {path}: {args.shards} array tasks into {out.resolve()}")
        print(f"submit with   sbatch {path}")
        print(f"then report   kdflow report {out}")
        return 0
    if len(args.target) != 1:
        raise RecipeError("usage: kdflow study STUDY.yaml [--out DIR] [--workers K] [--shard i/N]")
    if args.workers < 1:
        raise RecipeError(f"--workers {args.workers}: need at least 1")
    counts = run_study(
        args.target[0],
        out=args.out,
        workers=args.workers,
        shard_of=parse_shard(args.shard),
        retry_failed=args.retry_failed,
        dry_run=args.dry_run,
    )
    return 1 if counts.get("failed") and not args.dry_run else 0


def cmd_report(args: argparse.Namespace) -> int:
    from kdflow.study.report import write_report

    study_dir = Path(args.study_dir)
    if not (study_dir / "results.sqlite").is_file():
        raise RecipeError(f"{study_dir}: no results.sqlite here (run `kdflow study` first)")
    out = write_report(study_dir, args.out)
    if args.show:
        print((out / "report.md").read_text())
    print(f"report written to {out}/ (report.md, report.tex, *.png)")
    return 0


def add_study_commands(sub: argparse._SubParsersAction) -> None:
    """Add `study` and `report` to the `kdflow` subcommands."""
    s = sub.add_parser(
        "study",
        help="run a study (datasets × pairs × methods × conditions × seeds), or write its Slurm script",
        description="`kdflow study STUDY.yaml` runs what is not finished yet (stop and start it again at will); "
        "`kdflow study slurm STUDY.yaml --shards N` writes a Slurm job-array script whose task i runs "
        "`kdflow study STUDY.yaml --shard i/N` into the same study directory.",
    )
    s.add_argument(
        "target", nargs="+", metavar="[slurm] STUDY.yaml", help="the study file, after `slurm` for the array script"
    )
    s.add_argument("--out", help="study directory (default runs/studies/NAME)")
    s.add_argument("--workers", type=int, default=1, help="local worker processes (default 1: in this process)")
    s.add_argument("--shard", default="0/1", metavar="i/N", help="run share i (0-based) of N (default 0/1: all)")
    s.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    s.add_argument("--dry-run", action="store_true", help="print the grid's size and state, run nothing")
    g = s.add_argument_group("slurm (with `kdflow study slurm`)")
    g.add_argument("--shards", type=int, default=1, help="array tasks, one shard each")
    g.add_argument("--script", help="where to write the script (default STUDY_DIR/slurm.sh)")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per array task (default --workers)")
    g.add_argument("--time", help="time limit per array task, e.g. 04:00:00")
    g.add_argument("--partition")
    g.add_argument(
        "--sbatch", action="append", default=[], metavar="OPTION", help="extra #SBATCH line, e.g. --sbatch=--mem=8G"
    )
    s.set_defaults(fn=cmd_study)

    r = sub.add_parser("report", help="tables (Markdown, LaTeX) and plots of a study, from its results store")
    r.add_argument("study_dir")
    r.add_argument("--out", help="output folder (default STUDY_DIR/report)")
    r.add_argument("--show", action="store_true", help="also print report.md")
    r.set_defaults(fn=cmd_report)
