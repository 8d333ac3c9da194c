"""The training engine: one loop for every recipe, stage after stage.

Per step: every node the stage needs runs once (frozen ones under inference mode), the flow
sums supervision and transfers into one loss, one backward pass, one optimizer step per
training node. Per epoch: every training node is evaluated on the test split (and on the validation split when
`data.validation` holds one out), metrics are appended to `metrics.jsonl`, and `last.pt`
(everything needed to resume) is written atomically, with `best-NODE.pt` when a node's
validation top-1 improves (never chosen on the test split). A resumed run continues from `last.pt`
and ends with the same weights and metrics as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kdflow.checkpoint import load_safe, model_file, remove_stray_temps, save_atomic
from kdflow.data import ArrayDataset, load_dataset
from kdflow.data.augment import augment_batch
from kdflow.data.base import DatasetError
from kdflow.data.corrupt import NOISE, imbalance_indices
from kdflow.data.loader import batches, load_inputs, num_batches, seeded_generator, select, stratified_split, subset, to_device
from kdflow.data.views import ViewTable, apply_views, make_view_table, view_of
from kdflow.engine import dot
from kdflow.engine.distributed import DistInfo, all_reduce_sum, average_gradients, init_distributed, sync_buffers
from kdflow.engine.evaluate import evaluate, evaluate_ensemble, topk_correct
from kdflow.engine.nonfinite import StepGuard, check_evaluation, check_state
from kdflow.engine.report import summarize, summary_table
from kdflow.engine.rundir import (
    append_jsonl,
    environment,
    read_jsonl,
    write_text_atomic,
)
from kdflow.engine.schedule import lr_factor
from kdflow.engine.settled import check_unchanged, restore_settled, settled_files, without_settled
from kdflow.engine.sync_bn import convert_batch_norms
from kdflow.engine.teacher_cache import TeacherCache, state_hash
from kdflow.flow.errors import RecipeError
from kdflow.flow.graph import Flow, FlowOutput
from kdflow.flow.recipe import dump_recipe
from kdflow.methods.recipe import resolve
from kdflow.flow.spec import OptimSpec, Recipe, StageSpec
from kdflow.models import count_parameters


@dataclass
class EpochEnd:
    """What a callback sees after each epoch (after the checkpoint is written)."""

    stage_index: int
    stage: str
    epoch: int  # 1-based, within the stage
    records: list[dict]


def pick_device(name: str, dist_info: DistInfo = DistInfo()) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist_info.enabled:
        return torch.device("cuda", dist_info.local_rank)
    return torch.device(name)


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(np.random.get_state()[1].tolist()),
        "numpy_pos": np.random.get_state()[2],
        "python": json.dumps(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(json.loads(state["numpy"]), dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(json.loads(state["python"])), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_data(recipe: Recipe) -> tuple[ArrayDataset, ArrayDataset | None, ArrayDataset, dict]:
    """The training, validation (None without `data.validation`) and test splits after `limit`, imbalance
    and label noise (training split only; the validation split is held out of it afterwards, so it carries
    the same corruption), and a record of what was done: per-class counts, the realised noise rate and mask."""
    d = recipe.data
    try:
        train = load_dataset(d.name, "train", d.root, **d.options)
        test = load_dataset(d.name, "test", d.root, **d.options)
    except DatasetError as e:
        raise RecipeError(f"data: {e}") from None
    except TypeError as e:
        raise RecipeError(f"data.options: {e}") from None
    record: dict = {}
    skipped = {split: getattr(ds.x, "skipped", []) for split, ds in (("train", train), ("test", test))}
    if any(skipped.values()):  # image files that do not decode, left out under data.options.bad_images: skip
        record["skipped_images"] = {split: [{"file": f, "problem": why} for f, why in bad] for split, bad in skipped.items()}
    train, test = subset(train, d.limit, recipe.seed), subset(test, d.test_limit, recipe.seed + 1)
    if d.imbalance is not None:
        keep = imbalance_indices(train.y, train.num_classes, d.imbalance.kind, d.imbalance.ratio, d.imbalance.seed)
        train = select(train, keep)
    record["train_class_counts"] = torch.bincount(train.y, minlength=train.num_classes).tolist()
    if d.noise is not None:
        try:
            noisy, mask = NOISE[d.noise.kind](train.y, train.num_classes, d.noise.rate, d.noise.seed)
        except ValueError as e:
            raise RecipeError(f"data.noise: {e}") from None
        record["noise"] = {**d.noise.model_dump(), "realised_rate": float(mask.float().mean()), "flipped": int(mask.sum())}
        record["noise_mask"] = mask
        record["clean_labels"] = train.y
        train = replace(train, y=noisy)
        record["train_noisy_class_counts"] = torch.bincount(noisy, minlength=train.num_classes).tolist()
    val = None
    if d.validation is not None:
        clean = record.get("clean_labels", train.y)
        try:
            keep, held = stratified_split(clean, d.validation.size, train.num_classes, d.validation.seed)
        except ValueError as e:
            raise RecipeError(f"data.validation: {e}") from None
        val, train = select(train, held), select(train, keep)
        record["validation"] = {
            **d.validation.model_dump(),
            "samples": len(held),
            "class_counts": torch.bincount(clean[held], minlength=train.num_classes).tolist(),
        }
        if "noise_mask" in record:
            record["validation"]["noisy_labels"] = int(record["noise_mask"][held].sum())
            record["noise_mask"], record["clean_labels"] = record["noise_mask"][keep], clean[keep]
        record["train_class_counts"] = torch.bincount(clean[keep], minlength=train.num_classes).tolist()
        if d.noise is not None:
            record["train_noisy_class_counts"] = torch.bincount(train.y, minlength=train.num_classes).tolist()
    record["test_class_counts"] = torch.bincount(test.y, minlength=test.num_classes).tolist()
    return train, val, test, record


def write_data_record(out: Path, record: dict) -> None:
    """data.json (counts, noise summary) and, with noise, corruption.pt (the mask and the clean labels)."""
    summary = {k: v for k, v in record.items() if not isinstance(v, torch.Tensor)}
    write_text_atomic(out / "data.json", json.dumps(summary, indent=2) + "\n")
    if "noise_mask" in record:
        save_atomic({"noise_mask": record["noise_mask"], "clean_labels": record["clean_labels"]}, out / "corruption.pt")


def node_optim(recipe: Recipe, node: str) -> OptimSpec:
    base = recipe.train.optim.model_dump()
    override = recipe.nodes[node].optim
    if override is not None:
        base.update({k: v for k, v in override.model_dump().items() if v is not None})
    return OptimSpec(**base)


def make_optimizers(flow: Flow, recipe: Recipe, stage: StageSpec) -> dict[str, torch.optim.SGD]:
    optimizers = {}
    for node in stage.train:
        o = node_optim(recipe, node)
        if o.name == "dot":  # two momenta, for the supervised and the distillation gradient (engine/dot.py)
            optimizers[node] = dot.DOT(flow.parameters_of(node), lr=o.lr, momentum=o.momentum, delta=o.delta,
                                       weight_decay=o.weight_decay)
            continue
        optimizers[node] = torch.optim.SGD(
            flow.parameters_of(node), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
        )
    return optimizers


def save_node(flow: Flow, recipe: Recipe, node: str, ds: ArrayDataset, path: Path, **meta) -> None:
    spec = recipe.nodes[node]
    data = {"dataset": recipe.data.name, "root": recipe.data.root, "options": recipe.data.options}
    sd = {k: v.detach().cpu() for k, v in flow.models[node].state_dict().items()}
    save_atomic(model_file(spec.arch, spec.args, ds.num_classes, ds.input_shape, sd, node=node, data=data, **meta), path)


class Progress:
    """A tqdm bar over one epoch's steps with loss, accuracy and images per second; quiet when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, disable=not enabled)
        self.enabled = enabled

    def update(self, steps: int, postfix: dict[str, str]) -> None:
        if self.enabled:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()


