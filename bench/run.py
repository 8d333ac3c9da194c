"""kdflow's benchmark: engine overhead, teacher cache, every method's throughput and memory, DDP scaling,
and the channels_last / torch.compile / bf16 measurements, written to docs/benchmarks.md.

    python bench/run.py                 # the full benchmark (about 15 minutes on a 2-core CPU)
    python bench/run.py --quick --out /tmp/b.md   # a tiny version, for smoke tests
    python bench/run.py --device cuda   # on a GPU: the same sections, written to docs/benchmarks-gpu.md

Every figure is a ratio or a throughput measured side by side in one process and one run: warm-up
steps first (not counted), then repetitions interleaved A, B, A, B ... and the median. See
bench/harness.py (timing, memory) and bench/workloads.py (what runs).

Device (`--device auto|cpu|cuda`, default auto: cuda where torch.cuda.is_available(), else cpu): the
flows, the pre-made batches, the data set (`to_device`, as `train` does) and the teacher cache's
lookups live on it, and on CUDA every clock read around device work first waits for the GPU
(`harness.sync`). The title and every section heading say "(CPU)" or "(CUDA)", the machine line
above every table names the GPU on CUDA, and `--out` defaults to docs/benchmarks.md on the CPU and
docs/benchmarks-gpu.md on CUDA, so a GPU run never overwrites the CPU tables. On CUDA:
sections 1-3, 6 and 7 are measured as on the CPU; section 4 reports the growth of
torch.cuda.max_memory_allocated (its peak reset before each method) instead of the resident set;
section 5 (DDP with gloo processes against intra-op threads: CPU data parallelism) is skipped
with a line saying so (a GPU version needs ≥ 2 GPUs and is not written). The *wait for a CPU*
figures (/proc) and `--threads` stay, about the host process. The CUDA path is untested until a run
on a GPU: only the CPU path has been run (tests/test_bench.py runs `--quick --device cpu`).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import workloads as W
from harness import (CONTENDED, device_label, interleave, load_note, machine_line, ms, paired_spread, pct, ratio, sync,
                     table, wait_for_quiet)

from kdflow.data.augment import augment_batch
from kdflow.data.loader import batches, seeded_generator
from kdflow.engine.distributed import DistInfo
from kdflow.engine.train import _stage_views_and_caches, train_epoch

# ---------------------------------------------------------------------------------------------
# settings: (warm-up steps, repetitions, steps per repetition)
# ---------------------------------------------------------------------------------------------

FULL = {
    "pairs": ["fmnist", "cifar"],
    "batches": {"fmnist": 8, "cifar": 2},  # distinct pre-made global batches per pair (cycled)
    "overhead": {"steps": {"fmnist": (5, 30, 4), "cifar": (2, 8, 1)}, "epoch_reps": 8},
    "cache": {"fmnist": (5, 20, 4), "cifar": (2, 6, 1)},
    "methods": {"fmnist": (3, 5, 3), "cifar": (1, 3, 1)},
    "method_list": None,  # every method of `kdflow methods`
    "ddp": {"fmnist": {"rounds": 2, "warmup": 5, "reps": 8, "steps": 4},
            "cifar": {"rounds": 1, "warmup": 2, "reps": 4, "steps": 1}},
    "options": {"warmup": 6, "reps": 15, "steps": 4, "compile": True},
    "crd": {"cifar": (1, 6, 1)},  # CRD's step against KD's (both forms of the scores)
    "quiet_budget_s": 600,  # at most this long in all, waiting for other jobs to leave the CPUs
    "retry": True,  # re-run rounds that waited for a CPU (at most as many as the rounds asked for)
}
QUICK = {
    "pairs": ["fmnist"],
    "batches": {"fmnist": 4},
    "overhead": {"steps": {"fmnist": (2, 4, 2)}, "epoch_reps": 2},
    "cache": {"fmnist": (2, 3, 2)},
    "methods": {"fmnist": (1, 2, 2)},
    "method_list": ["ce", "kd", "fitnet", "dml", "slkd", "fsp"],
    "ddp": {"fmnist": {"rounds": 1, "warmup": 2, "reps": 2, "steps": 2}},
    "options": {"warmup": 2, "reps": 3, "steps": 2, "compile": False},
    "crd": {"fmnist": (1, 2, 1)},
    "quiet_budget_s": 0,
    "retry": False,
}

SECTIONS = ["overhead", "cache", "methods", "ddp", "options", "crd"]


@dataclass
class Bench:
    cfg: dict
    tmp: Path
    quick: bool
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ckpts: dict = field(default_factory=dict)
    data_paths: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    parts: list = field(default_factory=list)
    waited: float = 0.0  # seconds spent waiting for other jobs to leave the CPUs
    persistent: bool = False  # a wait ran out: other jobs hold the CPUs for good, stop waiting

    def pair_setup(self, key: str) -> tuple[W.Pair, dict, W.PairData]:
        pair = W.PAIRS[key]
        if key not in self.ckpts:
            self.ckpts[key] = W.make_checkpoints(pair, self.tmp)
            self.data_paths[key] = W.make_data(pair, self.cfg["batches"][key], self.ckpts[key], self.tmp / f"{key}-data.pt")
        return pair, self.ckpts[key], W.load_data(pair, self.data_paths[key], self.device)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def label(self) -> str:
        """"CUDA" or "CPU", in the title and every section heading."""
        return device_label(self.device)

    def engine(self, *args, **kwargs) -> W.EngineLoop:
        """`workloads.engine` on this run's device."""
        return W.engine(*args, device=self.device, **kwargs)

    def machine(self) -> str:
        return machine_line(device=self.device)

    def heading(self, title: str) -> None:
        self.emit(f"## {title} ({self.label})\n")

    def retries(self, reps: int) -> int:
        """How many contended rounds a measurement of `reps` rounds may re-run."""
        return reps if self.cfg["retry"] else 0

    def quiet(self) -> None:
        """Before a measurement: wait (within the run's budget) until other processes leave the CPUs alone."""
        budget = self.cfg["quiet_budget_s"] - self.waited
        if budget > 0 and not self.persistent:
            limit = min(60.0, budget)
            waited = wait_for_quiet(limit, log=log)
            self.waited += waited
            if waited >= limit:
                self.persistent = True
                log("other jobs keep the CPUs busy: measuring under their load from here on")

    def emit(self, text: str) -> None:
        print(text, flush=True)
        self.parts.append(text)


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def steps_note(w: int, r: int, k: int) -> str:
    return f"{w} warm-up step{'s' * (w != 1)} (not counted), then {r} interleaved repetitions of {k} step{'s' * (k != 1)}"


