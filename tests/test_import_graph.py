"""The package's import graph has no cycles.

Every module under compiler/, passes/, backends/ and kernels/ is parsed (not imported);
each `import` / `from ... import` anywhere in it, function-level ones included (a lazy
import that closes a cycle is still a cycle in the design), becomes an edge between
`onnxforge.*` module names. `from pkg import name` counts as an edge to `pkg.name` when
that is a module, else to `pkg`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

REPO = Path(__file__).resolve().parents[1]
# folder -> the package name it installs as (pyproject.toml's package-dir)
PACKAGES = {
    "compiler": "onnxforge",
    "passes": "onnxforge.passes",
    "backends": "onnxforge.backends",
    "kernels": "onnxforge.kernels",
}
# Cycles known and being fixed elsewhere; each entry is the set of modules in the cycle.
ALLOWED_CYCLES: list[set[str]] = []


def module_files() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package __init__)."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join([package, *parts])] = (path, is_package)
    return modules


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """Absolute name of `from <level dots><target> import ...` written in `module`."""
    if level == 0:
        return target or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> nx.DiGraph:
    modules = module_files()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                # `import onnxforge.passes.base` names the module itself; a deeper dotted
                # name that is not a module (an attribute) falls back to its module.
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != module:
                    graph.add_edge(module, target)
    return graph


def import_cycles() -> list[list[str]]:
    return [c for c in nx.simple_cycles(import_graph()) if set(c) not in ALLOWED_CYCLES]


def test_modules_found():
    modules = module_files()
    assert "onnxforge.passes.base" in modules and "onnxforge.pipeline" in modules


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + c[:1]) for c in cycles)


def test_no_cycles_among_passes():
    graph = import_graph()
    passes = graph.subgraph(m for m in graph if m.startswith("onnxforge.passes"))
    assert not list(nx.simple_cycles(passes))


if __name__ == "__main__":
    for cycle in nx.simple_cycles(import_graph()):
        print(" -> ".join(cycle + cycle[:1]))