def train_epoch(
    flow: Flow,
    recipe: Recipe,
    stage: StageSpec,
    stage_index: int,
    epoch: int,
    train_set: ArrayDataset,
    optimizers: dict[str, torch.optim.SGD],
    progress: bool,
    dist_info: DistInfo = DistInfo(),
    scaler: torch.amp.GradScaler | None = None,
    views: ViewTable | None = None,
    caches: dict[str, TeacherCache] | None = None,
) -> dict:
    """One pass over the training split; returns per-node training loss/accuracy and per-term means.

    Under several processes each takes its shard of every global batch; the sums are reduced at the end.
    With `views`, each sample is augmented as its view of this epoch, and nodes in `caches` are not run:
    their logits for (sample, view) are read from the cache. A step with a non-finite loss, gradient or
    batch-norm statistic stops the run or is skipped (`train.on_nonfinite`; engine/nonfinite.py); skipped
    steps count in `nonfinite_steps` and not in the epoch's sums."""
    bs = recipe.train.batch_size
    steps = num_batches(len(train_set), bs, shuffled=True)
    order_gen = seeded_generator(recipe.seed, stage_index, epoch, 0)
    aug_gen = seeded_generator(recipe.seed, stage_index, epoch, 1)
    aug = recipe.data.augment
    base_lr = {n: node_optim(recipe, n).lr for n in stage.train}
    device = train_set.y.device
    sums = {"total": torch.zeros((), device=device)}
    correct = {n: torch.zeros((), dtype=torch.long, device=device) for n in stage.train}
    ce_sum = {n: torch.zeros((), device=device) for n in stage.train}
    term_sums: dict[str, torch.Tensor] = {}
    seen = 0
    helper_params = [p for n in stage.train for h in flow.helpers_of(n) for p in h.parameters()]
    synced = [flow.models[n] for n in stage.train] + [h for n in stage.train for h in flow.helpers_of(n)]
    guard = StepGuard(flow, list(stage.train), optimizers, recipe.train.on_nonfinite, stage.name, epoch + 1,
                      scaler is not None, dist_info)
    bar = Progress(steps, f"{stage.name} {epoch + 1}/{stage.epochs}", progress)
    start = time.perf_counter()
    last_update = 0
    crop_gen = seeded_generator(recipe.seed, stage_index, epoch, 2)  # a lazy source's crops, drawn ahead of the steps
    for step, (xb, yb, idx) in enumerate(batches(train_set, bs, order_gen, crop_gen)):
        factor = lr_factor(recipe.train.schedule, epoch + (step + 1) / steps, stage.epochs)
        for node, opt in optimizers.items():
            for group in opt.param_groups:
                group["lr"] = base_lr[node] * factor
        # the whole global batch is augmented, so every process draws what a single process would
        if views is not None:
            view = view_of(views, idx, epoch)
            x = apply_views(xb, idx, view, views, train_set.mean, train_set.std)
        else:
            x = augment_batch(xb, train_set.mean, train_set.std, crop_padding=aug.crop_padding, flip=aug.flip, generator=aug_gen)
        global_n, global_idx = yb.shape[0], idx
        if dist_info.enabled:
            part = dist_info.shard(yb.shape[0])
            x, yb, idx = x[part], yb[part], idx[part]
            view = view[part] if views is not None else None
        if recipe.train.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        cached = {f"{n}.logits": c.lookup(idx, view, device) for n, c in (caches or {}).items()}
        share = yb.shape[0] * dist_info.world / global_n if dist_info.enabled else 1.0
        skipped = sum(guard.skipped.values())
        if stage.updates == "alternating":  # one node after another, each from a fresh forward (DML)
            after = (lambda: average_gradients(helper_params, dist_info.world)) if dist_info.enabled else None
            out = alternating_step(flow, stage, x, yb, epoch, idx, cached, optimizers, scaler, after, share,
                                   guard, step + 1)
        elif recipe.train.optim.name == "dot":  # two backward passes, one step (engine/dot.py)
            guard.snapshot()
            out = flow(x, yb, stage, epoch, idx, cached)
            dot.backward_and_step(out, dot.supervised_labels(recipe, stage), optimizers,
                                  lambda: guard.ok(out.total, list(stage.train), step + 1, out))
        else:
            guard.snapshot()
            out = flow(x, yb, stage, epoch, idx, cached)
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            loss = out.total
            if share != 1.0:
                # uneven shards: weighting each rank's mean by its share makes the ranks' average gradient the global mean's
                loss = loss * share
            (scaler.scale(loss) if scaler else loss).backward()
            if dist_info.enabled:
                average_gradients(helper_params, dist_info.world)
            if guard.ok(out.total, list(stage.train), step + 1, out):
                for opt in optimizers.values():
                    scaler.step(opt) if scaler else opt.step()
        if dist_info.enabled:
            sync_buffers(synced, global_idx, dist_info)
        skipped = sum(guard.skipped.values()) - skipped
        if scaler and skipped < len(stage.train):  # the scaler updates after at least one of its steps
            scaler.update()
        if skipped:
            continue  # a skipped step's values are not finite: left out of the epoch's sums
        n = yb.shape[0]
        seen += n
        with torch.no_grad():
            sums["total"] += out.total.detach() * n
            for node in stage.train:
                correct[node] += topk_correct(out.logits[node].detach(), yb, 1)
                ce_sum[node] += out.node_ce[node].detach() * n
            for label, value in out.terms.items():
                term_sums[label] = term_sums.get(label, 0) + value.detach() * n
        if progress and (step + 1 - last_update >= 20 or step + 1 == steps):
            rate = seen / max(time.perf_counter() - start, 1e-9)
            postfix = {"loss": f"{sums['total'].item() / seen:.3f}"}
            postfix.update({node: f"{100 * correct[node].item() / seen:.1f}%" for node in stage.train})
            postfix["img/s"] = f"{rate:.0f}"
            bar.update(step + 1 - last_update, postfix)
            last_update = step + 1
    bar.close()
    elapsed = time.perf_counter() - start
    if dist_info.enabled:
        seen_t = torch.tensor(float(seen), device=device)
        labels = sorted(term_sums)
        all_reduce_sum([seen_t, sums["total"], *correct.values(), *ce_sum.values(), *(term_sums[k] for k in labels)])
        seen = int(seen_t.item())
    return {
        "seen": seen,
        "elapsed": elapsed,
        "total": sums["total"].item() / max(seen, 1),
        "train_top1": {n: 100.0 * correct[n].item() / max(seen, 1) for n in stage.train},
        "train_ce": {n: ce_sum[n].item() / max(seen, 1) for n in stage.train},
        "terms": {k: float(v.item()) / max(seen, 1) for k, v in term_sums.items()},
        "lr": {n: optimizers[n].param_groups[0]["lr"] for n in stage.train},
        "nonfinite_steps": dict(guard.skipped),
    }


