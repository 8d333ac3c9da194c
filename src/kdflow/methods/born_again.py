"""`born_again`: Furlanello, Lipton, Tschannen, Itti and Anandkumar 2018, "Born-Again Neural
Networks" (ICML).

G generations of the teacher's architecture: generation g learns from generation g−1 (the first
from the trained teacher, `gen0`), each in its own stage; the ensemble of the generations
(mean softmax) is evaluated at the end. The paper's student loss is the cross-entropy to the
teacher's output distribution (τ=1), i.e. τ²·KL(p_{g−1} ‖ p_g) up to a constant; `ce_weight`
adds the label term (0 by default, as the paper's BAN).
"""
from __future__ import annotations

from kdflow.methods.registry import MAX_MADE_NODES, Graph, register_method


@register_method(
    "born_again",
    citation="Furlanello, Lipton, Tschannen, Itti, Anandkumar 2018. Born-Again Neural Networks",
    knowledge="logits",
)
def born_again(
    teacher: str = "gen0", generations: int = 2, temperature: float = 1.0, ce_weight: float = 0.0, kd_weight: float = 1.0
) -> Graph:
    if not 1 <= generations <= MAX_MADE_NODES:
        raise ValueError(f"generations must be between 1 and {MAX_MADE_NODES}, got {generations}")
    gens = [f"gen{g}" for g in range(1, generations + 1)]
    chain = [teacher] + gens
    return {
        "nodes": {teacher: {"role": "frozen"}, **{g: {"role": "trainable", "same_as": teacher} for g in gens}},
        "supervise": {g: ce_weight for g in gens} if ce_weight else {},
        "transfers": [
            {"from": f"{a}.logits", "to": f"{b}.logits", "criterion": "kd", "temperature": temperature, "weight": kd_weight}
            for a, b in zip(chain, chain[1:])
        ],
        "stages": [{"name": g, "train": [g]} for g in gens],
        "ensembles": {"generations": gens},
    }
