"""What the benchmark runs: the two pairs, their random data, every method's graph, the engine's
training step on pre-made batches, a hand-written KD loop, and the subprocess workers.

The engine step (`EngineLoop.step`) is the body of `kdflow.engine.train.train_epoch` for one batch,
line for line, minus the augmentation (the batches are made beforehand) and the progress bar:
the per-step learning rate, the channels-last copy, the teacher-cache lookup, `Flow.forward`,
`zero_grad`, one backward, the per-node SGD steps and the running sums train_epoch keeps.

Devices: the data are made on the CPU and saved once; `load_data(..., device)` puts the dataset and
the pre-made batches on the run's device as `train` does (inputs, labels and sample indices there,
the view indices on the CPU, as `view_of` gives them), and `engine(..., device=...)` builds the flow
there (`Flow.to`) and its running sums. On CUDA every clock read waits for the device
(`harness.sync`). The CUDA path is untested until a run on a GPU.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import (CONTENDED, Timing, interleave, peak_cuda_mib, peak_rss_mib, reset_peak_cuda, reset_peak_rss,
                     rss_mib, timed, warm_up)
from torch.nn.parallel import DistributedDataParallel

from kdflow.checkpoint import model_file, save_atomic
from kdflow.data.base import ArrayDataset
from kdflow.data.loader import to_device
from kdflow.data.views import apply_views, make_view_table, view_of
from kdflow.engine.distributed import DistInfo, average_gradients, init_distributed
from kdflow.engine.evaluate import topk_correct
from kdflow.engine.schedule import lr_factor
from kdflow.engine.teacher_cache import TeacherCache
from kdflow.engine.train import AUTOCAST, make_optimizers, node_optim, seed_everything
from kdflow.flow.graph import Flow
from kdflow.flow.recipe import merge, read_yaml
from kdflow.methods.recipe import resolve
from kdflow.flow.spec import Recipe, StageSpec
from kdflow.methods import METHODS
from kdflow.models import build_model, count_parameters
from kdflow.models.cifar_resnet import CifarResNet
from kdflow.models.registry import MODELS, register_model

ROOT = Path(__file__).resolve().parent.parent

if "resnet20x4" not in MODELS:

    @register_model("resnet20x4")
    def resnet20x4(num_classes: int, input_shape: tuple[int, ...] = (3, 32, 32)) -> CifarResNet:
        """The teacher assistant of the resnet32x4 -> resnet8x4 pair (TAKD/DGKD): CIFAR ResNet-20 at ×4 width."""
        return CifarResNet(20, (32, 64, 128, 256), num_classes, input_shape[0])


# ---------------------------------------------------------------------------------------------
# the pairs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    key: str
    title: str
    files: tuple[str, ...]  # the recipe files the pair's settings come from, composed in order
    teacher: str
    student: str
    assistant: str  # TAKD / DGKD
    shape: tuple[int, ...]
    classes: int
    num_data: int  # the real training split's size (CRD's memory bank)

    def raw(self) -> dict:
        """The pair's recipe (data, batch, optimizer, schedule, channels_last) without its nodes."""
        raw: dict = {}
        for f in self.files:
            raw = merge(raw, read_yaml(ROOT / f))
        raw.pop("nodes", None)
        raw.pop("name", None)
        return raw

    @property
    def batch(self) -> int:
        return int(self.raw()["train"]["batch_size"])


PAIRS = {
    "fmnist": Pair(
        "fmnist", "Fashion-MNIST convnet_l → convnet_s (1×28×28, 10 classes)", ("recipes/fashion_mnist/pair.yaml",),
        "convnet_l", "convnet_s", "convnet_m", (1, 28, 28), 10, 60_000,
    ),
    "cifar": Pair(
        "cifar", "CIFAR-100 resnet32x4 → resnet8x4 (3×32×32, 100 classes)",
        ("recipes/cifar100/protocol.yaml", "recipes/cifar100/pairs/resnet32x4-resnet8x4.yaml"),
        "resnet32x4", "resnet8x4", "resnet20x4", (3, 32, 32), 100, 50_000,
    ),
}

# methods whose distillation runs in a stage other than the first: the stage measured
MEASURED_STAGE = {
    "ab": "init",  # AB's distillation is its init stage; its main stage is CE only
    "fsp": "init",  # likewise FSP
    "annealing_kd": "anneal",  # the finetune stage is CE only
    "ft": "main",  # after the paraphrase stage (which trains the paraphraser only)
    "takd": "student",  # the student's link of the chain (the assistant frozen, trained in stage 1)
    "dgkd": "student",  # the student guided by the teacher and the assistant
    "born_again": "gen1",  # the first generation (resnet32x4 learning from a resnet32x4)
}