def alternating_step(
    flow: Flow,
    stage: StageSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    epoch: int,
    idx: torch.Tensor,
    cached: dict[str, torch.Tensor] | None,
    optimizers: dict[str, torch.optim.SGD],
    scaler: torch.amp.GradScaler | None = None,
    after_backward: Callable[[], None] | None = None,
    loss_scale: float = 1.0,
    guard: StepGuard | None = None,
    step: int = 0,
) -> FlowOutput:
    """One batch of a stage with ``updates: alternating`` (Zhang et al. 2018, Deep Mutual Learning, Algorithm 1):
    the stage's training nodes, in order, each take a forward pass of every node (the others without gradient,
    so the nodes updated before it are seen with their new weights), a backward pass of their own losses and
    their own optimizer step. Returns the passes merged for the running sums: each node's logits, CE and terms
    from its own pass, and the sum of the nodes' losses. With `guard`, each node's step (1-based `step`) is
    checked for non-finite values before it is taken (engine/nonfinite.py)."""
    merged: FlowOutput | None = None
    for node in stage.train:
        if guard is not None:
            guard.snapshot()
        out = flow(x, y, stage, epoch, idx, cached, only=node)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss = out.total * loss_scale if loss_scale != 1.0 else out.total
        (scaler.scale(loss) if scaler else loss).backward()
        if after_backward is not None:
            after_backward()
        if guard is None or guard.ok(out.total, [node], step, out):
            scaler.step(optimizers[node]) if scaler else optimizers[node].step()
        if merged is None:
            merged = FlowOutput(total=out.total.detach())
        else:
            merged.total = merged.total + out.total.detach()
        merged.logits[node], merged.node_ce[node] = out.logits[node].detach(), out.node_ce[node].detach()
        merged.terms.update(out.terms)
        merged.weights.update(out.weights)
        merged.dropped += out.dropped
    assert merged is not None
    return merged