# ---------------------------------------------------------------------------------------------
# 1. engine overhead
# ---------------------------------------------------------------------------------------------


def epoch_comparison(b: Bench, pair: W.Pair, ck: dict, data: W.PairData, reps: int) -> tuple[dict, int]:
    """The real `train_epoch` (batching and augmentation included) against a hand-written epoch over the same
    batching and augmentation functions; per-epoch timings and the number of steps in an epoch."""
    log("overhead: train_epoch() vs a hand-written epoch")
    ep = b.engine(pair, "kd", ck, data)
    ds, recipe, stage, bs = data.ds, ep.recipe, ep.stage, pair.batch
    aug = recipe.data.augment
    hand = W.HandKD(ep.flow.models["teacher"], ep.flow.models["student"], recipe, stage, data.batches)
    n_steps = len(data.batches)

    def real_epoch() -> None:
        train_epoch(ep.flow, recipe, stage, 0, 0, ds, ep.optimizers, False)

    def hand_epoch() -> None:
        order, augg = seeded_generator(recipe.seed, 0, 0, 0), seeded_generator(recipe.seed, 0, 0, 1)
        for step, (xb, yb, _) in enumerate(batches(ds, bs, order, augg)):
            x = augment_batch(xb, ds.mean, ds.std, crop_padding=aug.crop_padding, flip=aug.flip, generator=augg)
            hand.step_on(x, yb, (step + 1) / n_steps)

    b.quiet()
    return interleave({"hand": hand_epoch, "kdflow": real_epoch}, 1, reps, 1, max_discard=b.retries(reps),
                      device=b.device), n_steps


def section_overhead(b: Bench) -> None:
    rows, notes, timings = [], [], []
    b.results["overhead"] = {}
    for key, (w, r, k) in b.cfg["overhead"]["steps"].items():
        if key not in b.cfg["pairs"]:
            continue
        pair, ck, data = b.pair_setup(key)
        bs = pair.batch
        log(f"overhead: {key}: kdflow step vs hand-written loop")
        kd = b.engine(pair, "kd", ck, data)
        kd_lean = b.engine(pair, "kd", ck, data, bookkeeping=False)
        hand = W.HandKD(kd.flow.models["teacher"], kd.flow.models["student"], kd.recipe, kd.stage, data.batches)
        b.quiet()
        res = interleave({"hand": hand.step, "kdflow": kd.step, "lean": kd_lean.step}, w, r, k,
                         max_discard=b.retries(r), device=b.device)
        timings += res.values()
        h, t, lean = res["hand"], res["kdflow"], res["lean"]
        over, q = 100 * (ratio(t, h) - 1), paired_spread(t, h)
        b.results["overhead"][key] = {"step": over, "abs_ms": (t.median - h.median) * 1000,
                                      "lean": 100 * (ratio(lean, h) - 1), "step_ms": h.median * 1000}
        rows += [
            [pair.title, "hand-written PyTorch loop", ms(h.median), f"{h.per_second(bs):.0f}", "—", "—"],
            ["", "kdflow step, as `train_epoch` does it", ms(t.median), f"{t.per_second(bs):.0f}", f"**{pct(over)}**",
             f"{pct(100 * (q[0] - 1))} … {pct(100 * (q[1] - 1))}"],
            ["", "kdflow step without the running sums (diagnostic)", ms(lean.median), f"{lean.per_second(bs):.0f}",
             pct(100 * (ratio(lean, h) - 1)), "—"],
        ]
        notes.append(f"{pair.key}: {steps_note(w, r, k)} per variant")
        if key != "fmnist":
            continue
        er = b.cfg["overhead"]["epoch_reps"]
        eres, n_steps = epoch_comparison(b, pair, ck, data, er)
        for tm in eres.values():
            tm.reps = [x / n_steps for x in tm.reps]
        timings += eres.values()
        eh, ek = eres["hand"], eres["kdflow"]
        eover, eq = 100 * (ratio(ek, eh) - 1), paired_spread(ek, eh)
        b.results["overhead"][key]["epoch"] = eover
        rows += [
            ["", "hand-written epoch over kdflow's batching + augmentation", ms(eh.median), f"{eh.per_second(bs):.0f}",
             "—", "—"],
            ["", "`train_epoch()` itself (same data, same augmentation)", ms(ek.median), f"{ek.per_second(bs):.0f}",
             f"**{pct(eover)}**", f"{pct(100 * (eq[0] - 1))} … {pct(100 * (eq[1] - 1))}"],
        ]
        notes.append(f"{pair.key} epochs ({n_steps} batches of {bs}): 1 warm-up epoch, then {er} interleaved epochs, "
                     "shown per step")
    b.heading("1. Engine overhead: a kdflow KD step against a hand-written PyTorch loop")
    b.emit(b.machine())
    b.emit(
        "\nWorkload: Hinton KD (τ = 4, 0.1·CE + 0.9·KD) with the pair file's settings (batch, SGD with momentum, "
        "per-step learning rate, `channels_last` for the Fashion-MNIST pair) on pre-made batches. The hand-written "
        "loop has the same models (copies with the same weights), batches, loss, optimizer and learning rate, the "
        "teacher in eval mode under `torch.inference_mode()`, and keeps a running loss sum; the kdflow step is "
        "`train_epoch`'s body for one batch (`bench/workloads.py`, `EngineLoop.step`): learning rate, "
        "`Flow.forward`, `zero_grad`, backward, the SGD step, and its running sums (loss, top-1, CE and every term, "
        "kept as tensors). The last two rows run the real `train_epoch()` (its batching and augmentation included) "
        "against a hand-written epoch that uses kdflow's batching and augmentation functions. Overhead = median "
        "step time of kdflow / that of the hand-written loop − 1; the spread is the interquartile range of the "
        "per-round ratios. Steps: " + "; ".join(notes) + ".\n"
    )
    b.emit(table(["pair", "variant", "ms / step", "img/s", "overhead", "spread (IQR)"], rows, "llrrrr"))
    b.emit("\nTarget: overhead within 3 %. " + load_note(list(timings)) + "\n")


