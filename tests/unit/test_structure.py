"""The shape of the package, checked from its source: file sizes, the import graph (no cycles, methods as
siblings, pure layers without Ray/DeepSpeed), and the one method registry."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((SRC / "diffray").rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every diffray module `name` imports, at module level or inside functions (`from pkg import mod`
    counts as importing `pkg.mod` when that is a module)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_source_file_is_over_the_limit():
    long = {str(p.relative_to(SRC)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_import_graph_has_no_cycle():
    assert "diffray.trainers.runner" in GRAPH["diffray.tune.runner"], "the graph must see real imports"
    assert cycles(GRAPH) == []


def test_cycle_finder_finds_a_planted_cycle():
    planted = {**GRAPH, "diffray.config": GRAPH["diffray.config"] | {"diffray.methods"}}
    assert any({"diffray.config", "diffray.methods"} <= set(c) for c in cycles(planted))


def test_no_method_imports_another_method():
    from diffray.methods import METHODS

    packages = {f"diffray.trainers.{name}" for name in METHODS}
    assert all(p in MODULES for p in packages), "every method is a package under diffray.trainers"

    def owner(module: str) -> str | None:
        return next((p for p in packages if module == p or module.startswith(p + ".")), None)

    crossing = {(m, i) for m, deps in GRAPH.items() if owner(m) for i in deps if owner(i) not in (None, owner(m))}
    assert crossing == set()


@pytest.mark.parametrize("layer", ["diffray.trainers.components", "diffray.models", "diffray.storage",
                                   "diffray.config", "diffray.methods", "diffray.console", "diffray.logs",
                                   "diffray.trainers.method"])
def test_pure_layers_never_import_ray_or_deepspeed(layer):
    for name, path in MODULES.items():
        if name == layer or name.startswith(layer + "."):
            tree = ast.parse(path.read_text())
            found = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            found |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            assert not found & {"ray", "deepspeed"}, f"{name} imports {found & {'ray', 'deepspeed'}}"


def test_job_configs_validate_without_importing_a_trainer():
    code = ("import sys, diffray.methods as m; m.load_config('configs/ddpo.yaml'); "
            "print(sorted(k for k in ('torch', 'ray', 'deepspeed', 'diffusers') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SRC.parent, check=True)
    assert out.stdout.strip() == "[]"


def test_every_method_is_declared_once_and_importable():
    from diffray.config import TrainConfig
    from diffray.methods import METHODS

    for name, method in METHODS.items():
        assert method.name == name and issubclass(method.config, TrainConfig)
        assert method.config.model_fields["method"].default == name
        assert callable(method.task()), name