def _check_resumable(out: Path, recipe: Recipe, resume: bool) -> None:
    last = out / "last.pt"
    if resume and not last.exists():
        raise RecipeError(f"--resume: {out} holds no last.pt to resume from")
    if not resume and last.exists():
        raise RecipeError(f"--out {out}: holds a run already; pass --resume to continue it, or choose another --out")
    if resume and (out / "recipe.yaml").exists() and not _same_recipe(out / "recipe.yaml", recipe):
        raise RecipeError(f"--resume: the recipe differs from {out / 'recipe.yaml'}; resume with the run's own recipe")


def _same_recipe(path: Path, recipe: Recipe) -> bool:
    """Whether the run's recipe.yaml holds `recipe`: the same text, or the same recipe once read back (a file
    written before a field was added lacks that field at its default)."""
    text = path.read_text()
    if text == dump_recipe(recipe):
        return True
    try:
        return dump_recipe(resolve(yaml.safe_load(text), str(path))) == dump_recipe(recipe)
    except (RecipeError, yaml.YAMLError):
        return False


def _check_batch_size(recipe: Recipe, train_set: ArrayDataset) -> None:
    """A batch larger than the training split (known once the data is loaded) cannot be what was meant."""
    n, bs = len(train_set), recipe.train.batch_size
    if bs > n:
        raise RecipeError(
            f"train.batch_size: {bs} is larger than the training split ({n} samples after data.limit, imbalance "
            "and validation); lower it, e.g. --set train.batch_size=N"
        )


