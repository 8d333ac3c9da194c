"""Losses on logits: knowledge read off a model's output distribution."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network".

    τ² · KL(p_t ‖ p_s) with p = softmax(z / τ), summed over classes and averaged over the
    batch (``batchmean``). The τ² keeps the gradient scale independent of τ.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2
