"""`takd`: Mirzadeh, Farajtabar, Li, Levine, Matsukawa and Ghasemzadeh 2020, "Improved Knowledge
Distillation via Teacher Assistant" (AAAI).

A chain teacher → assistant(s) → student run as stages: stage i trains chain[i] with KD from
chain[i−1], which is frozen by then (the teacher from its checkpoint, an assistant with the
weights its own stage ended with, kept in the run directory as nodes/NAME.pt). Each link is
Hinton KD with the benchmark's τ=4, 0.1·CE + 0.9·KD [the paper tunes τ and λ per setting].
"""
from __future__ import annotations

from kdflow.methods.registry import Graph, register_method


@register_method(
    "takd",
    citation="Mirzadeh et al. 2020. Improved Knowledge Distillation via Teacher Assistant",
    knowledge="logits",
)
def takd(
    chain: list[str] = ("teacher", "assistant", "student"),
    temperature: float = 4.0,
    ce_weight: float = 0.1,
    kd_weight: float = 0.9,
) -> Graph:
    chain = list(chain)
    if len(chain) < 2:
        raise ValueError("a chain needs a teacher and at least one more model")
    nodes = {chain[0]: {"role": "frozen"}, **{n: {"role": "trainable"} for n in chain[1:]}}
    transfers = [
        {"from": f"{a}.logits", "to": f"{b}.logits", "criterion": "kd", "temperature": temperature, "weight": kd_weight}
        for a, b in zip(chain, chain[1:])
    ]
    return {
        "nodes": nodes,
        "supervise": {n: ce_weight for n in chain[1:]},
        "transfers": transfers,
        "stages": [{"name": n, "train": [n]} for n in chain[1:]],
    }