# ---------------------------------------------------------------------------------------------
# 2. teacher cache
# ---------------------------------------------------------------------------------------------


def section_cache(b: Bench) -> None:
    b.heading("2. The teacher cache: KD with cached teacher logits, the student alone (CE), KD with the live teacher")
    b.emit(b.machine())
    b.emit(
        "\nAll three are kdflow engine steps on the same pre-made batches. *Cached KD* reads the teacher's logits "
        "for each (sample, view) from the memory-mapped float16 cache (`train.teacher_cache.enabled: true`, "
        "`train.views: 1`; built by the engine's own `_stage_views_and_caches` before timing) and does not run the "
        "teacher; *live KD* runs it under inference mode every step; *CE* trains the student alone "
        "(`method: ce`). Time ratios are median step times.\n"
    )
    rows = []
    notes = []
    b.results["cache"] = {}
    for key in b.cfg["pairs"]:
        if key not in b.cfg["cache"]:
            continue
        w, r, k = b.cfg["cache"][key]
        pair, ck, data = b.pair_setup(key)
        log(f"cache: {key}")
        ce = b.engine(pair, "ce", ck, data)
        live = b.engine(pair, "kd", ck, data)
        cache_dir = b.tmp / "teacher-cache"
        cached = b.engine(pair, "kd", ck, data,
                          overrides={"train": {"views": 1, "teacher_cache": {"enabled": True, "dir": str(cache_dir)}}})
        sync(b.device)
        t0 = time.perf_counter()
        _, caches = _stage_views_and_caches(cached.flow, cached.recipe, cached.stage, data.ds, DistInfo(), False,
                                                 lambda s: None)
        sync(b.device)
        build_s = time.perf_counter() - t0
        assert list(caches) == ["teacher"], caches
        cached.caches = caches
        # the cached logits are the live teacher's on these very inputs (float16 storage)
        x, y, idx, view = data.batches[0]
        xin = x.contiguous(memory_format=torch.channels_last) if live.recipe.train.channels_last else x
        with torch.no_grad():
            a = live.flow(xin, y, live.stage, 0, idx)
            c = cached.flow(xin, y, cached.stage, 0, idx, {"teacher.logits": caches["teacher"].lookup(idx, view, x.device)})
        label = next(t for t in a.terms if t.startswith("kd("))
        loss_diff = abs(float(a.terms[label]) - float(c.terms[label]))
        # the lookup alone
        sync(b.device)
        t0 = time.perf_counter()
        for i in range(50):
            xb, _, ib, vb = data.batches[i % len(data.batches)]
            caches["teacher"].lookup(ib, vb, xb.device)
        sync(b.device)
        lookup_ms = (time.perf_counter() - t0) / 50 * 1000
        b.quiet()
        res = interleave({"ce": ce.step, "cached": cached.step, "live": live.step}, w, r, k, max_discard=b.retries(r),
                         device=b.device)
        tce, tca, tli = res["ce"], res["cached"], res["live"]
        bs = pair.batch
        b.results["cache"][key] = {"cached_vs_ce": ratio(tca, tce), "live_vs_ce": ratio(tli, tce),
                                   "live_vs_cached": ratio(tli, tca), "lookup_ms": lookup_ms,
                                   "ce_ms": tce.median * 1000, "cached_ms": tca.median * 1000, "live_ms": tli.median * 1000}
        rows.append([pair.title, steps_note(w, r, k), f"{tce.per_second(bs):.0f}", f"{tca.per_second(bs):.0f}",
                     f"{tli.per_second(bs):.0f}", f"**{ratio(tca, tce):.3f}**", f"{ratio(tli, tce):.2f}",
                     f"{ratio(tli, tca):.2f}"])
        n = len(data.ds)
        notes.append(
            f"- {pair.key}: cache lookup {lookup_ms:.2f} ms per step ({lookup_ms / tca.median / 10:.1f} % of a cached "
            f"step); building the cache ran the teacher once over {n} samples × 1 view in {build_s:.1f} s "
            f"({build_s / n * 1000:.2f} ms per sample); the KD term on the first batch differs from the live "
            f"teacher's by {loss_diff:.1e} (float16 storage). {load_note(list(res.values()))}"
        )
    b.emit(table(["pair", "steps", "CE img/s", "cached KD img/s", "live KD img/s", "cached KD / CE (time)",
                  "live KD / CE", "live / cached"], rows, "llrrrrrr"))
    b.emit("\nTarget: cached KD within 10 % of CE (ratio ≤ 1.10).\n\n" + "\n".join(notes) + "\n")


