"""The project's layers, read from its imports: one way only, and no circle.

``common/`` is shared by both sides and imports neither; the site (``client/``) and the
coordinator (``server/``) never import each other; ``fedlora/`` (the CLI) may import all three.
Every import counts, wherever it sits: at module level, inside a function, or under
``if TYPE_CHECKING`` (a type-only import still ties the two modules together).
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "fedlora")
# Which packages each package must never import.
FORBIDDEN = {
    "common": {"client", "server", "fedlora"},
    "client": {"server", "fedlora"},
    "server": {"client", "fedlora"},
    "fedlora": set(),
}


@dataclass(frozen=True)
class Edge:
    """One import of a project module by another: ``source`` imports ``target``."""

    source: str
    target: str
    path: Path
    line: int

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the four packages, by dotted name."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_modules(
    node: ast.Import | ast.ImportFrom, source: str, is_package: bool, known: set[str]
) -> list[str]:
    """The project modules an import statement loads: ``from pkg import mod`` loads pkg.mod,
    ``from mod import name`` loads mod, ``import a.b`` loads a.b."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        package = source.split(".") if is_package else source.split(".")[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
    if submodules:
        return submodules
    return [base] if base in known else []


def edges_of(source: str, path: Path, known: set[str]) -> list[Edge]:
    """The project modules that ``source`` imports, each once (the line of a module-level import
    of it where there is one, else of the first nested one found)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: dict[str, Edge] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for name in imported_modules(node, source, is_package, known):
                if name != source and name not in found:
                    found[name] = Edge(source, name, path, node.lineno)
    return sorted(found.values(), key=lambda e: e.line)


def import_graph() -> list[Edge]:
    modules = project_modules()
    known = set(modules)
    return [edge for name, path in modules.items() for edge in edges_of(name, path, known)]


def layer_violations(edges: list[Edge]) -> list[str]:
    return [
        edge.where()
        for edge in edges
        if edge.target.split(".")[0] in FORBIDDEN[edge.source.split(".")[0]]
    ]


def find_cycles(edges: list[Edge]) -> list[tuple[list[str], list[str]]]:
    """Per strongly connected component of more than one module (Tarjan): one cycle through
    it, and all its modules (breaking that cycle may leave another among them)."""
    graph: dict[str, list[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge.target)
        graph.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [(cycle_in(sorted(c), graph), sorted(c)) for c in components]


def cycle_in(component: list[str], graph: dict[str, list[str]]) -> list[str]:
    """A closed path through the component's first module: [a, b, ..., a]."""
    members = set(component)
    start = component[0]
    paths: dict[str, list[str]] = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in graph[node]:
            if nxt == start:
                return [*paths[node], start]
            if nxt in members and nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    return component  # unreachable for a strongly connected component


def test_graph_sees_the_packages() -> None:
    """The parser finds the imports it should (a broken walk would pass everything)."""
    edges = import_graph()
    sources = {e.source.split(".")[0] for e in edges}
    assert sources == set(PACKAGES)
    assert any(e.source == "fedlora.cli" and e.target.startswith("server.") for e in edges)


def test_layers_import_one_way() -> None:
    bad = layer_violations(import_graph())
    header = "imports against the layers (common imports none of the others; client and server "
    assert not bad, header + "not each other):\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    edges = import_graph()
    lines = {(e.source, e.target): e.where() for e in edges}
    report = []
    for cycle, members in find_cycles(edges):
        steps = [lines[(a, b)] for a, b in itertools.pairwise(cycle)]
        tangle = f"\n    (all tangled together: {', '.join(members)})" if len(members) > 2 else ""
        report.append(" -> ".join(cycle) + "\n    " + "\n    ".join(steps) + tangle)
    assert not report, "import cycles:\n" + "\n".join(report)


def test_parser_sees_nested_type_only_and_relative_imports(tmp_path: Path) -> None:
    path = tmp_path / "mod.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from server.registry import Registry\n"
        "def f() -> None:\n"
        "    from client import site\n"
        "    import common.config\n"
        "from .tokens import encode_examples\n",
        encoding="utf-8",
    )
    known = {"server.registry", "client", "client.site", "common.config", "common.tokens"}
    targets = [e.target for e in edges_of("common.mod", path, known)]
    assert sorted(targets) == ["client.site", "common.config", "common.tokens", "server.registry"]
    edges = [Edge("common.mod", t, ROOT / "common" / "mod.py", 1) for t in targets]
    assert len(layer_violations(edges)) == 2  # common -> client and common -> server


def test_cycle_finder_reports_a_cycle() -> None:
    path = ROOT / "x.py"
    edges = [Edge("a", "b", path, 1), Edge("b", "c", path, 2), Edge("c", "a", path, 3)]
    edges.append(Edge("c", "d", path, 4))
    assert find_cycles(edges) == [(["a", "b", "c", "a"], ["a", "b", "c"])]
    assert find_cycles(edges[1:]) == []


# ---------------------------------------------------------------------------- the tests' own
TESTS = ROOT / "tests"


def names_of_test_modules(root: Path) -> set[str]:
    """Every test module (``test_*.py``, ``conftest.py``) under ``root``, by each name it can be
    imported as: dotted from the repository (``tests.server.test_strategy``), and bare
    (``test_strategy``) since pytest puts a test file's folder on ``sys.path``."""
    names: set[str] = set()
    for path in root.rglob("*.py"):
        if path.name.startswith("test_") or path.name == "conftest.py":
            names |= {module_name(path), path.stem}
    return names


def test_no_test_module_imports_another() -> None:
    known = names_of_test_modules(TESTS)
    bad = [
        edge.where()
        for path in sorted(TESTS.rglob("*.py"))
        for edge in edges_of(module_name(path), path, known)
    ]
    header = "test modules imported (what tests share belongs in tests/helpers/):\n"
    assert not bad, header + "\n".join(bad)


def test_test_import_check_sees_dotted_and_bare_imports(tmp_path: Path) -> None:
    """Both forms are found (a broken walk would pass everything); a helper is allowed."""
    path = tmp_path / "test_fake.py"
    path.write_text(
        "from tests.test_simulation import RecordingGrid\n"
        "def f() -> None:\n"
        "    import test_strategy\n"
        "from tests.helpers.recording import open_envelope\n",
        encoding="utf-8",
    )
    known = names_of_test_modules(TESTS)
    targets = [e.target for e in edges_of("tests.test_fake", path, known)]
    assert targets == ["tests.test_simulation", "test_strategy"]
