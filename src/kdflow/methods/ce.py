"""`ce`: a model trained alone on its labels — the baseline every method is compared to."""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method("ce", citation="cross-entropy on labels (no distillation)", knowledge="none")
def ce(student: str = "student", weight: float = 1.0) -> Graph:
    return {"nodes": {student: {"role": "trainable"}}, "supervise": {student: weight}}