# ---------------------------------------------------------------------------------------------
# 3. every method (throughput) and 5. peak memory: one fresh process per (pair, method)
# ---------------------------------------------------------------------------------------------


_CTX = None


def fork_context():
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "kdflow.engine.train", "kdflow.methods", "harness", "workloads"])
    return _CTX


def run_child(spec: dict) -> dict:
    """`spec` in a fresh process forked from a server that has only imported torch and kdflow."""
    ctx = fork_context()
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=W.child_entry, args=(spec, send))
    p.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:
        result = {"error": "the worker process died"}
    p.join()
    if p.exitcode not in (0, None) and "error" not in result:
        result["error"] = f"worker exit code {p.exitcode}"
    return result


def section_methods(b: Bench) -> None:
    methods = b.cfg["method_list"] or sorted(W.METHODS)
    b.results["methods"] = {}
    b.heading("3. Throughput of every method")
    for key in b.cfg["pairs"]:
        w, r, k = b.cfg["methods"][key]
        pair, ck, _ = b.pair_setup(key)
        out = {}
        for method in methods:
            log(f"methods: {key} {method}")
            b.quiet()
            out[method] = run_child({"worker": "method", "pair": key, "method": method, "ckpts": ck,
                                     "data": str(b.data_paths[key]), "warmup": w, "reps": r, "steps": k,
                                     "max_discard": b.retries(r), "threads": torch.get_num_threads(),
                                     "device": str(b.device)})
        b.results["methods"][key] = out
        bs = pair.batch
        rows = []
        ce_all = [s for res in out.values() if "ce" in res for s in res["ce"]]
        for method in methods:
            res = out[method]
            m = W.METHODS[method]
            if "error" in res:
                rows.append([f"`{method}`", m.knowledge, "—", "—", "n/a", "n/a", f"not applicable: {res['error']}"])
                continue
            tm, tc = statistics.median(res["method"]), statistics.median(res["ce"])
            rows.append([f"`{method}`", m.knowledge, res["stage"], res["nodes"], f"{bs / tm:.0f}", f"{tm / tc:.2f}",
                         f"{bs / tc:.0f}"])
        b.emit(f"### {pair.title}, batch {bs}\n")
        b.emit(b.machine())
        cifar_note = (
            " This pair is slow on this CPU (seconds per step), so each method gets only "
            f"{w} warm-up step and {r} timed steps, each next to a timed CE step: read the ratios to about ±10 %."
            if key == "cifar" and not b.cuda else ""
        )
        waits = [x for res in out.values() for x in res.get("wait", [])]
        rerun = sum(res.get("discarded", 0) for res in out.values())
        wait_note = (
            f" Contention: the timed repetitions waited for a CPU {100 * statistics.median(waits):.1f} % of their time "
            f"(median; max {100 * max(waits):.0f} %); {rerun} round{'s' * (rerun != 1)} re-run for waiting more than "
            f"{100 * CONTENDED:.0f} %." if waits else ""
        )
        b.emit(
            f"\nOne fresh process per method (forked from a server that has only imported torch and kdflow), "
            f"random inputs, random-weight teachers (labels are the teacher's own top-1), the pair file's "
            f"settings (`{'`, `'.join(pair.files)}`). In each process: the method's engine step and the student "
            f"alone (`ce`) are built side by side, then {steps_note(w, r, k)} each, method and CE interleaved. "
            "*× CE* = median step time of the method / that of CE in the same process (the cost relative to the "
            "student alone); *CE img/s* is that process's own CE figure (so the `ce` row's ratio shows the noise)."
            f"{cifar_note}"
            + (f" Pooled CE over all processes: {bs / statistics.median(ce_all):.0f} img/s." if ce_all else "")
            + wait_note + "\n"
        )
        b.emit(table(["method", "knowledge", "stage measured", "nodes run (arch)", "img/s", "× CE (time)", "CE img/s"],
                     rows, "llllrrr"))
        b.emit("")
    b.emit(
        "Stages: methods with several stages are measured in the stage that distils: `ab` and `fsp` in `init` (their "
        "`main` stage is CE only), `annealing_kd` in `anneal`, `ft` in `main` (after the paraphraser's stage), "
        "`takd` and `dgkd` in `student` (the assistant frozen, as trained in the first stage), `born_again` in "
        "`gen1` (a generation of the teacher's architecture learning from `gen0`). Nodes: DML trains the student "
        "and a peer of the same architecture; TAKD/DGKD use an assistant (convnet_m; resnet20x4 — a CIFAR "
        "ResNet-20 at ×4 width registered by the benchmark); `multi_teacher` two teachers of the teacher's "
        "architecture; `tfkd_self` a frozen self-teacher of the student's architecture; SLKD two self-learning "
        "teachers of the teacher's architecture trained alongside the student. BSS's cost depends on how many "
        "samples the teacher gets right and how fast its attack crosses the boundary; with labels equal to the "
        "random teacher's top-1 every sample is attacked.\n\n"
        "Where the dear ones spend it: `crd` gathers B×(N+1) rows of each 128-d memory bank per side (N = 16384 "
        "negatives: about 1 GiB per side at batch 128) before one batched product, which dominates its step on the "
        "small pair; `bss` runs a 10-step attack through the teacher (a forward and an input-gradient backward per "
        "step) plus the student's forward on the attacked batch; `rkd`'s angle term is over all B³ triplets; "
        "`slkd` trains two teacher-sized self-learning teachers; `born_again` trains a teacher-sized generation; "
        "`reviewkd` runs its fusion blocks and multi-scale loss on every student stage.\n"
    )


