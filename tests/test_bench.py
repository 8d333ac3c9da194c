"""The benchmark's quick version runs end to end on the CPU and writes every table (no timing is asserted);
the device plumbing (`--device`, `harness.sync`, batches on the loop's device, the CUDA-only text of sections 4 and
5) is checked piece by piece without a GPU: nothing here runs a CUDA kernel."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def bench_run():
    """bench/run.py as a module (it puts bench/ on sys.path, so `harness` and `workloads` import after it)."""
    name = "kdflow_bench_run"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]

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
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks (CPU)\n")
    assert f"`python bench/run.py --quick --device cpu --out {out}`" in text  # the exact command
    assert "**Device: CPU**" in text and "docs/benchmarks-gpu.md" in text  # where a GPU run's tables go
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert len(headings) == len(SECTIONS) and all(h.endswith(" (CPU)") for h in headings), headings

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
    assert memory[0][1] == "fmnist: growth MiB (RSS)"
    mem = {r[0]: r for r in memory[1:]}
    assert float(mem["`slkd`"][1]) >= 0 and mem["`fsp`"][1] == "n/a"
    assert [r[1] for r in ddp[1:]] == ["1 process × 2 threads", "1 process × 1 thread", "2 processes × 1 thread (DDP, gloo)"]
    assert all(float(r[3]) > 0 for r in ddp[1:])
    variants = [r[0] for r in options[1:]]
    assert variants[0].endswith("(baseline)") and "channels_last" in variants and "bf16 autocast" in variants
    assert [r[1].split(",")[0] for r in crd[1:]] == ["KD (τ = 4", "CRD", "CRD"]
    assert crd[1][4] == "1.00" and re.fullmatch(r"\*\*\d+\.\d\d\*\*", crd[2][4])  # CRD's step over KD's


# ---------------------------------------------------------------------------------------------
# the device plumbing, without a GPU
# ---------------------------------------------------------------------------------------------


def test_sync_waits_for_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    run = bench_run()  # noqa: F841 (puts bench/ on sys.path)
    import harness

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    harness.sync(torch.device("cpu"))
    harness.sync("cpu")
    harness.sync(None)
    assert calls == []
    harness.sync(torch.device("cuda"))
    harness.sync("cuda:0")
    assert calls == [torch.device("cuda"), torch.device("cuda:0")]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_clock_read_waits_for_the_device(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """interleave (warm-ups and timed repetitions) and timed: on CUDA no clock is read while a step's work may
    still be queued (a sync after every call before the next clock read); on the CPU no sync at all."""
    bench_run()
    import harness

    events: list[str] = []
    clock = time.perf_counter
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    monkeypatch.setattr(harness.time, "perf_counter", lambda: (events.append("clock"), clock())[1])
    res = harness.interleave({"a": lambda: events.append("call"), "b": lambda: events.append("call")}, 2, 3, 2,
                             max_discard=0, device=torch.device(device))
    harness.timed(lambda: events.append("call"), 3, device)
    assert [len(t.reps) for t in res.values()] == [3, 3] and [len(t.warmup_s) for t in res.values()] == [2, 2]
    assert events.count("call") == 2 * 2 + 2 * 3 * 2 + 3
    if device == "cpu":
        assert "sync" not in events
        return
    dirty = False
    for e in events:
        if e == "call":
            dirty = True
        elif e == "sync":
            dirty = False
        else:
            assert not dirty, "a clock read with device work possibly still queued"
    assert events.count("sync") >= 2 * (2 + 3 * 1) + 2  # every warm-up step, every repetition, timed()


def test_device_argument(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run = bench_run()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = run.parse_args([])
    assert args.device == torch.device("cpu") and args.out == ROOT / "docs" / "benchmarks.md"
    args = run.parse_args(["--device", "cpu", "--out", str(tmp_path / "b.md"), "--sections", "overhead,crd"])
    assert args.device == torch.device("cpu") and args.out == tmp_path / "b.md" and args.sections == ["overhead", "crd"]
    with pytest.raises(SystemExit):
        run.parse_args(["--device", "cuda"])  # no CUDA here: an error, not a silent CPU run
    with pytest.raises(SystemExit):
        run.parse_args(["--device", "tpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolving only: no CUDA call is made
    for argv in ([], ["--device", "cuda"]):
        args = run.parse_args(argv)
        assert args.device == torch.device("cuda") and args.out == ROOT / "docs" / "benchmarks-gpu.md"
    assert run.parse_args(["--device", "cpu"]).device == torch.device("cpu")


def test_machine_line_names_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    bench_run()
    import harness

    assert "GPU" not in harness.machine_line() and harness.machine_line().startswith("*Machine: ")

    class Props:
        total_memory = 141 * 2**30

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU 9000")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: Props())
    line = harness.machine_line(device=torch.device("cuda"))
    assert line.startswith("*Machine: GPU Fake GPU 9000 (141 GiB") and "device 0 of 1" in line
    assert "CPU cores" in line and "intra-op threads:" in line  # the host is still named
    assert harness.device_label("cuda:0") == "CUDA" and harness.device_label(torch.device("cpu")) == "CPU"


def fake_cuda_bench(run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(run, "machine_line", lambda **kw: "*Machine: a fake GPU*")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return run.Bench(run.QUICK, tmp_path, True, torch.device("cuda"))


def test_cuda_sections_say_what_they_measure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Section 5 on CUDA is an explicit skip line (no table, nothing launched); section 4's column says it holds
    CUDA max_memory_allocated; headings say (CUDA)."""
    run = bench_run()
    b = fake_cuda_bench(run, monkeypatch, tmp_path)
    monkeypatch.setattr(run, "launch_ddp", lambda *a, **k: pytest.fail("DDP launched on CUDA"))
    run.section_ddp(b)
    text = "\n".join(b.parts)
    assert text.startswith("## 5. Data parallel") and "(CUDA)\n" in text.splitlines()[0] + "\n"
    assert "Skipped on CUDA: needs ≥ 2 GPUs" in text and "\n| " not in text and b.results.get("ddp") is None
    b.parts.clear()
    b.results["methods"] = {"fmnist": {
        "kd": {"memory": "cuda_allocated", "mem_growth_mib": 12.4, "weights_mib": 1.25, "method": [0.02], "ce": [0.01]},
        "fsp": {"error": "not this pair"},
    }}
    run.section_memory(b)
    text = "\n".join(b.parts)
    assert text.splitlines()[0] == "## 4. Peak memory per method (CUDA)"
    assert "torch.cuda.max_memory_allocated" in text and "VmHWM" not in text
    assert "| method | fmnist: growth MiB (CUDA max_memory_allocated) | fmnist: weights MiB |" in text
    assert "| `kd` | 12 | 1.2 |" in text and "| `fsp` | n/a | n/a |" in text
    assert run.reading(b).startswith("## Reading (CUDA)")


def test_engine_loop_batches_on_its_device(tmp_path: Path) -> None:
    bench_run()
    import workloads as W

    pair = W.PAIRS["fmnist"]
    ck = W.make_checkpoints(pair, tmp_path)
    data = W.load_data(pair, W.make_data(pair, 1, ck, tmp_path / "data.pt"), "cpu")
    loop = W.engine(pair, "kd", ck, data, device="cpu")
    assert loop.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in loop.flow.parameters())
    for x, y, idx, view in loop.batches:
        assert x.device.type == y.device.type == idx.device.type == "cpu" and view.device.type == "cpu"
    assert loop.sums["total"].device.type == "cpu"
    loop.step()
    assert loop.seen == pair.batch and loop.last.total.device.type == "cpu"
    # the move itself (on the meta device: no data, no kernels): inputs, labels and indices go, views stay on the CPU
    moved = W.batches_on(data.batches, "meta")
    x, y, idx, view = moved[0]
    assert (x.device.type, y.device.type, idx.device.type, view.device.type) == ("meta", "meta", "meta", "cpu")
    assert W.batches_on(data.batches, "cpu")[0][0] is data.batches[0][0]  # nothing copied when already there
