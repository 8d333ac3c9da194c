"""`multi_teacher`: KD from several frozen teachers whose logits are fused first — by their mean,
by given weights, or per sample by each teacher's confidence (top softmax probability,
normalised over the teachers). Student: ce_weight·CE + kd_weight·τ²·KL(p_fused ‖ p_s).
The fused-logits form follows the usual multi-teacher baseline (e.g. You et al. 2017,
"Learning from Multiple Teacher Networks", which averages the teachers' soft targets).
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method(
    "multi_teacher",
    citation="You, Xu, Xu, Tao 2017. Learning from Multiple Teacher Networks (fused soft targets)",
    knowledge="logits",
)
def multi_teacher(
    teachers: list[str] = ("teacher1", "teacher2"),
    student: str = "student",
    fusion: str = "mean",
    weights: list[float] | None = None,
    temperature: float = 4.0,
    ce_weight: float = 0.1,
    kd_weight: float = 0.9,
) -> Graph:
    teachers = list(teachers)
    source: dict = {"fuse": [f"{t}.logits" for t in teachers], "mode": fusion}
    if weights is not None:
        source["weights"] = list(weights)
    return {
        "nodes": {**{t: {"role": "frozen"} for t in teachers}, student: {"role": "trainable"}},
        "supervise": {student: ce_weight},
        "transfers": [
            {"from": source, "to": f"{student}.logits", "criterion": "kd", "temperature": temperature, "weight": kd_weight}
        ],
    }
