"""The benchmark's quick version runs end to end and writes every table (no timing is asserted)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SECTIONS = [
    "## 1. Engine overhead",
    "## 2. The teacher cache",
    "## 3. Throughput of every method",
    "## 4. Peak memory per method",
    "## 5. Data parallel",
    "## 6. channels_last, torch.compile and bf16 autocast",
    "## 7. CRD: its step against KD's",
    "## Reading",
]


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of cells (header first, the separator row left out)."""
    out: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            out.append(current)
            current = []
    return out


def test_quick_benchmark_writes_every_table(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks")
    assert f"`python bench/run.py --quick --out {out}`" in text  # the exact command
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)

    found = tables(text)
    assert len(found) == 7  # overhead, cache, methods (one pair in --quick), memory, DDP, options, CRD
    for t in found:
        assert len(t) >= 2 and all(len(row) == len(t[0]) for row in t), t
    # the machine, torch version and thread count above every table
    for section in text.split("\n## ")[1:]:
        if "\n| " in section:
            assert "*Machine:" in section and "torch 2." in section and "intra-op threads:" in section

    overhead, cache, methods, memory, ddp, options, crd = found
    assert overhead[1][1].startswith("hand-written") and any("train_epoch()" in r[1] for r in overhead)
    assert re.fullmatch(r"\*\*[+-]\d+\.\d %\*\*", overhead[2][4])  # the overhead in percent
    assert cache[0][5].startswith("cached KD / CE") and re.fullmatch(r"\*\*\d+\.\d+\*\*", cache[1][5])
    rows = {r[0]: r for r in methods[1:]}
    assert {"`ce`", "`kd`", "`slkd`", "`dml`"} <= set(rows)
    assert float(rows["`kd`"][4]) > 0 and float(rows["`slkd`"][5]) > 0
    assert "student (convnet_s), peer (convnet_s)" in rows["`dml`"][3]
    assert rows["`fsp`"][4] == "n/a"  # FSP's Gram matrices need equal channel counts: not this pair
    mem = {r[0]: r for r in memory[1:]}
    assert float(mem["`slkd`"][1]) >= 0 and mem["`fsp`"][1] == "n/a"
    assert [r[1] for r in ddp[1:]] == ["1 process × 2 threads", "1 process × 1 thread", "2 processes × 1 thread (DDP, gloo)"]
    assert all(float(r[3]) > 0 for r in ddp[1:])
    variants = [r[0] for r in options[1:]]
    assert variants[0].endswith("(baseline)") and "channels_last" in variants and "bf16 autocast" in variants
    assert [r[1].split(",")[0] for r in crd[1:]] == ["KD (τ = 4", "CRD", "CRD"]
    assert crd[1][4] == "1.00" and re.fullmatch(r"\*\*\d+\.\d\d\*\*", crd[2][4])  # CRD's step over KD's
