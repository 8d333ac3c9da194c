"""Evaluation: loss, top-1 and top-5 of one model on a split, batch by batch."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdflow.data.augment import augment_batch
from kdflow.data.base import ArrayDataset
from kdflow.data.loader import batches
from kdflow.flow.taps import model_logits


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum()


def evaluate(model: nn.Module, ds: ArrayDataset, batch_size: int = 1000) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy (percent) of `model` on `ds`, in eval mode."""
    was_training = model.training
    model.eval()
    device = ds.x.device
    loss = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    with torch.inference_mode():
        for x, y, _ in batches(ds, batch_size):
            logits = model_logits(model(augment_batch(x, ds.mean, ds.std))).float()
            loss += F.cross_entropy(logits, y, reduction="sum").double()
            top1 += topk_correct(logits, y, 1)
            top5 += topk_correct(logits, y, 5)
    model.train(was_training)
    n = len(ds)
    return {"test_loss": loss.item() / n, "test_top1": 100.0 * top1.item() / n, "test_top5": 100.0 * top5.item() / n}
