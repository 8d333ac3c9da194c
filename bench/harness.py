"""Measuring on a shared machine: interleaved repetitions, medians, peak memory, and the machine line.

Every comparison runs its variants in the same process, warm-up steps first (not timed), then
repetitions interleaved A, B, A, B ... with the order rotated every round (A B C | B C A | ...)
so that a slow drift of the machine's load falls on every variant alike. A repetition is `steps`
steps timed as one block; a figure is the median over the repetitions. On the CPU every operation
is synchronous, so the clock read after a step is the step's end. On CUDA kernels run
asynchronously: `sync(device)` (torch.cuda.synchronize; nothing on the CPU) comes before every
clock read around device work, so a block's time holds all the device work of its steps (the steps
inside a block are not synchronised one by one: they queue as in `train_epoch`). The CUDA path is
untested until a run on a GPU.

The machine is shared. A repetition whose threads waited for a CPU (the kernel's run-queue delay
of this process's threads, /proc/self/task/*/schedstat) longer than `CONTENDED` of its wall time
ran while other processes took cores from it: its round is run again (within a budget), and the
waiting is reported with every table.
"""
from __future__ import annotations

import datetime
import glob
import math
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def as_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def device_label(device: torch.device | str | None) -> str:
    """"CUDA" or "CPU": what the benchmark's headings say it ran on."""
    return "CUDA" if as_device(device).type == "cuda" else "CPU"


def gpu_text(device: torch.device | str) -> str:
    """The GPU's name, memory and CUDA version (initialises CUDA)."""
    d = as_device(device)
    index = d.index if d.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return (f"GPU {torch.cuda.get_device_name(index)} ({props.total_memory / 2**30:.0f} GiB, "
            f"CUDA {torch.version.cuda}, device {index} of {torch.cuda.device_count()})")


def machine_line(threads: int | None = None, device: torch.device | str | None = None) -> str:
    """One line for above a table: the GPU on CUDA, CPU, cores, torch, threads, date, load average."""
    load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    gpu = f"{gpu_text(device)}; host " if as_device(device).type == "cuda" else ""
    return (
        f"*Machine: {gpu}{cpu_name()}, {os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}); "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"intra-op threads: {threads if threads is not None else torch.get_num_threads()}; "
        f"{now}; load average {load} (1/5/15 min).*"
    )


# ---------------------------------------------------------------------------------------------
# memory: the resident set of this process (Linux /proc, no psutil); on CUDA the allocator's peak
# ---------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_mib() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The process's peak RSS since start or since the last `reset_peak_rss` (VmHWM; ru_maxrss as a fallback)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_peak_cuda(device: torch.device | str) -> float:
    """Reset CUDA's peak-allocation mark on `device`; returns the MiB allocated now (the baseline)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**20


def peak_cuda_mib(device: torch.device | str) -> float:
    """The most MiB the caching allocator has handed out on `device` since `reset_peak_cuda`
    (torch.cuda.max_memory_allocated: tensors only, not the allocator's cached reserve)."""
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work before a clock is read: torch.cuda.synchronize on a CUDA device,
    nothing on the CPU (whose operations are synchronous)."""
    if device is not None and as_device(device).type == "cuda":
        torch.cuda.synchronize(as_device(device))


def run_delay_s() -> float:
    """Seconds this process's threads have spent runnable but waiting for a CPU (the scheduler's run-queue
    delay, summed over threads; /proc/self/task/*/schedstat), NaN where the kernel does not report it."""
    total, found = 0, False
    for f in glob.glob("/proc/self/task/*/schedstat"):
        try:
            with open(f) as fh:
                total += int(fh.read().split()[1])
            found = True
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9 if found else float("nan")


class Contention:
    """How much this process was kept off the CPUs by other processes: run-queue delay per wall second
    (0 on an idle machine; 1.0 means one of its threads waited all the time)."""

    def __init__(self) -> None:
        self.t, self.delay = time.perf_counter(), run_delay_s()

    def cores(self) -> float:
        value = (run_delay_s() - self.delay) / max(time.perf_counter() - self.t, 1e-9)
        return 0.0 if math.isnan(value) else value


def cpu_busy_s() -> float:
    """CPU seconds the machine has spent busy since boot, summed over cores (/proc/stat, tick resolution)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except OSError:
        return float("nan")
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def others_cores(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes over `seconds` while this one sleeps."""
    busy, mine = cpu_busy_s(), time.process_time()
    time.sleep(seconds)
    value = (cpu_busy_s() - busy - (time.process_time() - mine)) / seconds
    return 0.0 if math.isnan(value) else max(value, 0.0)


def wait_for_quiet(max_s: float, threshold: float = 0.3, log: Callable[[str], None] = lambda s: None) -> float:
    """Sleep until other processes use less than `threshold` cores (checked each second), at most `max_s`
    seconds; returns the seconds waited. The machine is shared: this keeps most repetitions clean."""
    start = time.perf_counter()
    told = False
    while (load := others_cores()) >= threshold and time.perf_counter() - start < max_s:
        if not told:
            log(f"other processes use {load:.1f} cores: waiting up to {max_s:.0f} s for a quieter machine")
            told = True
    return time.perf_counter() - start


#: a repetition whose threads waited for a CPU longer than this fraction of its wall time is re-run
CONTENDED = 0.10


@dataclass
class Timing:
    """Per-step seconds of every accepted repetition of one variant, in the order they ran."""

    name: str
    reps: list[float] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)
    wait: list[float] = field(default_factory=list)  # run-queue delay per wall second of each accepted repetition
    discarded: int = 0  # repetitions re-run because the process had to wait for a CPU

    @property
    def median(self) -> float:
        return statistics.median(self.reps)

    def per_second(self, items: int) -> float:
        return items / self.median