def _stage_views_and_caches(
    flow: Flow, recipe: Recipe, stage: StageSpec, train_set: ArrayDataset, dist_info: DistInfo, progress: bool, log
) -> tuple[ViewTable | None, dict[str, TeacherCache]]:
    """The stage's view table (when views or the teacher cache are on) and a valid cache per cacheable teacher."""
    spec = recipe.train
    if spec.views is None and not spec.teacher_cache.enabled:
        return None, {}
    aug = recipe.data.augment
    n_views = spec.views or max(stage.epochs, 1)
    spatial = len(train_set.input_shape) - 1
    table = make_view_table(len(train_set), n_views, spatial, aug.crop_padding, aug.flip, recipe.seed)
    caches: dict[str, TeacherCache] = {}
    if not spec.teacher_cache.enabled:
        return table, caches
    directory = Path(spec.teacher_cache.dir or os.environ.get("KDFLOW_CACHE", ".kdflow-cache"))
    data = recipe.data.model_dump(mode="json", exclude={"noise"})  # noise changes labels, not inputs
    for node in flow.cacheable_nodes(stage):
        key = {"teacher": state_hash(flow.models[node]), "data": data, "n": len(train_set), "views": n_views,
               "seed": recipe.seed, "dtype": spec.teacher_cache.dtype, "topk": spec.teacher_cache.topk}
        cache = TeacherCache(directory, key, train_set.num_classes, spec.teacher_cache.dtype, spec.teacher_cache.topk)
        if dist_info.main:
            status = cache.open()
            if status != "ok":
                if status == "corrupted":
                    log(f"teacher cache {cache.meta_path}: checksum mismatch, rebuilding it")
                cache.build(flow.models[node], train_set, table, spec.eval_batch_size, progress, log)
        if dist_info.enabled:
            torch.distributed.barrier()
            if not dist_info.main and cache.open() != "ok":
                raise RuntimeError(f"teacher cache {cache.meta_path} not readable on rank {dist_info.rank}")
        caches[node] = cache
    return table, caches


def _write_run_header(out: Path, recipe: Recipe, device: torch.device, resume: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "nodes"):  # what an interrupted atomic write left behind
        if folder.is_dir():
            remove_stray_temps(folder)
    write_text_atomic(out / "recipe.yaml", dump_recipe(recipe))
    env = environment(device, recipe.seed)
    env_path = out / "environment.json"
    history = json.loads(env_path.read_text()).get("history", []) if resume and env_path.exists() else []
    write_text_atomic(env_path, json.dumps({**env, "history": history + [env["started"]]}, indent=2))