def method_graph(pair: Pair, method: str, ckpts: dict[str, str]) -> tuple[dict, dict, str]:
    """(nodes, method entry, stage measured) for `method` on `pair`, with the nodes it needs."""
    teacher = {"arch": pair.teacher, "checkpoint": ckpts["teacher"]}
    student = {"arch": pair.student}
    entry: dict | str = method
    if method in ("ce", "label_smoothing", "tfkd_reg"):
        nodes = {"student": student}
    elif method == "dml":
        nodes = {"student": student, "peer": {"arch": pair.student}}
        entry = {"name": "dml", "peers": ["student", "peer"]}
    elif method in ("takd", "dgkd"):
        nodes = {"teacher": teacher, "assistant": {"arch": pair.assistant}, "student": student}
    elif method == "multi_teacher":
        nodes = {"teacher1": teacher, "teacher2": {"arch": pair.teacher, "checkpoint": ckpts["teacher2"]}, "student": student}
    elif method == "born_again":
        nodes = {"gen0": teacher}
    elif method == "tfkd_self":  # the self-teacher: a trained model of the student's own architecture
        nodes = {"teacher": {"arch": pair.student, "checkpoint": ckpts["self"]}, "student": student}
    else:
        nodes = {"teacher": teacher, "student": student}
    return nodes, entry, MEASURED_STAGE.get(method, "main")


def nodes_text(recipe: Recipe, stage: StageSpec) -> str:
    used = [n for n in recipe.nodes if recipe.is_used(n, stage)]
    return ", ".join(f"{n} ({recipe.nodes[n].arch}{'' if n in stage.train else ', frozen'})" for n in used)


def make_checkpoints(pair: Pair, directory: Path) -> dict[str, str]:
    """Random-weight checkpoints: the teacher, a second teacher (multi_teacher) and a self-teacher (tfkd_self)."""
    out = {}
    for key, arch, seed in (("teacher", pair.teacher, 101), ("teacher2", pair.teacher, 102), ("self", pair.student, 103)):
        path = directory / f"{pair.key}-{key}.pt"
        if not path.exists():
            torch.manual_seed(seed)
            model = build_model(arch, pair.classes, pair.shape)
            save_atomic(model_file(arch, {}, pair.classes, pair.shape, model.state_dict()), path)
        out[key] = str(path)
    return out


# ---------------------------------------------------------------------------------------------
# data: random uint8 images, their view-table augmentation, pre-made batches
# ---------------------------------------------------------------------------------------------


def make_data(pair: Pair, num_batches: int, ckpts: dict[str, str], path: Path) -> Path:
    """`num_batches` global batches of random images, augmented as view 0 of the engine's view table (so a
    teacher cache built from the same table holds exactly these inputs' logits). Labels are the random
    teacher's own top-1, so that BSS finds a full batch of correctly classified samples to attack, as it
    would with a trained teacher."""
    raw = pair.raw()
    bs, seed = int(raw["train"]["batch_size"]), int(raw.get("seed", 0))
    aug = raw["data"].get("augment", {})
    n = num_batches * bs
    g = torch.Generator().manual_seed(1234)
    x = torch.randint(0, 256, (n, *pair.shape), dtype=torch.uint8, generator=g)
    mean, std = (0.5,) * pair.shape[0], (0.25,) * pair.shape[0]
    # the table `_stage_views_and_caches` makes for train.views = 1
    table = make_view_table(n, 1, len(pair.shape) - 1, aug.get("crop_padding", 0), aug.get("flip", False), seed)
    teacher = build_model(pair.teacher, pair.classes, pair.shape)
    teacher.load_state_dict(torch.load(ckpts["teacher"], weights_only=True)["state_dict"])
    teacher.eval()
    order = torch.randperm(n, generator=g)
    y = torch.zeros(n, dtype=torch.long)
    batches = []
    for start in range(0, n, bs):
        idx = order[start : start + bs]
        view = view_of(table, idx, 0)
        xb = apply_views(x[idx], idx, view, table, mean, std)
        with torch.inference_mode():
            y[idx] = teacher(xb).argmax(dim=1)
        batches.append([xb, y[idx].clone(), idx, view])
    torch.save({"x": x, "y": y, "mean": list(mean), "std": list(std), "batches": batches}, path)
    return path


