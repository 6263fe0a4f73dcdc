"""No two attrctl modules import each other, directly or through others.

Every import counts, wherever it is written: at module level, inside a function (a deferred
import), under ``if TYPE_CHECKING:``, absolute or relative. A package's ``__init__.py`` is a module
of its own (``attrctl.oracles``). Shared pieces belong in a lower module that both sides import
(docs/design.md, "Layers"); deferring one side's import does not remove the cycle.

kernels/ and cli/ install as ``attrctl.kernels`` and ``attrctl.cli`` (pyproject.toml), so they
are walked under those names too.
"""

from __future__ import annotations

import ast
from collections import deque
from itertools import pairwise
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {
    "attrctl": REPO / "attrctl",
    "attrctl.kernels": REPO / "kernels",
    "attrctl.cli": REPO / "cli",
}

#: module → {imported module: "file:line" of the first import of it}
Graph = dict[str, dict[str, str]]


def module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name → its file, for every ``.py`` file under the roots."""
    files = {}
    for package, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    return files


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may load, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # from . import x / from ..y import z
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = package[: len(package) - node.level + 1]
        base_name = ".".join([*base, *([node.module] if node.module else [])])
    else:
        base_name = node.module or ""
    # `from pkg import name`: name is a submodule, or something defined in pkg/__init__.py
    return [f"{base_name}.{alias.name}" for alias in node.names] + [base_name]


def module_graph(roots: dict[str, Path]) -> Graph:
    """Which of the modules under ``roots`` each of them imports (at any depth of its code)."""
    files = module_files(roots)
    graph: Graph = {name: {} for name in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = _imported_names(node, module, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):  # a submodule if there is one, else the package
                *subs, base = names
                found = [s for s in subs if s in files]
                names = found if len(found) == len(subs) else [*found, base]
            for name in names:
                while name and name not in files:  # `import a.b.c.name` → the module a.b.c
                    name = name.rpartition(".")[0]
                if name and name != module:
                    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                    graph[module].setdefault(name, f"{where}:{node.lineno}")
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def describe_cycle(graph: Graph, component: list[str]) -> str:
    """One concrete loop through ``component``, each step with the file:line that imports."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:  # shortest path from start back to start, inside the component
        node = queue.popleft()
        for nxt in sorted(graph[node]):
            if nxt not in members or nxt in came_from:
                continue
            came_from[nxt] = node
            if nxt == start:
                queue.clear()
                break
            queue.append(nxt)
    path = [start]
    while len(path) == 1 or path[-1] != start:
        path.append(came_from[path[-1]])
    path.reverse()
    steps = [f"{a} -> {b} ({graph[a][b]})" for a, b in pairwise(path)]
    return f"import cycle among {', '.join(component)}:\n    " + "\n    ".join(steps)


def test_attrctl_has_no_import_cycles():
    graph = module_graph(ROOTS)
    assert len(graph) > 50 and "attrctl.oracles" in graph and "attrctl.kernels" in graph
    # the walk sees imports deferred into functions
    assert "attrctl.policy.compile" in graph["attrctl.data.synth"]
    assert "attrctl.kernels" in graph["attrctl.losses.dispatch"]
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(describe_cycle(graph, c) for c in cycles)


def test_the_detector_finds_a_cycle_through_a_deferred_relative_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.a import A\n")
    (pkg / "a.py").write_text("from pkg.b import helper\n\nA = 1\n")
    (pkg / "b.py").write_text("def helper():\n    from . import a\n\n    return a.A\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import pkg\n"
    )
    graph = module_graph({"pkg": pkg})
    edges = {module: sorted(imported) for module, imported in graph.items()}
    assert edges == {"pkg": ["pkg.a"], "pkg.a": ["pkg.b"], "pkg.b": ["pkg.a"], "pkg.c": ["pkg"]}
    assert find_cycles(graph) == [["pkg.a", "pkg.b"]]
    message = describe_cycle(graph, ["pkg.a", "pkg.b"])
    assert "pkg.a -> pkg.b (" in message and "pkg.b -> pkg.a (" in message and "b.py:2" in message

    (pkg / "b.py").write_text("def helper():\n    return 1\n")  # the shared piece moved down
    assert find_cycles(module_graph({"pkg": pkg})) == []


LONG_MODULE = 500  # lines; a longer module says why at its top (a docstring line "Long: …")


def test_no_module_imports_another_modules_private_name():
    """``from attrctl.x import _name`` reaches into x's internals: what two modules share is
    public in one of them (or in a lower module both use)."""
    files = module_files(ROOTS)
    reach_ins = []
    for path in files.values():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                "attrctl"
            )):  # fmt: skip
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        where = path.relative_to(REPO)
                        reach_ins.append(f"{where}:{node.lineno} imports {alias.name}")
    assert not reach_ins, "\n".join(reach_ins)


def test_long_modules_say_why_at_their_top():
    files = module_files(ROOTS)
    unexplained = []
    for path in files.values():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") <= LONG_MODULE:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.startswith("Long: ") for line in doc.splitlines()):
            unexplained.append(f"{path.relative_to(REPO)} ({text.count(chr(10))} lines)")
    assert not unexplained, (
        f"over {LONG_MODULE} lines with no 'Long: …' line in the docstring: "
        + ", ".join(unexplained)
    )
