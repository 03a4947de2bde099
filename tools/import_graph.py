#!/usr/bin/env python
"""Check the import structure of ``megatron_pr2``: no import circle between its modules and no
upward import between packages (an import that goes against ``LAYERS``).

Reads every module's ``import`` statements (module level and inside functions; not those under
``if TYPE_CHECKING:``) with ``ast``; imports nothing. Exit status 1 when a circle or an upward
import is found.

    python tools/import_graph.py [--verbose]
"""

from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_pr2")

# Packages from the bottom up: a package may import from its own layer and the ones below.
LAYERS = (
    ("fallbacks", "progress", "platform", "rl", "tasks"),
    ("models", "routing"),
    ("rollout", "convert"),
    ("config", "confidence", "cli_help", "cli_errors"),
    ("weight_sync",),
    ("training",),
    ("preflight",),
    ("train", "compare"),
)


def module_name(path: str, root: str = ROOT) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def _is_type_checking(node) -> bool:
    """An ``if TYPE_CHECKING:`` block (imports for annotations only, never run)."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING")


def imports_of(path: str, name: str) -> set[str]:
    """The megatron_pr2 modules ``path`` imports (``from a import b`` counts ``a.b`` when it is
    a module, else ``a``)."""
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block)
                   for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.update(f"{base}.{a.name}" for a in node.names)  # a module, or a name in base
    return {m for m in found if m == "megatron_pr2" or m.startswith("megatron_pr2.")}


def graph(root: str = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports, for every module under ``root``."""
    paths = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files
             if f.endswith(".py")]
    modules = {module_name(p, root): p for p in paths}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for target in imports_of(path, name):
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                targets.add(target)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else None
    for level, names in enumerate(LAYERS):
        if top in names:
            return level
    return None


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    found = []
    for source, targets in edges.items():
        for target in targets:
            a, b = layer_of(source), layer_of(target)
            if a is not None and b is not None and b > a:
                found.append((source, target))
    return sorted(found)


def main(argv=None) -> int:
    verbose = "--verbose" in (argv or sys.argv[1:])
    edges = graph()
    bad = 0
    for component in cycles(edges):
        bad += 1
        print("import circle:", " <-> ".join(component))
    for source, target in upward(edges):
        bad += 1
        print(f"upward import: {source} -> {target}")
    unknown = sorted({m.split(".")[1] for m in edges if "." in m and layer_of(m) is None})
    if unknown:
        bad += 1
        print("packages missing from LAYERS:", ", ".join(unknown))
    if verbose or not bad:
        print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, "
              f"{bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