@dataclass
class PairData:
    ds: ArrayDataset
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def batches_on(batches: list, device: torch.device | str) -> list:
    """Pre-made (x, y, sample indices, views) batches with x, y and the indices on `device`, the views on the CPU
    (where `train_epoch` has them: `batches` yields indices on the data's device, `view_of` gives CPU views).
    Tensors already there are not copied."""
    return [(x.to(device), y.to(device), idx.to(device), view) for x, y, idx, view in batches]


def load_data(pair: Pair, path: str | Path, device: torch.device | str = "cpu") -> PairData:
    """The saved data set and batches, on `device` (`to_device` for the data set, as `train` does)."""
    d = torch.load(path, weights_only=True)
    ds = ArrayDataset(pair.key, d["x"], d["y"], pair.classes, tuple(d["mean"]), tuple(d["std"]))
    return PairData(to_device(ds, torch.device(device)), batches_on([tuple(b) for b in d["batches"]], device))


# ---------------------------------------------------------------------------------------------
# the engine's step, and a hand-written KD step
# ---------------------------------------------------------------------------------------------


def build_recipe(pair: Pair, method: str, ckpts: dict[str, str], overrides: dict | None = None) -> tuple[Recipe, str]:
    nodes, entry, stage = method_graph(pair, method, ckpts)
    raw = merge(pair.raw(), {"name": f"bench-{pair.key}-{method}", "nodes": nodes, "method": entry})
    raw = merge(raw, overrides or {})
    return resolve(raw, f"bench {pair.key} {method}"), stage


def build_flow(recipe: Recipe, pair: Pair, sample: torch.Tensor, stage_name: str,
               device: torch.device | str = "cpu") -> tuple[Flow, StageSpec]:
    """The flow as `kdflow.engine.train.train` builds it (seeded, built from a CPU sample, moved to `device`,
    channels_last and precision from the recipe)."""
    seed_everything(recipe.seed)
    # a balanced training split's labels (CRD draws its negatives from the other classes' samples)
    labels = torch.arange(pair.num_data) % pair.classes
    flow = Flow(recipe, pair.classes, pair.shape, sample.cpu(), num_data=pair.num_data, train_labels=labels)
    flow = flow.to(device)
    if recipe.train.channels_last and sample.dim() == 4:
        flow = flow.to(memory_format=torch.channels_last)
    flow.autocast_dtype = AUTOCAST[recipe.train.precision]
    stages = {s.name: s for s in flow.stages}
    if stage_name not in stages:
        stage_name = flow.stages[0].name
    stage = stages[stage_name]
    flow.set_stage_modes(stage)
    return flow, stage