def _save_last(out: Path, flow: Flow, optimizers: dict, scaler, stage_index: int, epoch: int, best: dict) -> None:
    files = settled_files(flow.recipe, flow.stages, stage_index, out)
    state, refs = without_settled(flow.state_dict(), files, out)
    save_atomic(
        {
            "flow": state,
            "settled": refs,
            "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
            "scaler": scaler.state_dict() if scaler else {},
            "stage_index": stage_index,
            "epoch": epoch,
            "best": json.dumps(best),
            "rng": rng_state(),
        },
        out / "last.pt",
    )


def read_last(path: Path) -> dict:
    """`last.pt`, or one line naming it when it cannot be read as one."""
    try:
        last = load_safe(path)
    except Exception as e:  # truncated, not a torch file, or holding objects weights-only loading refuses
        raise RecipeError(f"--resume: {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "it is not a checkpoint this run wrote: remove the run directory or pick another --out") from None
    missing = [k for k in ("flow", "optimizers", "stage_index", "epoch", "best", "rng") if not isinstance(last, dict) or k not in last]
    if missing:
        raise RecipeError(f"--resume: {path} is not a kdflow last.pt (no {', '.join(missing)})")
    return last


def load_flow_state(flow: Flow, last: dict, out: Path) -> None:
    """Give the flow the state of `last.pt`: the settled nodes from the files it references (checked by
    hash), everything else from `last.pt` itself (a last.pt written before references held all of it)."""
    refs = last.get("settled", {})
    files = settled_files(flow.recipe, flow.stages, last["stage_index"], out) if refs else {}
    restore_settled(flow.models, refs, files, out)
    prefixes = tuple(f"models.{n}." for n in refs)
    result = flow.load_state_dict(last["flow"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
    if missing or result.unexpected_keys:
        raise RecipeError(f"--resume: {out / 'last.pt'} does not fit the flow: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")


def train(
    recipe: Recipe,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool | None = None,
    callbacks: list[Callable[[EpochEnd], None]] = (),
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Run `recipe` into `out_dir`; returns the summary (per node: params, validation-selected, last and
    legacy test-best top-1).

    Under torchrun every process calls this; rank 0 alone writes files and logs. With `train.threads`
    torch runs on that many intra-op threads for the run (restored afterwards)."""
    threads = torch.get_num_threads()
    if recipe.train.threads is not None:
        torch.set_num_threads(recipe.train.threads)
    try:
        return _train(recipe, out_dir, resume, progress, callbacks, log)
    except DatasetError as e:  # an image that does not decode in a batch (data.options.bad_images: unchecked)
        raise RecipeError(f"data: {e}") from None
    finally:
        torch.set_num_threads(threads)


def _train(
    recipe: Recipe,
    out_dir: str | Path,
    resume: bool,
    progress: bool | None,
    callbacks: list[Callable[[EpochEnd], None]],
    log: Callable[[str], None],
) -> list[dict]:
    out = Path(out_dir)
    _check_resumable(out, recipe, resume)
    dist_info = init_distributed()
    if not dist_info.main:
        progress, log = False, lambda s: None
    dot.check_recipe(recipe, dist_info.enabled, log)  # what DOT (train.optim.name: dot) does not support
    if progress is None:
        progress = sys.stderr.isatty()
    seed_everything(recipe.seed)
    device = pick_device(recipe.device, dist_info)
    train_set, val_set, test_set, data_record = load_data(recipe)
    sample = augment_batch(load_inputs(test_set, torch.arange(2)), test_set.mean, test_set.std)
    flow = Flow(recipe, train_set.num_classes, train_set.input_shape, sample, num_data=len(train_set), train_labels=train_set.y).to(device)
    if recipe.train.channels_last and sample.dim() == 4:
        flow = flow.to(memory_format=torch.channels_last)
    flow.autocast_dtype = AUTOCAST[recipe.train.precision]
    if recipe.train.compile:
        if dist_info.enabled:
            raise RecipeError("train.compile: not under torchrun yet (each node runs through DistributedDataParallel); turn it off")
        flow.compile_nodes()
        log("train.compile: each node compiles on its first steps, so epoch 1's time_s includes compilation")
    _check_batch_size(recipe, train_set)  # after the graph's own checks, before the run directory is written
    scaler = torch.amp.GradScaler(device.type) if recipe.train.precision == "fp16" else None
    train_set, test_set = to_device(train_set, device), to_device(test_set, device)
    val_set = to_device(val_set, device) if val_set is not None else None
    stages = flow.stages
    for note in flow.notes:
        log(note)
    for split, bad in data_record.get("skipped_images", {}).items():
        if bad:
            log(f"data: left out {len(bad)} {split} images that do not decode (data.bad_images: skip), e.g. {bad[0]['file']}; data.json lists them")
    if dist_info.main:
        _write_run_header(out, recipe, device, resume)
        write_data_record(out, data_record)
    metrics_path = out / "metrics.jsonl"

    stage_index, start_epoch, best = 0, 0, {}
    resumed = None
    if resume:
        resumed = read_last(out / "last.pt")
        stage_index, start_epoch, best = resumed["stage_index"], resumed["epoch"], json.loads(resumed["best"])
        load_flow_state(flow, resumed, out)
        set_rng_state(resumed["rng"])
        if scaler and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        if dist_info.main:
            done = [r for r in read_jsonl(metrics_path) if (r["stage_index"], r["epoch"]) <= (stage_index, start_epoch)]
            write_text_atomic(metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in done))
        log(f"resuming {out} at stage {stages[min(stage_index, len(stages) - 1)].name!r}, epoch {start_epoch + 1}")
    elif dist_info.main and metrics_path.exists():
        metrics_path.unlink()

    # nodes whose weights are final before a stage starts: checkpointed ones and those trained in earlier stages
    ready = {n for n, spec in recipe.nodes.items() if spec.checkpoint}
    for s in stages[:stage_index]:
        ready.update(s.train)
    for si in range(stage_index, len(stages)):
        stage = stages[si]
        flow.set_stage_modes(stage)
        if dist_info.enabled:
            ids = [dist_info.local_rank] if device.type == "cuda" else None
            if recipe.train.sync_bn:
                if any(t.criterion == "bss" for _, t in recipe.active_transfers(stage)):
                    raise RecipeError("train.sync_bn: bss runs the student on a per-rank number of adversarial samples "
                                      "(none on some ranks), which synchronised batch norms cannot wait for; turn sync_bn off")
                for n in stage.train:
                    for module in [flow.models[n], *flow.helpers_of(n)]:
                        convert_batch_norms(module)
            # buffers are made equal by sync_buffers after every step, not broadcast from rank 0
            flow.runners = {n: DistributedDataParallel(flow.models[n], device_ids=ids, broadcast_buffers=False) for n in stage.train}
        optimizers = make_optimizers(flow, recipe, stage)
        views, caches = _stage_views_and_caches(flow, recipe, stage, train_set, dist_info, progress, log)
        first = start_epoch if si == stage_index else 0
        if resumed is not None and si == stage_index and first > 0:
            for node, opt in optimizers.items():
                opt.load_state_dict(resumed["optimizers"][node])
        if first == 0 and stage.epochs:
            log(f"stage {stage.name!r}: training {', '.join(stage.train)} for {stage.epochs} epochs")
        for epoch in range(first, stage.epochs):
            stats = train_epoch(flow, recipe, stage, si, epoch, train_set, optimizers, progress, dist_info, scaler, views, caches)
            # nothing non-finite is evaluated or saved (best, last, nodes/)
            check_state(flow, list(stage.train), optimizers, stage.name, epoch + 1)
            records = []
            for node in stage.train:
                ev = evaluate(flow.models[node], test_set, recipe.train.eval_batch_size, dist_info)
                if val_set is not None:
                    # `best` is chosen on validation only; without a validation split there is no best
                    val = evaluate(flow.models[node], val_set, recipe.train.eval_batch_size, dist_info)
                    ev = {**ev, "val_top1": val["test_top1"], "val_loss": val["test_loss"]}
                check_evaluation(ev, node, optimizers, stage.name, epoch + 1)
                if val_set is not None:
                    key = f"{si}:{node}"
                    if key not in best or ev["val_top1"] > best[key]["val_top1"]:
                        best[key] = {"val_top1": ev["val_top1"], "epoch": epoch + 1}
                        if dist_info.main:
                            path = out / f"best-{node}.pt"
                            save_node(flow, recipe, node, train_set, path, epoch=epoch + 1, stage=stage.name, **ev)
                records.append(
                    {
                        "stage": stage.name,
                        "stage_index": si,
                        "epoch": epoch + 1,
                        "node": node,
                        "lr": stats["lr"][node],
                        "train_loss": stats["train_ce"][node],
                        "train_top1": stats["train_top1"][node],
                        **ev,
                        "total_loss": stats["total"],
                        "terms": {k: v for k, v in stats["terms"].items() if f"> {node}." in k or k.endswith(f"({node})")},
                        "time_s": stats["elapsed"],
                        "images_per_sec": stats["seen"] / max(stats["elapsed"], 1e-9),
                        **({"nonfinite_steps": stats["nonfinite_steps"][node]}
                           if recipe.train.on_nonfinite == "skip_step" else {}),
                    }
                )
            for name, members in recipe.ensembles.items():
                if all(m in stage.train or m in ready for m in members):
                    models = [flow.models[m] for m in members]
                    ev = evaluate_ensemble(models, test_set, recipe.train.eval_batch_size, dist_info)
                    if val_set is not None:
                        val = evaluate_ensemble(models, val_set, recipe.train.eval_batch_size, dist_info)
                        ev = {**ev, "val_top1": val["test_top1"], "val_loss": val["test_loss"]}
                    records.append({"stage": stage.name, "stage_index": si, "epoch": epoch + 1, "node": name, "kind": "ensemble", **ev})
            flow.set_stage_modes(stage)  # evaluation switched the nodes to eval mode
            if dist_info.main:
                for r in records:
                    append_jsonl(metrics_path, r)
                if epoch + 1 in recipe.train.save_epochs:
                    for node in stage.train:
                        path = out / "nodes" / f"{node}-epoch{epoch + 1}.pt"
                        save_node(flow, recipe, node, train_set, path, stage=stage.name, epoch=epoch + 1)
                _save_last(out, flow, optimizers, scaler, si, epoch + 1, best)
            nodes_text = " | ".join(
                f"{r['node']}: loss {r['train_loss']:.3f} train {r['train_top1']:.2f}"
                + (f" val {r['val_top1']:.2f}" if "val_top1" in r else "") + f" test {r['test_top1']:.2f}"
                if "kind" not in r
                else f"{r['node']} (ensemble): test {r['test_top1']:.2f}"
                for r in records
            )
            skipped = ", ".join(f"{n} {k}" for n, k in stats["nonfinite_steps"].items() if k)
            log(
                f"[{stage.name}] epoch {epoch + 1}/{stage.epochs}  {nodes_text}  "
                f"({records[0]['images_per_sec']:.0f} img/s, {stats['elapsed']:.1f}s)"
                + (f"  non-finite steps skipped: {skipped}" if skipped else "")
            )
            for cb in callbacks:
                cb(EpochEnd(si, stage.name, epoch + 1, records))
        flow.runners = {}
        if dist_info.main:
            for node in stage.train:
                save_node(flow, recipe, node, train_set, out / "nodes" / f"{node}.pt", stage=stage.name)
            if stage is not stages[-1]:
                # the next stage starts from here; a resume after this point must not replay this stage
                _save_last(out, flow, {}, scaler, si + 1, 0, best)
        ready.update(stage.train)

    if not dist_info.main:
        return []
    check_unchanged(flow.models, settled_files(flow.recipe, stages, len(stages), out))
    params = {n: count_parameters(m) for n, m in flow.models.items()}
    summary = summarize(recipe, read_jsonl(metrics_path), params)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    table = summary_table(summary)
    write_text_atomic(out / "summary.md", table + "\n")
    log("\n" + table)
    return summary
