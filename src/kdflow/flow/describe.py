"""A method's flow graph as text and as a Mermaid flowchart."""
from __future__ import annotations

from typing import Any

from kdflow.flow.spec import (
    FuseSpec,
    GroupSpec,
    SuperviseSpec,
    TransferSpec,
    WeightSchedule,
)


def _parts(graph: dict[str, Any]) -> tuple[dict[str, str], dict[str, SuperviseSpec], list[TransferSpec]]:
    roles = {name: fields.get("role", "trainable") for name, fields in graph.get("nodes", {}).items()}
    supervise = {n: SuperviseSpec.model_validate(w) for n, w in graph.get("supervise", {}).items()}
    transfers = []
    for t in graph.get("transfers", []):
        targets = t["to"] if isinstance(t["to"], list) else [t["to"]]
        transfers += [TransferSpec.model_validate({**t, "to": target}) for target in targets]
    return roles, supervise, transfers


def _w(weight: float | WeightSchedule) -> str:
    if not isinstance(weight, WeightSchedule):
        return f"{weight:g}"
    extra = [f"warm-up {weight.warmup_epochs} epochs"] if weight.warmup_epochs else []
    extra += [f"×{weight.gamma:g} at {weight.milestones}"] if weight.milestones else []
    return f"{weight.value:g} ({', '.join(extra)})"


def _source(t: TransferSpec) -> str:
    if isinstance(t.source, FuseSpec):
        how = f"weights {t.source.weights}" if t.source.weights else "mean"
        return f"fuse({', '.join(t.sources)}; {how})"
    if isinstance(t.source, GroupSpec):
        return f"[{', '.join(t.sources)}]"
    return t.sources[0]


def describe_text(graph: dict[str, Any]) -> str:
    roles, supervise, transfers = _parts(graph)
    lines = ["nodes:"] + [f"  {name:<10} {role}" for name, role in roles.items()]
    if supervise:
        lines.append("supervise (loss on labels):")
    for node, sup in supervise.items():
        params = "".join(f", {k}={v}" for k, v in sup.params.items())
        stages = f", stages {sup.stages}" if sup.stages else ""
        lines.append(f"  {node:<10} {sup.loss}{params}, weight {_w(sup.weight)}{stages}")
    if transfers:
        lines.append("transfers:")
    for t in transfers:
        extras = [", ".join(f"{k}={v}" for k, v in t.params.items()), f"weight {_w(t.weight)}"]
        extras.append("detached" if t.detach else "not detached")
        if t.connector:
            extras.append(f"connector {t.connector.kind}")
        if t.stages:
            extras.append(f"stages {t.stages}")
        if t.pool:
            extras.append(f"pool {t.pool}")
        target = t.targets[0] if len(t.targets) == 1 else f"[{', '.join(t.targets)}]"
        lines.append(f"  {_source(t)} -> {target}  via {t.criterion}  ({'; '.join(e for e in extras if e)})")
    if graph.get("stages"):
        lines.append("stages (in order):")
        lines += [f"  {s['name']:<10} trains {', '.join(s.get('train', []))}" for s in graph["stages"]]
    for pool, k in graph.get("drop", {}).items():
        lines.append(f"drop: {k} of the active transfers in pool {pool!r}, at random, every step")
    for name, members in graph.get("ensembles", {}).items():
        lines.append(f"ensemble {name}: mean softmax of {', '.join(members)}")
    return "\n".join(lines)


def describe_mermaid(graph: dict[str, Any]) -> str:
    roles, supervise, transfers = _parts(graph)
    lines = ["flowchart LR"]
    for name, role in roles.items():
        lines.append(f'  {name}["{name}<br/>{role}"]' if role == "trainable" else f'  {name}[("{name}<br/>{role}")]')
    lines.append('  labels(["labels"])')
    for node, sup in supervise.items():
        lines.append(f'  labels -- "{sup.loss} ×{_w(sup.weight)}" --> {node}')
    for i, t in enumerate(transfers):
        label = f"{t.criterion} ×{_w(t.weight)}"
        target = t.target_node
        taps = lambda taps: ", ".join(s.split(".", 1)[1] for s in taps)  # noqa: E731
        if isinstance(t.source, FuseSpec):
            fuse = f"fuse{i}"
            lines.append(f'  {fuse}{{"fuse {t.source.weights or "mean"}"}}')
            lines += [f'  {s.split(".", 1)[0]} -- "{s.split(".", 1)[1]}" --> {fuse}' for s in t.sources]
            lines.append(f'  {fuse} -- "{label} → {taps(t.targets)}" --> {target}')
        else:
            source = t.sources[0].split(".", 1)[0]
            lines.append(f'  {source} -- "{taps(t.sources)} → {taps(t.targets)}: {label}" --> {target}')
    return "\n".join(lines)
