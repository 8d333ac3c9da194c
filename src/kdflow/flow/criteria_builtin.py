"""The criteria that ship with kdflow: each a loss from `kdflow.losses`, registered by name."""
from __future__ import annotations

import torch

from kdflow import losses
from kdflow.flow.criteria import register_criterion


def annealing_mse(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, epoch: int, epochs: int, max_temperature: int = 10
) -> torch.Tensor:
    """Annealing-KD phase 1 (Jafari et al. 2021): MSE(z_s, (k/τ_max)·z_t), k rising 1..τ_max over the stage."""
    k = losses.annealing_temperature_index(epoch, epochs, max_temperature)
    return losses.annealing_kd(student_logits, teacher_logits, k, max_temperature)


# logits
register_criterion("kl", losses.kd)
register_criterion("dkd", losses.dkd)
register_criterion("nkd", losses.nkd)
register_criterion("dist", losses.dist)
register_criterion("annealing_mse", annealing_mse)
# features (same shape after the connector, where one is needed)
register_criterion("hint_mse", losses.hint)
# features compared after their own reduction: channel counts may differ
register_criterion("at", losses.at, same_shape=False)
register_criterion("nst", losses.nst, same_shape=False)
register_criterion("fsp", losses.fsp, same_shape=False, grouped=True)
# relations between the samples of a batch
register_criterion("sp", losses.sp, same_shape=False)
register_criterion("rkd", losses.rkd, same_shape=False)
register_criterion("pkt", losses.pkt, same_shape=False)
