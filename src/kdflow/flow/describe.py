"""A method's flow graph as text and as a Mermaid flowchart."""
from __future__ import annotations

from typing import Any


def _sources(t: dict) -> tuple[list[str], list[float] | None]:
    src = t.get("from", t.get("source"))
    if isinstance(src, dict):
        return list(src["fuse"]), src.get("weights")
    return [src], None


def _params(t: dict) -> str:
    known = {"from", "source", "to", "criterion", "weight", "connector", "detach", "params"}
    params = {**t.get("params", {}), **{k: v for k, v in t.items() if k not in known}}
    return ", ".join(f"{k}={v}" for k, v in params.items())


def describe_text(graph: dict[str, Any]) -> str:
    lines = ["nodes:"]
    for name, fields in graph.get("nodes", {}).items():
        lines.append(f"  {name:<10} {fields.get('role', 'trainable')}")
    if graph.get("supervise"):
        lines.append("supervise (cross-entropy on labels):")
        lines += [f"  {node:<10} weight {w}" for node, w in graph["supervise"].items()]
    if graph.get("transfers"):
        lines.append("transfers:")
    for t in graph.get("transfers", []):
        srcs, ws = _sources(t)
        src = srcs[0] if len(srcs) == 1 else f"fuse({', '.join(srcs)}{'; weights ' + str(ws) if ws else '; mean'})"
        extras = [p for p in [_params(t), f"weight {t.get('weight', 1.0)}", "detached" if t.get("detach", True) else "not detached"] if p]
        if t.get("connector"):
            extras.append(f"connector {t['connector']}")
        lines.append(f"  {src} -> {t['to']}  via {t['criterion']}  ({'; '.join(extras)})")
    return "\n".join(lines)


def describe_mermaid(graph: dict[str, Any]) -> str:
    lines = ["flowchart LR"]
    for name, fields in graph.get("nodes", {}).items():
        role = fields.get("role", "trainable")
        lines.append(f'  {name}["{name}<br/>{role}"]' if role == "trainable" else f'  {name}[("{name}<br/>{role}")]')
    lines.append('  labels(["labels"])')
    for node, w in graph.get("supervise", {}).items():
        lines.append(f'  labels -- "ce ×{w}" --> {node}')
    for i, t in enumerate(graph.get("transfers", [])):
        srcs, ws = _sources(t)
        target = t["to"].split(".", 1)[0]
        label = f"{t['criterion']} ×{t.get('weight', 1.0)}"
        if len(srcs) > 1:
            fuse = f"fuse{i}"
            lines.append(f'  {fuse}{{"fuse {ws or "mean"}"}}')
            lines += [f'  {s.split(".", 1)[0]} -- "{s.split(".", 1)[1]}" --> {fuse}' for s in srcs]
            lines.append(f'  {fuse} -- "{label}" --> {target}')
        else:
            lines.append(f'  {srcs[0].split(".", 1)[0]} -- "{srcs[0].split(".", 1)[1]} → {t["to"].split(".", 1)[1]}: {label}" --> {target}')
    return "\n".join(lines)
