"""Reference parity: build a benchmark recipe as the engine builds it, on fixed weights and a fixed batch.

The reference numbers in ``tests/fixtures/parity/*.json`` were produced by running the reference code
bases (RepDistiller, mdistiller, ...) beside kdflow, outside this repository, on exactly these weights
and this batch: the generator builds kdflow's models with `fixed_models`, loads their state dicts
into the reference models (the parameter names are the benchmark's), copies every helper (connector,
regressor, embedding) from the Flow built here into the reference's helper, and runs the reference's
training-step loss in float64. Nothing here imports a reference code base.

Each fixture records its provenance (repository, commit, file, function) and its inputs (pair,
batch size, seeds); `check_parity` rebuilds the same inputs here and compares the total training
loss and the L2 norm of the student's gradient.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from kdflow.checkpoint import model_file, save_atomic
from kdflow.flow.graph import Flow
from kdflow.methods.recipe import load_recipe
from kdflow.models import build_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "parity"
CIFAR = ROOT / "recipes" / "cifar100"
METHODS = ROOT / "recipes" / "methods"
PAIRS = {"resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4"), "vgg13-MobileNetV2": ("vgg13", "MobileNetV2"),
         "resnet32x4-ShuffleV2": ("resnet32x4", "ShuffleV2")}
NUM_CLASSES, INPUT = 100, (3, 32, 32)


def perturb_batch_norms(model: nn.Module, seed: int) -> None:
    """Give every batch norm non-trivial affine parameters and running statistics (deterministic), so
    eval-mode and train-mode batch norms differ and a wrong mode shows in the loss."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.affine:
                    m.weight.copy_(0.75 + 0.5 * torch.rand(n, generator=g))
                    m.bias.copy_(0.1 * torch.randn(n, generator=g))
                if m.track_running_stats:
                    m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                    m.running_var.copy_(0.75 + 0.5 * torch.rand(n, generator=g))


def fixed_models(pair: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(teacher, student) of a pair in float64: the zoo's own init under `seed`, batch norms perturbed."""
    t_arch, s_arch = PAIRS[pair]
    models = []
    for k, arch in enumerate((t_arch, s_arch)):
        torch.manual_seed(seed * 10 + k)
        model = build_model(arch, NUM_CLASSES, INPUT)
        perturb_batch_norms(model, seed * 10 + k + 100)
        models.append(model.double())
    return models[0], models[1]


@dataclass
class Batch:
    x: torch.Tensor  # float64 images, B×3×32×32
    y: torch.Tensor  # labels
    index: torch.Tensor  # positions in a training split of `num_data` samples
    num_data: int


def fixed_batch(batch_size: int = 16, seed: int = 0, num_data: int = 2000) -> Batch:
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(batch_size, *INPUT, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    index = torch.randperm(num_data, generator=g)[:batch_size]
    return Batch(x, y, index, num_data)


def split_labels(batch: Batch, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Labels of a balanced training split of `batch.num_data` samples (num_data / num_classes per class, as
    CIFAR-100's) in which the batch's samples carry the batch's labels: labels[batch.index] == batch.y.
    The other positions get the remaining labels in a fixed shuffled order."""
    per_class = batch.num_data // num_classes
    if per_class * num_classes != batch.num_data:
        raise ValueError("num_data must be a multiple of num_classes")
    remaining = torch.full((num_classes,), per_class, dtype=torch.long) - torch.bincount(batch.y, minlength=num_classes)
    if bool((remaining < 0).any()):
        raise ValueError("the batch holds more samples of a class than the split does")
    rest = torch.repeat_interleave(torch.arange(num_classes), remaining)
    rest = rest[torch.randperm(rest.numel(), generator=torch.Generator().manual_seed(11))]
    labels = torch.empty(batch.num_data, dtype=torch.long)
    others = torch.ones(batch.num_data, dtype=torch.bool)
    others[batch.index] = False
    labels[others] = rest
    labels[batch.index] = batch.y
    return labels


def build_flow(method: str, pair: str, tmp: Path, overrides: list[str] | None = None, seed: int = 0,
               batch: Batch | None = None, train_labels: torch.Tensor | None = None) -> Flow:
    """protocol + pair + methods/METHOD.yaml, built as the engine builds it, with the fixed teacher as a
    checkpoint file and the fixed student's weights loaded over the built student; the whole Flow in float64.
    `train_labels` (the training split's labels) is passed to criteria that sample by class (CRD)."""
    teacher, student = fixed_models(pair, seed)
    t_arch, s_arch = PAIRS[pair]
    ckpt = tmp / f"{pair}-teacher.pt"
    save_atomic(model_file(t_arch, {}, NUM_CLASSES, INPUT, {k: v.float() for k, v in teacher.state_dict().items()}), ckpt)
    recipe = load_recipe([CIFAR / "protocol.yaml", CIFAR / "pairs" / f"{pair}.yaml", METHODS / f"{method}.yaml"],
                         [f"nodes.teacher.checkpoint={ckpt}", *(overrides or [])])
    batch = batch or fixed_batch()
    torch.manual_seed(seed)
    flow = Flow(recipe, NUM_CLASSES, INPUT, batch.x[:2].float(), num_data=batch.num_data, train_labels=train_labels)
    flow.models["student"].load_state_dict({k: v.float() for k, v in student.state_dict().items()})
    flow.models["teacher"].load_state_dict({k: v.float() for k, v in teacher.state_dict().items()})
    return flow.double()


def loss_and_grad_norm(flow: Flow, batch: Batch, stage: str | None = None, epoch: int = 0) -> tuple[float, float, dict]:
    """One training step's total loss and the L2 norm of the student's gradient (the engine's modes for
    `stage`, the last stage by default); also the per-term values."""
    stages = {s.name: s for s in flow.stages}
    spec = stages[stage] if stage else flow.stages[-1]
    flow.set_stage_modes(spec)
    flow.zero_grad(set_to_none=True)
    out = flow(batch.x, batch.y, spec, epoch, batch.index)
    out.total.backward()
    grads = [p.grad.flatten() for p in flow.models["student"].parameters() if p.grad is not None]
    norm = torch.cat(grads).norm().item() if grads else 0.0
    return out.total.item(), norm, {k: float(v.detach()) for k, v in out.terms.items()}


def read_fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def class_contrast(labels: torch.Tensor, index: torch.Tensor, k: int, mode: str = "exact", seed: int = 0,
                   num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """CRD contrast sets (B, k+1), positive first, drawn with numpy's global generator seeded with `seed`, in the
    order and with the calls by which RepDistiller's CIFAR100InstanceSample draws them for each sample in turn: the
    other classes' samples listed class by class, `np.random.choice` of k of them (without replacement unless k
    exceeds their number); in `relax` mode a `np.random.choice` of one sample of the own class first. The parity
    generator checks that this gives exactly the reference dataset's indices."""
    import numpy as np

    lab = labels.numpy()
    members = [np.flatnonzero(lab == c) for c in range(num_classes)]
    np.random.seed(seed)
    rows = []
    for i in index.tolist():
        c = int(lab[i])
        negatives = np.concatenate([members[j] for j in range(num_classes) if j != c])
        positive = np.random.choice(members[c], 1)[0] if mode == "relax" else i
        neg = np.random.choice(negatives, k, replace=k > len(negatives))
        rows.append(np.concatenate([[positive], neg]))
    return torch.from_numpy(np.stack(rows)).long()
