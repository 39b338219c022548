"""The package's import graph keeps its layers: no cycles, no import that points up.

The graph is built statically (``ast`` over ``asyncassets/**/*.py``), so a
cycle is found even when no test happens to import the modules in the order
that breaks. Imports inside functions count: a lazy import only hides a cycle
from the interpreter, not from the design. Imports under ``if TYPE_CHECKING:``
do not count: they never run.

Layers, top to bottom (as in ``DESIGN.md``); a module may import only from
its own layer or from a layer below it. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
import itertools
from collections import deque
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "asyncassets"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

#: Top to bottom. A name covers the module and, for a package, all its submodules.
#: The package's own ``__init__`` (the public facade) sits above every layer:
#: it re-exports the API, so nothing inside the package may import from it.
LAYERS: list[tuple[str, ...]] = [
    (PACKAGE,),
    ("__main__", "cli", "ops", "transfers", "web", "assets"),
    ("document", "queryset", "filequery"),
    ("references",),
    ("schema",),
    ("fields",),
    ("files",),
    ("storage",),
    ("connection", "_driver", "embedded", "_s3server", "errors", "_tasks"),
]

#: Modules outside the layer order, with the only modules they may import.
#: ``testing`` is a pytest plugin: users load it, nothing in the package imports it.
OUTSIDE_LAYERS: dict[str, tuple[str, ...]] = {
    "testing": ("connection", "embedded", "_s3server", "errors"),
}


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    #: ``file:line`` of the import statement, relative to the package's parent.
    where: str


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nearest_module(name: str, modules: set[str]) -> str | None:
    """``name`` or its longest prefix that is a module of the package."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(root: Path, path: Path, modules: set[str]) -> list[Import]:
    """Every import of a module of the package written in ``path``, wherever it sits.

    An edge goes to the module whose code the statement runs: ``from . import sub``
    to ``sub``, ``from . import name`` to the package's ``__init__``. The parent
    packages that Python initialises on the way are not edges: every submodule
    has them, and a real cycle through an ``__init__`` shows as an explicit import.
    """
    me = module_name(root, path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    rel = path.relative_to(root.parent)
    found: list[Import] = []

    def add(target: str | None, node: ast.stmt) -> None:
        if target is not None and target != me:
            found.append(Import(me, target, f"{rel}:{node.lineno}"))

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if _is_type_checking(node.test):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            for alias in node.names:
                add(_nearest_module(alias.name, modules), node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package.split(".")
                if node.level - 1 >= len(base):
                    raise AssertionError(
                        f"{path}:{node.lineno}: relative import beyond the package"
                    )
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                # `from pkg import sub` imports the submodule; `from pkg import name`
                # runs pkg/__init__.py.
                add(submodule if submodule in modules else _nearest_module(origin, modules), node)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def build_graph(root: Path = PACKAGE_DIR) -> tuple[set[str], list[Import]]:
    """The package's modules and its internal imports (one per statement and target)."""
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(root, p) for p in paths}
    edges = list(dict.fromkeys(imp for p in paths for imp in imports_of(root, p, modules)))
    return modules, edges


def _short(module: str) -> str:
    return module[len(PACKAGE) + 1 :] if module.startswith(PACKAGE + ".") else module


def _covers(name: str, module: str) -> bool:
    full = name if name == PACKAGE else f"{PACKAGE}.{name}"
    return module == full or (name != PACKAGE and module.startswith(full + "."))


def layer_of(module: str) -> int | None:
    """Index in LAYERS (0 is the top), or None for modules outside the order."""
    for index, names in enumerate(LAYERS):
        if any(_covers(name, module) for name in names):
            return index
    return None


def outside_layers(module: str) -> str | None:
    return next((name for name in OUTSIDE_LAYERS if _covers(name, module)), None)


def _layer_label(module: str) -> str:
    index = layer_of(module)
    if index is None:
        special = outside_layers(module)
        return f"{special}, outside the layers" if special else "no layer"
    if index == 0:
        return "the public facade, above every layer"
    return f"layer {index} [{', '.join(LAYERS[index])}]"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; only the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
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
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def shortest_cycle(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest path start -> ... -> start inside one strongly connected component."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node] & members):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is on no cycle")


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_graph_resolves_every_form_of_import(tmp_path: Path) -> None:
    # Guards the parser itself: a graph that lost edges would pass everything.
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import thing\nfrom . import b\n",
            "pkg/a.py": "import pkg.sub.c\nfrom pkg.sub import d as _d\nimport os\n",
            "pkg/b.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from .a import thing\n"
                "else:\n    from .sub import c\n"
                "def later():\n    from . import helper\n"
            ),
            "pkg/sub/__init__.py": "from ..b import x\n",
            "pkg/sub/c.py": "from . import name_in_init\nfrom .d import y\n",
            "pkg/sub/d.py": "import typing\nif typing.TYPE_CHECKING:\n    import pkg.b\n",
        },
    )
    modules, edges = build_graph(root)
    assert modules == {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d"}
    assert {(e.source, e.target, e.where) for e in edges} == {
        ("pkg", "pkg.a", "pkg/__init__.py:1"),
        ("pkg", "pkg.b", "pkg/__init__.py:2"),  # `from . import b`: the submodule
        ("pkg.a", "pkg.sub.c", "pkg/a.py:1"),
        ("pkg.a", "pkg.sub.d", "pkg/a.py:2"),
        ("pkg.b", "pkg.sub.c", "pkg/b.py:5"),  # the else of TYPE_CHECKING runs
        ("pkg.b", "pkg", "pkg/b.py:7"),  # in a function; a name of pkg/__init__.py
        ("pkg.sub", "pkg.b", "pkg/sub/__init__.py:1"),
        ("pkg.sub.c", "pkg.sub", "pkg/sub/c.py:1"),
        ("pkg.sub.c", "pkg.sub.d", "pkg/sub/c.py:2"),
    }


def test_the_cycle_finder_reports_a_shortest_path() -> None:
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert shortest_cycle("a", {"a", "b", "c"}, graph) == ["a", "b", "a"]
    assert shortest_cycle("c", {"a", "b", "c"}, graph) == ["c", "a", "b", "c"]


def test_every_module_has_a_layer() -> None:
    modules, _ = build_graph()
    unplaced = sorted(m for m in modules if layer_of(m) is None and outside_layers(m) is None)
    assert not unplaced, (
        f"modules with no layer: {', '.join(unplaced)}; "
        "give each one a layer in tests/test_layers.py (and DESIGN.md)"
    )


def test_no_import_cycles() -> None:
    modules, edges = build_graph()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    where: dict[tuple[str, str], Import] = {}
    for edge in edges:
        graph[edge.source].add(edge.target)
        where.setdefault((edge.source, edge.target), edge)

    reports = []
    for component in strongly_connected(graph):
        cycle = shortest_cycle(component[0], set(component), graph)
        steps = [
            f"  {_short(a)} -> {_short(b)}  ({where[a, b].where})"
            for a, b in itertools.pairwise(cycle)
        ]
        inside = [
            f"  {_short(e.source)} -> {_short(e.target)}  ({e.where})"
            for e in edges
            if e.source in component and e.target in component
        ]
        reports.append(
            f"cycle among {', '.join(_short(m) for m in component)}:\n"
            + "\n".join(steps)
            + "\n every import among them (cut enough of these to break it):\n"
            + "\n".join(inside)
        )
    assert not reports, f"{len(reports)} import cycle(s):\n" + "\n".join(reports)


def test_no_import_points_up_the_layers() -> None:
    _, edges = build_graph()
    violations = []
    for edge in edges:
        special = outside_layers(edge.source)
        if special is not None:
            allowed = OUTSIDE_LAYERS[special]
            if not any(_covers(name, edge.target) for name in allowed):
                violations.append(
                    f"  {_short(edge.source)} -> {_short(edge.target)}  ({edge.where}): "
                    f"{special} may import only {', '.join(allowed)}"
                )
            continue
        source, target = layer_of(edge.source), layer_of(edge.target)
        if source is None:
            continue  # reported by test_every_module_has_a_layer
        if target is None or target < source:
            violations.append(
                f"  {_short(edge.source)} ({_layer_label(edge.source)}) -> "
                f"{_short(edge.target)} ({_layer_label(edge.target)})  ({edge.where})"
            )
    assert not violations, (
        f"{len(violations)} import(s) pointing up the layers "
        "(top to bottom: "
        + " > ".join("[" + ", ".join(n) + "]" for n in LAYERS)
        + "):\n"
        + "\n".join(violations)
    )