def section_memory(b: Bench) -> None:
    if "methods" not in b.results:
        return
    keys = [k for k in b.cfg["pairs"] if k in b.results["methods"]]
    methods = list(b.results["methods"][keys[0]])
    b.heading("4. Peak memory per method")
    b.emit(b.machine())
    window = ("over the method's warm-up and first timed repetition (at least two steps, so the optimizer's momentum "
              "buffers and the previous step's gradients are included). It counts what training adds — activations "
              "kept for backward, gradients, optimizer state, the helpers' state (CRD's memory banks), the kernels' "
              "scratch")
    if b.cuda:
        kind = "CUDA max_memory_allocated"
        b.emit(
            "\nMeasured in the same fresh processes as section 3, on the GPU. *Growth* = the peak of "
            "`torch.cuda.max_memory_allocated` (its mark reset by `torch.cuda.reset_peak_memory_stats` just before "
            "the first step) minus `torch.cuda.memory_allocated` at that moment (both flows built, weights on the "
            f"GPU), {window} — in tensors handed out by PyTorch's caching allocator (its cached reserve and the CUDA "
            "context are not counted; host memory is not measured here). *Weights* = parameters of every node and "
            "helper of the flow.\n"
        )
    else:
        kind = "RSS"
        b.emit(
            "\nMeasured in the same fresh processes as section 3. *Growth* = the process's peak resident set (VmHWM, "
            "reset through /proc/self/clear_refs just before the first step) minus its resident set at that moment "
            f"(both flows built, weights loaded), {window} — and is a CPU figure (no allocator cache in between). "
            "*Weights* = parameters of every node and helper of the flow.\n"
        )
    header = ["method"]
    for key in keys:
        header += [f"{key}: growth MiB ({kind})", f"{key}: weights MiB"]
    rows = []
    for method in methods:
        row = [f"`{method}`"]
        for key in keys:
            res = b.results["methods"][key].get(method, {})
            if "error" in res or not res:
                row += ["n/a", "n/a"]
            else:
                assert res["memory"] == ("cuda_allocated" if b.cuda else "rss"), res["memory"]
                row += [f"{res['mem_growth_mib']:.0f}", f"{res['weights_mib']:.1f}"]
        rows.append(row)
    b.emit(table(header, rows))
    b.emit("")


# ---------------------------------------------------------------------------------------------
# 4. DDP
# ---------------------------------------------------------------------------------------------


def launch_ddp(spec: dict, nproc: int, threads: int) -> dict:
    spec = {**spec, "threads": threads}
    script = [str(BENCH / "run.py"), "--ddp-worker", json.dumps(spec)]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={W.free_port()}", *script]
    # CPU processes even on a machine with a GPU: kdflow's init_distributed picks nccl whenever CUDA is visible
    env = {**W.env_threads(threads), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"DDP launch failed (exit {done.returncode}): {done.stderr[-2000:]}")


def section_ddp(b: Bench) -> None:
    b.heading("5. Data parallel: 2 processes (DDP, gloo) against 1 process on the same global batch")
    b.emit(b.machine())
    if b.cuda:
        n = torch.cuda.device_count()
        b.emit(
            f"\n**Skipped on CUDA: needs ≥ 2 GPUs** (this machine shows {n}), and a GPU version of this section "
            "(one process per GPU, nccl) is not written yet. This section measures data parallelism on CPU cores: "
            "gloo processes of one thread against one process with intra-op threads; run "
            "`python bench/run.py --device cpu` for it.\n"
        )
        return
    variants = [("1 process × 2 threads", 1, 2), ("1 process × 1 thread", 1, 1), ("2 processes × 1 thread (DDP, gloo)", 2, 1)]
    rows = []
    b.results["ddp"] = {}
    steps, relaunched = [], 0
    for key, c in b.cfg["ddp"].items():
        if key not in b.cfg["pairs"]:
            continue
        pair, ck, _ = b.pair_setup(key)
        spec = {"pair": key, "ckpts": ck, "data": str(b.data_paths[key]), "warmup": c["warmup"], "reps": c["reps"],
                "steps": c["steps"]}
        reps: dict[str, list[float]] = {v[0]: [] for v in variants}
        waits: dict[str, list[float]] = {v[0]: [] for v in variants}
        launch_medians: dict[str, list[float]] = {v[0]: [] for v in variants}
        for rnd in range(c["rounds"]):
            order = variants if rnd % 2 == 0 else variants[::-1]
            for name, nproc, threads in order:
                for attempt in range(2 if b.cfg["retry"] else 1):  # again when most repetitions waited for a CPU
                    log(f"ddp: {key} {name} (round {rnd + 1})")
                    b.quiet()
                    got = launch_ddp(spec, nproc, threads)
                    clean = [(t, w) for t, w in zip(got["reps"], got["waits"]) if w <= CONTENDED]
                    if 2 * len(clean) >= len(got["reps"]) or attempt == 1 or not b.cfg["retry"]:
                        break
                    relaunched += 1
                kept = clean if 2 * len(clean) >= len(got["reps"]) else list(zip(got["reps"], got["waits"]))
                reps[name] += [t for t, _ in kept]
                waits[name] += [w for _, w in kept]
                launch_medians[name].append(statistics.median(t for t, _ in kept))
        bs = pair.batch
        t = {name: statistics.median(v) for name, v in reps.items()}
        one2, one1, two = (t[v[0]] for v in variants)
        b.results["ddp"][key] = {"vs_1p2t": one2 / two, "vs_1p1t": one1 / two,
                                 "wait_1p2t": statistics.median(waits[variants[0][0]])}
        for name, _, _ in variants:
            rows.append([pair.title if name == variants[0][0] else "", name, ms(t[name]), f"{bs / t[name]:.0f}",
                         f"{t[variants[0][0]] / t[name]:.2f}", f"{t[variants[1][0]] / t[name]:.2f}",
                         ", ".join(ms(x) for x in launch_medians[name]),
                         f"{100 * statistics.median(waits[name]):.1f} %"])
        steps.append(f"{pair.key}: {c['rounds']} launch{'es' * (c['rounds'] > 1)} per variant, each "
                     f"{steps_note(c['warmup'], c['reps'], c['steps'])}")
    b.emit(
        "\nWorkload: the KD engine step as `train` runs it under torchrun (trainable nodes wrapped in "
        "DistributedDataParallel, the frozen teacher not, each process taking its shard of the global batch: 128 "
        "for Fashion-MNIST, 64 for CIFAR). Each launch times its own steps inside the worker (rank 0's clock; DDP's "
        "all-reduce in every backward keeps the ranks in step); start-up, rendezvous and building are excluded. "
        "Launches of the three variants are interleaved; the figure is the median over the kept repetitions of all "
        f"launches (repetitions that waited for a CPU more than {100 * CONTENDED:.0f} % of their time are dropped; "
        f"{relaunched} launch{'es' * (relaunched != 1)} repeated because most of theirs did). *Wait* is the median "
        "run-queue wait of the kept repetitions (the largest over the ranks). Threads are set with OMP_NUM_THREADS "
        "and torch.set_num_threads. Steps: " + "; ".join(steps) + ".\n"
    )
    b.emit(table(["pair", "processes × threads", "ms / global step", "img/s", "speed-up vs 1×2", "speed-up vs 1×1",
                  "per-launch medians (ms)", "wait"], rows, "llrrrrrr"))
    b.emit(
        "\nScaling ratio = throughput of 2 processes / throughput of 1 process. Against 1 process × 1 thread the "
        "ideal is 2.0 (two cores, each process on one); against 1 process × 2 threads — the same two cores used "
        "by intra-op threads instead — the ideal is about 1.0, and above 1.0 means processes use the cores better "
        "than threads do for this model size.\n"
    )


