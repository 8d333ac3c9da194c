"""`kdflow study slurm STUDY.yaml --shards N`: a Slurm job-array script, one array task per shard.

Every array task runs `kdflow study STUDY.yaml --shard $SLURM_ARRAY_TASK_ID/N` into the same
study directory (which must be on a file system all nodes share, with working POSIX locks).
Shards never collide: each run has its own directory and lock, the store is SQLite with
transactions, and a teacher needed by two shards is trained by whichever takes its lock first
while the other waits and reuses it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from kdflow.study.grid import shard
from kdflow.study.spec import load_study


def slurm_script(
    study_path: str | Path,
    study_dir: str | Path,
    shards: int,
    workers: int = 1,
    cpus_per_task: int | None = None,
    time_limit: str | None = None,
    partition: str | None = None,
    extra: list[str] = (),
    python: str = sys.executable,
) -> str:
    """The text of the array script (absolute paths, this Python's kdflow)."""
    study_path, study_dir = Path(study_path).resolve(), Path(study_dir).resolve()
    shard([], 0, shards)  # range check
    study, _ = load_study(study_path)
    cpus = cpus_per_task or workers
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=kdflow-{study.name}",
        f"#SBATCH --array=0-{shards - 1}",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --output={study_dir}/slurm/%A_%a.out",
    ]
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [f"#SBATCH {x}" for x in extra]
    cmd = [python, "-m", "kdflow", "study", str(study_path), "--out", str(study_dir), "--workers", str(workers)]
    lines += [
        "",
        f"# {study.name}: shard $SLURM_ARRAY_TASK_ID of {shards}; all shards write into {study_dir}",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(str(study_dir / 'slurm'))}",
        f"export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{cpus}}}",
        " ".join(shlex.quote(c) for c in cmd) + f' --shard "$SLURM_ARRAY_TASK_ID/{shards}"',
        "",
    ]
    return "\n".join(lines)


def write_slurm(
    study_path: str | Path, study_dir: str | Path, shards: int, script: str | Path | None = None, **kw
) -> Path:
    """Write the script (default STUDY_DIR/slurm.sh) and return its path."""
    text = slurm_script(study_path, study_dir, shards, **kw)
    path = Path(script) if script else Path(study_dir) / "slurm.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    (Path(study_dir) / "slurm").mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path
