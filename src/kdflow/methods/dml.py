"""`dml`: Zhang, Xiang, Hospedales and Lu 2018, "Deep Mutual Learning" (CVPR).

A cohort of K peers trained from scratch together; peer k minimises
CE(z_k, y) + 1/(K−1)·Σ_{j≠k} KL(p_j ‖ p_k), with p_j detached (each peer is a fixed target
for the others within a step) at τ=1. The ensemble of the peers (mean softmax) is evaluated
beside each peer.
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method("dml", citation="Zhang, Xiang, Hospedales, Lu 2018. Deep Mutual Learning", knowledge="logits")
def dml(peers: list[str] = ("peer1", "peer2"), temperature: float = 1.0, ce_weight: float = 1.0) -> Graph:
    peers = list(peers)
    if len(peers) < 2:
        raise ValueError("dml needs at least two peers")
    w = 1.0 / (len(peers) - 1)
    transfers = [
        {"from": f"{j}.logits", "to": f"{k}.logits", "criterion": "kl", "temperature": temperature, "weight": w}
        for k in peers
        for j in peers
        if j != k
    ]
    return {
        "nodes": {p: {"role": "trainable"} for p in peers},
        "supervise": {p: ce_weight for p in peers},
        "transfers": transfers,
        "ensembles": {"ensemble": peers},
    }