# ---------------------------------------------------------------------------------------------
# 6. channels_last, torch.compile, bf16 autocast
# ---------------------------------------------------------------------------------------------


def compile_flow(loop: W.EngineLoop) -> None:
    """torch.compile every node, as the engine's `train.compile: true` does (`Flow.compile_nodes`)."""
    loop.flow.compile_nodes()


def section_options(b: Bench) -> None:
    c = b.cfg["options"]
    pair, ck, data = b.pair_setup("fmnist")
    variants = {
        "fp32, NCHW, eager (baseline)": {"train": {"channels_last": False, "precision": "fp32"}},
        "channels_last": {"train": {"channels_last": True, "precision": "fp32"}},
        "bf16 autocast": {"train": {"channels_last": False, "precision": "bf16"}},
        "channels_last + bf16 autocast": {"train": {"channels_last": True, "precision": "bf16"}},
    }
    loops = {name: b.engine(pair, "kd", ck, data, overrides=o) for name, o in variants.items()}
    compile_error = None
    if c["compile"]:
        name = "torch.compile (teacher and student), fp32, NCHW"
        loop = b.engine(pair, "kd", ck, data, overrides=variants["fp32, NCHW, eager (baseline)"])
        try:
            compile_flow(loop)
            log("options: compiling")
            loop.step()  # compile outside the timed region too; any failure shows here
            loops[name] = loop
        except Exception as e:  # noqa: BLE001 (any failure of torch.compile is a result to report)
            compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    log("options: timing")
    b.quiet()
    res = interleave({name: loop.step for name, loop in loops.items()}, c["warmup"], c["reps"], c["steps"],
                     max_discard=b.retries(c["reps"]), device=b.device)
    base = res["fp32, NCHW, eager (baseline)"]
    bs = pair.batch
    rows = []
    b.results["options"] = {}
    for name, t in res.items():
        rel = ratio(t, base)
        q = paired_spread(t, base) if t is not base else None
        verdict = "—" if t is base else ("faster" if q[1] < 1 else "slower" if q[0] > 1 else "no clear difference")
        b.results["options"][name] = {"ratio": rel, "verdict": verdict}
        rows.append([name, ms(t.median), f"{t.per_second(bs):.0f}", f"{rel:.3f}",
                     "—" if q is None else f"{q[0]:.3f} … {q[1]:.3f}", verdict, f"{sum(t.warmup_s):.1f}"])
    b.heading("6. channels_last, torch.compile and bf16 autocast (issue 7, point 2)")
    b.emit(b.machine())
    b.emit(
        f"\nWorkload: the KD engine step on {pair.title}, batch {bs}, each variant its own flow with the same weights "
        f"and batches; {steps_note(c['warmup'], c['reps'], c['steps'])} per variant. *Time ratio* = median step time / "
        "the baseline's (below 1 is faster); *spread* = interquartile range of the per-round ratios; the verdict "
        "says *faster* or *slower* only when the whole interquartile range is on one side of 1. bf16 autocast is the "
        "engine's `train.precision: bf16` (forward passes under autocast, losses in fp32); torch.compile wraps "
        "each node's module (default inductor backend, on the " + b.label + "). Warm-up seconds include compilation.\n"
    )
    b.emit(table(["variant", "ms / step", "img/s", "time ratio", "spread (IQR)", "verdict", "warm-up s"], rows, "lrrrrlr"))
    b.emit("\n" + load_note(list(res.values())))
    if compile_error:
        b.emit(f"\ntorch.compile failed here: `{compile_error}`.")
    elif not c["compile"]:
        b.emit("\ntorch.compile is not measured in `--quick`.")
    b.emit(
        f"\n`{pair.files[-1]}` sets `channels_last: true`; the CIFAR protocol sets nothing (NCHW, fp32).\n"
    )


# ---------------------------------------------------------------------------------------------
# the reading
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# 7. CRD against KD
# ---------------------------------------------------------------------------------------------


