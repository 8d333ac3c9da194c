"""The layers stand alone: importing one loads only the layers below it, and no module of kdflow
imports itself back through a chain of module-level imports (issue 15)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# data → models → losses → flow → methods → engine → study → CLI (docs/architecture.md)
LAYERS = ["data", "models", "losses", "flow", "methods", "engine", "study"]


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('kdflow'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=SRC.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_loads_no_layer_above_it(layer):
    above = LAYERS[LAYERS.index(layer) + 1 :] + ["api", "cli", "cli_study"]
    loaded = _loaded_after(f"import kdflow.{layer}")
    wrong = [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in above]
    assert not wrong, f"import kdflow.{layer} loads {wrong}"


def test_losses_alone_load_nothing_but_the_losses():
    loaded = _loaded_after("import kdflow.losses")
    assert all(m == "kdflow" or m.startswith("kdflow.losses") for m in loaded), loaded
    # and every criterion is registered by that import alone
    names = _loaded_after("import kdflow.losses; import kdflow.losses.registry as r; print(json.dumps(sorted(r.CRITERIA)))")
    assert names  # the last printed line is the module list; the registry is checked below
    from kdflow.losses.registry import CRITERIA

    assert {"kd", "dkd", "hint", "at", "crd", "bss", "reviewkd"} <= set(CRITERIA)


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The kdflow modules a file imports, at load time or inside a function (a deferred import is still a
    dependency: deferring it only hides a cycle)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle_in_src():
    files = sorted((SRC / "kdflow").rglob("*.py"))
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, modules) for p in files}
    # Tarjan's strongly connected components: any component of more than one module is a cycle
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_finder_sees_a_cycle(tmp_path, monkeypatch):
    """The test above would catch a cycle: two modules importing each other are one component."""
    pkg = tmp_path / "kdflow"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from kdflow.b import x\n")
    (pkg / "b.py").write_text("import kdflow.a\nx = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle_in_src()