class EngineLoop:
    """`train_epoch`'s per-batch work on pre-made (already augmented) global batches, on `device` (the flow must
    be there already; the batches are put there, see `batches_on`)."""

    def __init__(
        self,
        flow: Flow,
        recipe: Recipe,
        stage: StageSpec,
        batches: list,
        caches: dict[str, TeacherCache] | None = None,
        epoch: int = 0,
        bookkeeping: bool = True,
        dist_info: DistInfo | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.flow, self.recipe, self.stage, self.batches = flow, recipe, stage, batches_on(batches, self.device)
        self.caches = caches or {}
        self.epoch, self.bookkeeping, self.dist_info = epoch, bookkeeping, dist_info or DistInfo()
        self.optimizers = make_optimizers(flow, recipe, stage)
        self.base_lr = {n: node_optim(recipe, n).lr for n in stage.train}
        self.helper_params = [p for n in stage.train for h in flow.helpers_of(n) for p in h.parameters()]
        self.sums = {"total": torch.zeros((), device=self.device)}
        self.correct = {n: torch.zeros((), dtype=torch.long, device=self.device) for n in stage.train}
        self.ce_sum = {n: torch.zeros((), device=self.device) for n in stage.train}
        self.term_sums: dict[str, torch.Tensor] = {}
        self.seen = 0
        self.i = 0
        self.last = None

    def step(self) -> None:
        flow, recipe, stage, device = self.flow, self.recipe, self.stage, self.device
        steps = len(self.batches)
        step = self.i % steps
        xb, yb, idx, view = self.batches[step]
        self.i += 1
        factor = lr_factor(recipe.train.schedule, self.epoch + (step + 1) / steps, stage.epochs)
        for node, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["lr"] = self.base_lr[node] * factor
        x = xb
        if self.dist_info.enabled:
            part = self.dist_info.shard(yb.shape[0])
            x, yb, idx, view = x[part], yb[part], idx[part], view[part]
        if recipe.train.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        cached = {f"{n}.logits": c.lookup(idx, view, device) for n, c in self.caches.items()}
        out = flow(x, yb, stage, self.epoch, idx, cached)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        out.total.backward()
        if self.dist_info.enabled:
            average_gradients(self.helper_params, self.dist_info.world)
        for opt in self.optimizers.values():
            opt.step()
        if self.bookkeeping:
            n = yb.shape[0]
            self.seen += n
            with torch.no_grad():
                self.sums["total"] += out.total.detach() * n
                for node in stage.train:
                    self.correct[node] += topk_correct(out.logits[node].detach(), yb, 1)
                    self.ce_sum[node] += out.node_ce[node].detach() * n
                for label, value in out.terms.items():
                    self.term_sums[label] = self.term_sums.get(label, 0) + value.detach() * n
        self.last = out


class HandKD:
    """Hinton KD written by hand in plain PyTorch: the same models (copies, same weights), batches, loss
    (0.1·CE + 0.9·τ²·KL at τ = 4), SGD settings and per-step learning rate, the teacher in eval mode
    under inference mode, and a running loss sum (what any training script keeps for its log)."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, recipe: Recipe, stage: StageSpec, batches: list,
                 temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9) -> None:
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.student = copy.deepcopy(student).train().requires_grad_(True)
        o = recipe.train.optim
        self.opt = torch.optim.SGD(self.student.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                   nesterov=o.nesterov)
        self.base_lr, self.schedule, self.epochs = o.lr, recipe.train.schedule, stage.epochs
        self.channels_last = recipe.train.channels_last
        self.batches, self.i = batches, 0
        self.T, self.a, self.b = temperature, ce_weight, kd_weight
        self.loss_sum = torch.zeros((), device=next(self.student.parameters()).device)

    def lr(self, epoch: float) -> float:
        s = self.schedule
        if s.kind == "cosine":
            return self.base_lr * 0.5 * (1 + math.cos(math.pi * min(epoch / self.epochs, 1.0)))
        if s.kind == "multistep":
            return self.base_lr * s.gamma ** sum(int(epoch) >= m for m in s.milestones)
        return self.base_lr

    def step(self) -> None:
        steps = len(self.batches)
        x, y, _, _ = self.batches[self.i % steps]
        self.i += 1
        self.step_on(x, y, (self.i % steps or steps) / steps)

    def step_on(self, x: torch.Tensor, y: torch.Tensor, epoch: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.lr(epoch)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            t = self.teacher(x)
        s = self.student(x)
        T = self.T
        kl = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), reduction="batchmean", log_target=True)
        loss = self.a * F.cross_entropy(s, y) + self.b * T * T * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.loss_sum += loss.detach() * y.shape[0]


def engine(pair: Pair, method: str, ckpts: dict[str, str], data: PairData, overrides: dict | None = None,
           dist_info: DistInfo | None = None, device: torch.device | str = "cpu", **loop_args) -> EngineLoop:
    dist_info = dist_info or DistInfo()
    recipe, stage_name = build_recipe(pair, method, ckpts, overrides)
    flow, stage = build_flow(recipe, pair, data.batches[0][0][:2], stage_name, device)
    if dist_info.enabled:  # as `train` does: trainable nodes through DDP, frozen ones not
        flow.runners = {n: DistributedDataParallel(flow.models[n]) for n in stage.train}
    return EngineLoop(flow, recipe, stage, data.batches, dist_info=dist_info, device=device, **loop_args)


def weights_mib(loop: EngineLoop) -> float:
    return sum(p.numel() * p.element_size() for p in loop.flow.parameters()) / 2**20


# ---------------------------------------------------------------------------------------------
# workers: one method in a fresh process (throughput + peak memory); the DDP worker
# ---------------------------------------------------------------------------------------------


def method_worker(spec: dict) -> dict:
    """In a fresh process: build `method` and the student alone (CE) on spec["device"], measure the peak memory
    growth over the method's first steps, then time method and CE interleaved.

    Order: method warm-up ×w, method rep 1 [peak memory read here], CE warm-up ×w, CE rep 1, then (method, CE)
    reps 2..R. The baseline is taken after both flows are built and before the first step, so the
    growth holds what training adds: activations and autograd buffers, gradients, optimizer state,
    helper state and the kernels' scratch; the weights are in the baseline (reported separately).
    On the CPU the memory is the process's resident set (VmHWM); on CUDA it is the device's
    torch.cuda.max_memory_allocated (peak mark reset at the baseline)."""
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    pair = PAIRS[spec["pair"]]
    data = load_data(pair, spec["data"], device)
    try:
        m = engine(pair, spec["method"], spec["ckpts"], data, device=device)
    except Exception as e:  # noqa: BLE001 — a method that does not apply to this pair (FSP's channel counts, say)
        return {"error": str(e).splitlines()[0]}
    ce = engine(pair, "ce", spec["ckpts"], data, device=device)
    info = {"stage": m.stage.name, "nodes": nodes_text(m.recipe, m.stage), "weights_mib": weights_mib(m),
            "params": {n: count_parameters(mod) for n, mod in m.flow.models.items()}}
    gc.collect()
    if cuda:
        base, reset_ok = reset_peak_cuda(device), True
    else:
        base, reset_ok = rss_mib(), reset_peak_rss()
    w, reps, k = spec["warmup"], spec["reps"], spec["steps"]
    mt, ct = Timing("method"), Timing("ce")
    mt.warmup_s += warm_up(m.step, w, device)
    first_m = timed(m.step, k, device)  # the memory window: the warm-up steps and this repetition
    peak = peak_cuda_mib(device) if cuda else peak_rss_mib()
    ct.warmup_s += warm_up(ce.step, w, device)
    first_c = timed(ce.step, k, device)
    discarded = 0
    budget = spec.get("max_discard", reps)
    if max(first_m[1], first_c[1]) > CONTENDED and budget > 0:
        discarded = 1
    else:
        for t, (sec, wait) in ((mt, first_m), (ct, first_c)):
            t.reps.append(sec)
            t.wait.append(wait)
    rest = interleave({"method": m.step, "ce": ce.step}, 0, reps - len(mt.reps), k, max_discard=budget - discarded,
                      reverse_first=True, device=device)  # the next round: CE first
    for t, name in ((mt, "method"), (ct, "ce")):
        t.reps += rest[name].reps
        t.wait += rest[name].wait
    return {**info, "method": mt.reps, "ce": ct.reps, "wait": mt.wait + ct.wait,
            "discarded": discarded + rest["method"].discarded, "warmup": mt.warmup_s, "ce_warmup": ct.warmup_s,
            "memory": "cuda_allocated" if cuda else "rss", "mem_base_mib": base, "mem_peak_mib": peak,
            "mem_growth_mib": peak - base, "peak_reset": reset_ok}


def child_entry(spec: dict, conn) -> None:
    """Target of a forkserver process: run a worker, send its result (or its error) back."""
    try:
        result = WORKERS[spec["worker"]](spec)
    except Exception as e:  # noqa: BLE001 (reported to the parent)
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "trace": traceback.format_exc()}
    conn.send(result)
    conn.close()


WORKERS = {"method": method_worker}


def ddp_worker(spec: dict) -> None:
    """Under torch.distributed.run (or alone): the KD engine step on each process's shard of the same global
    batches; rank 0 prints the per-step seconds of each repetition, timed inside the worker (start-up,
    rendezvous and building excluded). DDP's gradient all-reduce in every backward keeps the ranks in step."""
    torch.set_num_threads(spec["threads"])
    info = init_distributed()
    pair = PAIRS[spec["pair"]]
    data = load_data(pair, spec["data"])
    loop = engine(pair, "kd", spec["ckpts"], data, dist_info=info)
    for _ in range(spec["warmup"]):
        loop.step()
    if info.enabled:
        torch.distributed.barrier()
    reps, waits = [], []
    for _ in range(spec["reps"]):
        sec, wait = timed(loop.step, spec["steps"])
        reps.append(sec)
        waits.append(wait)
    if info.enabled:  # the largest wait over the ranks, per repetition
        w = torch.tensor(waits, dtype=torch.float64)
        torch.distributed.all_reduce(w, op=torch.distributed.ReduceOp.MAX)
        waits = w.tolist()
        torch.distributed.barrier()
    if info.main:
        print("BENCH_RESULT " + json.dumps({"reps": reps, "waits": waits, "world": info.world,
                                            "threads": torch.get_num_threads()}))
        sys.stdout.flush()
    if info.enabled:
        torch.distributed.destroy_process_group()
        # Leave without running destructors: freeing the DDP reducer (which holds the gloo process group) while
        # gloo's run-loop thread waits for the GIL to free its last work object deadlocks now and then (seen here:
        # the result printed, then the worker hung for good, and its launch with it). Every collective is done.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_threads(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


__all__ = ["METHODS", "PAIRS", "EngineLoop", "HandKD", "engine", "load_data", "make_checkpoints", "make_data"]
