"""Distillation losses: plain functions of tensors, one file per knowledge family."""
from kdflow.losses.logits import kd

__all__ = ["kd"]
