"""Distillation losses: plain functions of tensors, one file per knowledge family."""
from kdflow.losses.logits import (
    annealing_kd,
    annealing_temperature_index,
    dist,
    dkd,
    kd,
    label_smoothing,
    tfkd_reg,
    virtual_teacher_logits,
)
from kdflow.losses.relations import cc, pkt, rkd, rkd_angle, rkd_distance, sp

__all__ = [
    "annealing_kd",
    "annealing_temperature_index",
    "cc",
    "dist",
    "dkd",
    "kd",
    "label_smoothing",
    "pkt",
    "rkd",
    "rkd_angle",
    "rkd_distance",
    "sp",
    "tfkd_reg",
    "virtual_teacher_logits",
]