def section_crd(b: Bench) -> None:
    """CRD's engine step (default: exact negatives, the bank-matmul scores), the same with the gathered-rows scores,
    and KD's step, interleaved; the ratio to KD is the figure (target ≤ 1.3)."""
    b.heading("7. CRD: its step against KD's")
    b.emit(b.machine())
    rows, notes, timings = [], [], []
    b.results["crd"] = {}
    for key, (w, r, k) in b.cfg["crd"].items():
        if key not in b.cfg["pairs"]:
            continue
        pair, ck, data = b.pair_setup(key)
        log(f"crd: {key}")
        kd = b.engine(pair, "kd", ck, data)
        crd = b.engine(pair, "crd", ck, data)
        gather = b.engine(pair, "crd", ck, data, overrides={"method": {"name": "crd", "form": "gather"}})
        module = crd.flow.criterion_modules["0"].crd
        b.quiet()
        res = interleave({"kd": kd.step, "crd": crd.step, "gather": gather.step}, w, r, k, max_discard=b.retries(r),
                         device=b.device)
        timings += res.values()
        t_kd, t_crd, t_g = res["kd"], res["crd"], res["gather"]
        b.results["crd"][key] = {"crd_vs_kd": ratio(t_crd, t_kd), "gather_vs_kd": ratio(t_g, t_kd),
                                 "gather_vs_crd": ratio(t_g, t_crd), "kd_ms": t_kd.median * 1000}
        bs = pair.batch
        rows += [
            [pair.title, "KD (τ = 4, 0.1·CE + 0.9·KD)", ms(t_kd.median), f"{t_kd.per_second(bs):.0f}", "1.00"],
            ["", f"CRD, scores by bank matmul (default here; {module.mode} negatives)", ms(t_crd.median),
             f"{t_crd.per_second(bs):.0f}", f"**{ratio(t_crd, t_kd):.2f}**"],
            ["", "CRD, scores on gathered bank rows (`form: gather`)", ms(t_g.median), f"{t_g.per_second(bs):.0f}",
             f"{ratio(t_g, t_kd):.2f}"],
        ]
        notes.append(f"{pair.key}: {steps_note(w, r, k)} per variant; M = {pair.num_data} samples in the bank, "
                     f"K = {module.num_negatives} negatives, batch {bs}")
        print(f"crd {key}: CRD / KD step time = {ratio(t_crd, t_kd):.2f} (gather form {ratio(t_g, t_kd):.2f})",
              file=sys.stderr, flush=True)
    b.emit(
        "\nkdflow engine steps on the same pre-made batches: KD, CRD with the method's defaults (K = 16384 negatives "
        "drawn from the other classes' samples of a balanced training split of M samples, 128-d embeddings, two "
        "memory banks), and CRD with its scores computed on the gathered bank rows (the memory-bank gather of the "
        "reference implementations) instead of one matmul of the anchors with the whole bank. CRD runs no KD term: "
        "its extra cost over KD is the sampling of the contrast sets, the scores and the bank update. *× KD* = median "
        "step time over that of KD. Steps: " + "; ".join(notes) + ".\n"
    )
    b.emit(table(["pair", "variant", "ms / step", "img/s", "× KD (time)"], rows, "llrrr"))
    b.emit("\nTarget: CRD within 1.3 × KD. " + load_note(list(timings)) + "\n")