def timed(fn: Callable[[], object], steps: int, device: torch.device | str | None = None) -> tuple[float, float]:
    """(seconds per step, run-queue wait per wall second) of `steps` calls of fn; on CUDA the device's
    queue is drained before the clock starts and before it stops."""
    sync(device)
    meter = Contention()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps, meter.cores()


def warm_up(fn: Callable[[], object], steps: int, device: torch.device | str | None = None) -> list[float]:
    """Seconds of each of `steps` warm-up calls of fn (each drained on CUDA, so none spills into what follows)."""
    out = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def interleave(
    variants: dict[str, Callable[[], object]], warmup: int, reps: int, steps: int = 1, max_discard: int | None = None,
    reverse_first: bool = False, device: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Warm every variant up (`warmup` steps each, timed separately, not counted), then `reps` rounds of
    one repetition (`steps` steps) per variant, the order rotated by one every round (A B C | B C A | C A B ...:
    every variant takes every place in turn and, with three or more, never follows itself). A round in which any
    repetition waited for a CPU (other processes running) longer than `CONTENDED` of its time is discarded
    and run again, at most `max_discard` times (default: `reps`), and only while contended rounds do not
    outnumber clean ones by more than two (beyond that the load is persistent and re-running only costs time);
    after that rounds are kept whatever the load. On a CUDA `device` every clock read waits for the device
    (`sync`)."""
    out = {name: Timing(name) for name in variants}
    for name, fn in variants.items():
        out[name].warmup_s += warm_up(fn, warmup, device)
    names = list(variants)
    budget = reps if max_discard is None else max_discard
    r = 0
    done = 0
    while done < reps:
        shift = (r + (1 if reverse_first else 0)) % len(names)
        order = names[shift:] + names[:shift]
        got = {name: timed(variants[name], steps, device) for name in order}
        r += 1
        persistent = out[names[0]].discarded > done + 2  # more contended rounds than clean ones: re-running won't help
        if budget > 0 and not persistent and max(load for _, load in got.values()) > CONTENDED:
            budget -= 1
            for name in names:
                out[name].discarded += 1
            continue
        for name, (sec, load) in got.items():
            out[name].reps.append(sec)
            out[name].wait.append(load)
        done += 1
    return out


def load_note(timings: list[Timing]) -> str:
    """One sentence: how long the timed repetitions waited for a CPU, and how many rounds were re-run."""
    waits = [x for t in timings for x in t.wait]
    discarded = max((t.discarded for t in timings), default=0)
    if not waits:
        return ""
    text = (f"Contention: the timed repetitions waited for a CPU {100 * statistics.median(waits):.1f} % of their "
            f"time (median; max {100 * max(waits):.0f} %)")
    if discarded:
        text += f"; {discarded} round{'s' * (discarded != 1)} re-run for waiting more than {100 * CONTENDED:.0f} %"
    return text + "."


def ratio(a: Timing, b: Timing) -> float:
    """Median step time of a over that of b."""
    return a.median / b.median


def paired_spread(a: Timing, b: Timing) -> tuple[float, float]:
    """The quartiles of the per-round ratios a_i / b_i (how much the ratio moved between rounds)."""
    r = sorted(x / y for x, y in zip(a.reps, b.reps))
    if len(r) < 4:
        return r[0], r[-1]
    q = statistics.quantiles(r, n=4)
    return q[0], q[2]


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[object]], align: str | None = None) -> str:
    """A Markdown table; `align` is one letter per column (l or r), right for numbers by default."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds < 10 else f"{seconds * 1000:.0f}"


def pct(x: float) -> str:
    return f"{x:+.1f} %"
