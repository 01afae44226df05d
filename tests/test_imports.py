"""Imports go one way, eval -> calibration -> cascade, and no modules import each other in a cycle.

The import graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` anywhere in a module counts, also inside functions and under ``TYPE_CHECKING``, since a
reader follows those too. An import names the most specific module of the project it reaches
(``from cascade.router import pool`` -> ``cascade.router.pool``; ``from cascade import Cascade`` -> ``cascade``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("cascade", "calibration", "eval")  # each may import only itself and the layers before it

# No two modules may import each other (directly or through others).
KNOWN_CYCLES: set[frozenset[str]] = set()


def project_modules(root: Path, packages: Iterable[str] = LAYERS) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the packages (a package is its __init__)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _target(name: str, modules: Mapping[str, Path]) -> str | None:
    """The most specific project module ``name`` falls in, or None outside the project."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported_names(module: str, path: Path) -> Iterable[str]:
    """Every dotted name an import statement of the module reaches (``from a import b`` gives ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, *([node.module] if node.module else [])])
            yield from (f"{base}.{alias.name}" for alias in node.names)  # a module, or a name in ``base``


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    graph = {}
    for module, path in modules.items():
        targets = {_target(name, modules) for name in _imported_names(module, path)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def upward_imports(graph: Mapping[str, set[str]], layers: tuple[str, ...] = LAYERS) -> list[str]:
    """``"a -> b"`` for every import of a later layer by an earlier one."""
    rank = {layer: i for i, layer in enumerate(layers)}
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if rank[b.split(".")[0]] > rank[a.split(".")[0]])


def cycles(graph: Mapping[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.add(frozenset(component))
    return found


def test_no_module_imports_a_later_layer() -> None:
    graph = import_graph(project_modules(ROOT))
    assert {"cascade.policy", "calibration.fit", "eval.quality"} <= set(graph)
    assert upward_imports(graph) == []


def test_no_import_cycles_besides_the_known_ones() -> None:
    found = cycles(import_graph(project_modules(ROOT)))
    assert found - KNOWN_CYCLES == set(), "new import cycle(s)"
    assert KNOWN_CYCLES - found == set(), "a known cycle is gone: remove it from KNOWN_CYCLES"


def test_the_walker_finds_upward_imports_and_cycles(tmp_path: Path) -> None:
    files = {
        "cascade/__init__.py": "",
        "cascade/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cascade import b\n",
        "cascade/b.py": "def f():\n    from .c import x\n",
        "cascade/c.py": "import cascade.a\nx = 1\n",
        "cascade/d.py": "import numpy\nfrom cascade.a import thing\n",
        "calibration/__init__.py": "",
        "calibration/fit.py": "def g():\n    import eval.report\n",
        "eval/__init__.py": "",
        "eval/report.py": "from calibration import fit\nfrom cascade.d import y\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    graph = import_graph(project_modules(tmp_path))
    assert graph["cascade.d"] == {"cascade.a"} and graph["eval.report"] == {"calibration.fit", "cascade.d"}
    assert upward_imports(graph) == ["calibration.fit -> eval.report"]
    assert cycles(graph) == {frozenset({"cascade.a", "cascade.b", "cascade.c"}),
                             frozenset({"calibration.fit", "eval.report"})}


def test_modules_and_functions_stay_small() -> None:
    """House rule (issue 16): no module over 450 lines and no function over 80 outside the tests."""
    too_long = []
    for name, path in project_modules(ROOT).items():
        source = path.read_text(encoding="utf-8")
        if source.count("\n") > 450:
            too_long.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None \
                    and node.end_lineno - node.lineno + 1 > 80:
                too_long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