def reading(b: Bench) -> str:
    r = b.results
    lines = [f"## Reading ({b.label})\n"]
    for key, o in r.get("overhead", {}).items():
        met = "met" if o["step"] <= 3 else "not met"
        epoch = f"; the whole `train_epoch()` with its batching and augmentation {o['epoch']:+.1f} %" if "epoch" in o else ""
        lines.append(
            f"- **Engine overhead, {W.PAIRS[key].title} (target ≤ 3 %): {met}.** A kdflow KD step costs "
            f"{o['step']:+.1f} % ({o['abs_ms']:+.2f} ms on a {o['step_ms']:.1f} ms step) against the hand-written "
            f"loop{epoch}. Without its running sums the step is at {o['lean']:+.1f} %."
        )
    for key, c in r.get("cache", {}).items():
        met = "met" if c["cached_vs_ce"] <= 1.10 else "not met"
        gap = c["cached_ms"] - c["ce_ms"]
        lines.append(
            f"- **Teacher cache, {W.PAIRS[key].title} (target ≤ 1.10 × CE): {met}** — cached KD takes "
            f"{c['cached_vs_ce']:.3f}× the student-alone step ({gap:+.1f} ms: the cache lookup is "
            f"{c['lookup_ms']:.2f} ms, the rest is the KD loss and its backward), live KD {c['live_vs_ce']:.2f}×, so "
            f"the cache makes KD {c['live_vs_cached']:.2f}× faster."
        )
    for key, c in r.get("crd", {}).items():
        met = "met" if c["crd_vs_kd"] <= 1.3 else "not met"
        lines.append(
            f"- **CRD, {W.PAIRS[key].title} (target ≤ 1.3 × KD): {met}** — its step takes {c['crd_vs_kd']:.2f}× KD's; "
            f"with the scores on gathered bank rows {c['gather_vs_kd']:.2f}× ({c['gather_vs_crd']:.1f}× the matmul form)."
        )
    for key, res in r.get("methods", {}).items():
        ok = {m: statistics.median(v["method"]) / statistics.median(v["ce"]) for m, v in res.items() if "error" not in v}
        if not ok:
            continue
        cheap = sorted(ok, key=ok.get)
        dear = cheap[::-1][:3]
        na = [m for m, v in res.items() if "error" in v]
        lines.append(
            f"- **Methods, {key}:** the dearest relative to the student alone are "
            + ", ".join(f"`{m}` {ok[m]:.1f}×" for m in dear)
            + "; logit methods with a frozen teacher cost what the teacher's forward pass costs "
            + f"(`kd` {ok.get('kd', float('nan')):.2f}×)"
            + (f"; not applicable on this pair: {', '.join(f'`{m}`' for m in na)}" if na else "")
            + "."
        )
    for key, d in r.get("ddp", {}).items():
        lines.append(
            f"- **DDP, {key}:** 2 processes × 1 thread run the global batch {d['vs_1p2t']:.2f}× as fast as one "
            f"process with 2 threads and {d['vs_1p1t']:.2f}× as fast as one process with 1 thread (ideal 2.0)."
            + (f" The 2-thread process waited for a CPU {100 * d['wait_1p2t']:.0f} % of its time: with another job "
               "on a core, its two OpenMP threads wait for each other at every operation, so under load one thread "
               "per process is the faster set-up here." if d["wait_1p2t"] > CONTENDED else "")
        )
    if "options" in r:
        parts = [f"{n}: {v['ratio']:.2f}× time ({v['verdict']})" for n, v in r["options"].items() if v["verdict"] != "—"]
        lines.append("- **Options (Fashion-MNIST KD step):** " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


DOCS = BENCH.parent / "docs"


def resolve_device(name: str) -> torch.device:
    """`--device`: auto is cuda where torch.cuda.is_available(), else cpu; cuda without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False here (no GPU, or a CPU-only torch)")
    return torch.device(name)


def default_out(device: torch.device) -> Path:
    """docs/benchmarks.md for the CPU, docs/benchmarks-gpu.md for CUDA (the CPU tables stay where they are)."""
    return DOCS / ("benchmarks-gpu.md" if device.type == "cuda" else "benchmarks.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; outside a DDP worker, `device` is resolved to a torch.device, `out` to a Path and
    `sections` to a list."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny version (few steps, few methods, one pair)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where the models and batches live (default auto: cuda if available, else cpu)")
    ap.add_argument("--out", default=None,
                    help="the Markdown file to write (default docs/benchmarks.md on the CPU, "
                         "docs/benchmarks-gpu.md on CUDA)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"a subset of {','.join(SECTIONS)} (development)")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads for every measurement but the DDP section's (default: torch's, one per "
                         "core); on CUDA the host process's threads")
    ap.add_argument("--ddp-worker", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ddp_worker:
        return args
    try:
        args.device = resolve_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    args.out = Path(args.out) if args.out else default_out(args.device)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    return args


def device_paragraph(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "**Device: CUDA** (`--device cuda`, or `auto` where CUDA is available): models, batches and caches on the "
            "GPU named above every table, and every clock read waits for the GPU (`torch.cuda.synchronize`). The "
            "*wait for a CPU* figures and `--threads` are about the host process that launches the kernels; section 4 "
            "reports GPU memory (`torch.cuda.max_memory_allocated`), section 5 (CPU data parallelism) is skipped. The "
            "CPU figures are in `docs/benchmarks.md` (`python bench/run.py --device cpu`).\n"
        )
    return (
        "**Device: CPU** (`--device cpu`, or `auto` on a machine without CUDA). On a machine with a GPU, "
        "`python bench/run.py --device cuda` runs the same sections there and writes `docs/benchmarks-gpu.md` (its "
        "default `--out` on CUDA), leaving this file as it is.\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ddp_worker:
        W.ddp_worker(json.loads(args.ddp_worker))
        return 0
    sections = args.sections
    cfg = QUICK if args.quick else FULL
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python bench/run.py" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-") as tmp:
        b = Bench(cfg, Path(tmp), args.quick, args.device)
        b.emit(f"# Benchmarks ({b.label})\n")
        b.emit(
            f"Produced by `{command}`{' (the quick smoke-test version: few steps, few methods)' if args.quick else ''}. "
            "Every figure is a throughput or a ratio measured side by side in one process and one run: warm-up steps "
            "first and not counted, then repetitions interleaved A, B, A, B … (the order rotated every round) "
            "and the median. Inputs are random tensors of the data sets' shapes; teachers have random weights (speed "
            "and memory do not depend on the weights, except BSS's attack, see section 3). This machine is shared "
            "with other jobs, so the load average is given above every table, and a repetition during which this "
            "process waited for a CPU more than 10 % of its time is run again (within a budget; see "
            "`bench/harness.py`)."
            + (f" Intra-op threads: {torch.get_num_threads()} (`--threads`; torch's default here is "
               f"{torch.get_num_threads() if not args.threads else default_threads}, one per core): with other jobs on "
               "the machine, two-thread steps slowed down by 2–20× and scattered, one-thread steps did not (section 5 "
               "measures both on the CPU)." if args.threads else "")
            + "\n\n" + device_paragraph(b.device)
        )
        order = {"overhead": section_overhead, "cache": section_cache, "methods": section_methods, "ddp": section_ddp,
                 "options": section_options, "crd": section_crd}
        for name in SECTIONS:
            if name in sections:
                order[name](b)
                if name == "methods":
                    section_memory(b)
        b.emit(reading(b))
        b.emit(f"Total time of this run: {(time.perf_counter() - start) / 60:.1f} min, of which "
               f"{b.waited / 60:.1f} min waiting for other jobs to leave the CPUs (before a measurement starts, the "
               "benchmark waits until other processes use less than 0.3 cores, up to 60 s each time and "
               f"{b.cfg['quiet_budget_s'] // 60} min in all, and no more once a wait has run out).\n")
        if b.persistent:
            b.parts.insert(2, "**Measured under load:** other jobs kept this machine's cores busy during this run "
                              "(a 60 s wait for a quiet machine ran out), so every figure was taken while sharing the "
                              "CPUs; the *wait* figures with each table say by how much. Ratios of interleaved "
                              "repetitions share that load; absolute throughputs are lower than on an idle machine.\n")
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(b.parts))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
