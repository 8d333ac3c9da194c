"""Evaluation: loss, top-1 and top-5 of one model on a split, batch by batch."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdflow.data.augment import augment_batch
from kdflow.data.base import ArrayDataset
from kdflow.data.loader import batches, select
from kdflow.engine.distributed import DistInfo, all_reduce_sum
from kdflow.flow.taps import model_logits


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum()


def evaluate(model: nn.Module, ds: ArrayDataset, batch_size: int = 1000, dist_info: DistInfo = DistInfo()) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy (percent) of `model` on `ds`, in eval mode."""
    return evaluate_ensemble([model], ds, batch_size, dist_info)


ECE_BINS = 15


def evaluate_ensemble(
    models: list[nn.Module], ds: ArrayDataset, batch_size: int = 1000, dist_info: DistInfo = DistInfo()
) -> dict:
    """The same metrics for the mean of the models' softmax outputs (one model: the model itself), plus
    per-class top-1 (percent, so minority classes can be read) and the expected calibration error
    (15 equal-width confidence bins; Guo et al. 2017).

    Under several processes each evaluates every world-th sample and the sums are reduced."""
    n = len(ds)
    if dist_info.enabled:
        ds = select(ds, torch.arange(dist_info.rank, n, dist_info.world))
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    device = ds.y.device
    c = ds.num_classes
    loss = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    class_correct = torch.zeros(c, dtype=torch.long, device=device)
    class_total = torch.zeros(c, dtype=torch.long, device=device)
    bins = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)  # count, sum of confidence, sum of correct
    with torch.inference_mode():
        for x, y, _ in batches(ds, batch_size):
            x = augment_batch(x, ds.mean, ds.std)
            if len(models) == 1:
                log_p = F.log_softmax(model_logits(models[0](x)).float(), dim=1)
            else:
                probs = torch.stack([F.softmax(model_logits(m(x)).float(), dim=1) for m in models]).mean(0)
                log_p = probs.clamp_min(1e-12).log()
            loss += F.nll_loss(log_p, y, reduction="sum").double()
            top1 += topk_correct(log_p, y, 1)
            top5 += topk_correct(log_p, y, 5)
            conf, pred = log_p.exp().max(dim=1)
            hit = pred == y
            class_correct += torch.bincount(y[hit], minlength=c)
            class_total += torch.bincount(y, minlength=c)
            # NaN confidences (a diverged model) go to bin 0 rather than crash bincount; the loss shows them
            b = (conf.nan_to_num(0.0) * ECE_BINS).long().clamp(0, ECE_BINS - 1)
            bins[0] += torch.bincount(b, minlength=ECE_BINS).double()
            bins[1] += torch.bincount(b, weights=conf.double(), minlength=ECE_BINS)
            bins[2] += torch.bincount(b, weights=hit.double(), minlength=ECE_BINS)
    for m, training in zip(models, was_training):
        m.train(training)
    all_reduce_sum([loss, top1, top5, class_correct, class_total, bins])
    per_class = (100.0 * class_correct.double() / class_total.clamp(min=1).double()).tolist()
    ece = float((bins[1] - bins[2]).abs().sum() / max(n, 1))
    return {
        "test_loss": loss.item() / n,
        "test_top1": 100.0 * top1.item() / n,
        "test_top5": 100.0 * top5.item() / n,
        "per_class_top1": [round(v, 4) for v in per_class],
        "ece": ece,
    }
