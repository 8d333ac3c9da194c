"""`dml`: Zhang, Xiang, Hospedales and Lu 2018, "Deep Mutual Learning" (CVPR).

A cohort of K peers trained from scratch together; peer k minimises
CE(z_k, y) + 1/(K−1)·Σ_{j≠k} KL(p_j ‖ p_k), with p_j detached (each peer is a fixed target
for the others within a step) at τ=1. The ensemble of the peers (mean softmax) is evaluated
beside each peer.

Updates. The paper's Algorithm 1 updates the peers in turn on each mini-batch: peer 1 takes its
step, then the predictions are computed again and peer 2 learns from peer 1's *updated* output,
and so on. `alternating: true` does that (a stage with ``updates: alternating``: one forward pass
of every peer per peer, `kdflow.engine.train.alternating_step`). The default, `alternating:
false`, is the joint update: one forward pass, every peer's loss against the others' outputs of
that same pass, one backward and every peer stepped at once — K times fewer forward passes, and
with K = 2 the only difference is that peer 2 learns from peer 1's output before peer 1's step.
In the alternating order each peer's batch norms see the batch K times per step (the peers that
are not being updated run in train mode without gradient).
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method("dml", citation="Zhang, Xiang, Hospedales, Lu 2018. Deep Mutual Learning", knowledge="logits")
def dml(peers: list[str] = ("peer1", "peer2"), temperature: float = 1.0, ce_weight: float = 1.0, alternating: bool = False) -> Graph:
    peers = list(peers)
    if len(peers) < 2:
        raise ValueError("dml needs at least two peers")
    w = 1.0 / (len(peers) - 1)
    transfers = [
        {"from": f"{j}.logits", "to": f"{k}.logits", "criterion": "kd", "temperature": temperature, "weight": w}
        for k in peers
        for j in peers
        if j != k
    ]
    graph = {
        "nodes": {p: {"role": "trainable"} for p in peers},
        "supervise": {p: ce_weight for p in peers},
        "transfers": transfers,
        "ensembles": {"ensemble": peers},
    }
    if alternating:
        graph["stages"] = [{"name": "main", "train": peers, "updates": "alternating"}]
    return graph
