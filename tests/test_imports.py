"""The import rules, read from the source with `ast` (nothing is imported to check them).

- The parts meet only in proto/: agent, controlplane and dashboard never import each other,
  and proto imports none of them.
- Nothing imports the old top-level names (`agent`, `controlplane`, `dashboard`, `proto`):
  installed, they are subpackages of headroom_sidecar.
- No import cycle among headroom_sidecar modules.

Every import statement anywhere in a file counts: inside functions (lazy), under
TYPE_CHECKING, in try/except. `python tests/test_imports.py` prints the offenders and counts.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "headroom_sidecar"
PARTS = ("agent", "controlplane", "dashboard", "proto")
# Folders whose own imports must use the namespace too (they are not part of the graph).
OTHER_FOLDERS = ("tests", "bench", "workloads", "deploy")
OLD_NAMES = frozenset(PARTS)


@dataclass(frozen=True)
class Edge:
    source: str      # module name, headroom_sidecar.<part>...
    target: str      # the module imported (the longest known module the name resolves to)
    where: str       # file:line


@dataclass
class Report:
    cross_part: list[Edge] = field(default_factory=list)
    old_names: list[str] = field(default_factory=list)       # "file:line: import text"
    cycles: list[list[str]] = field(default_factory=list)    # each: modules of one SCC
    cycle_edges: dict[tuple[str, str], str] = field(default_factory=dict)

    def counts(self) -> str:
        return (f"import graph: {len(self.cycles)} cycle(s), {len(self.cross_part)} cross-part "
                f"import(s), {len(self.old_names)} old top-level import(s)")


def module_name(root: Path, path: Path) -> str:
    """root/agent/observe/requests.py -> headroom_sidecar.agent.observe.requests."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([NAMESPACE, *parts])


def source_files(root: Path, folders) -> list[Path]:
    return sorted(p for folder in folders if (root / folder).is_dir()
                  for p in (root / folder).rglob("*.py") if ".venv" not in p.parts)


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute dotted names one import statement asks for: `import a.b` -> [a.b];
    `from a import b, c` -> [a.b, a.c] (a name that is no module resolves to `a` later);
    relative imports are made absolute against `module`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[:len(package) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{alias.name}" if alias.name != "*" else base for alias in node.names]


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that `name` is or lies in; None outside the namespace."""
    parts = name.split(".")
    for end in range(len(parts), 1, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def _part(module: str) -> str:
    return module.split(".")[1]


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _old_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.ImportFrom):
        top = (node.module or "").split(".")[0] if not node.level else ""
        return node.module if top in OLD_NAMES else None
    tops = [a.name for a in node.names if a.name.split(".")[0] in OLD_NAMES]
    return ", ".join(tops) if tops else None


def build_graph(root: Path, report: Report) -> dict[str, dict[str, str]]:
    """module -> {imported module -> file:line of the first such import}; fills the
    cross-part and old-name findings of `report` on the way."""
    files = source_files(root, PARTS)
    known = {module_name(root, p) for p in files}
    graph: dict[str, dict[str, str]] = {m: {} for m in known}
    for path in files:
        source = module_name(root, path)
        rel = path.relative_to(root)
        for node in _imports(path):
            where = f"{rel}:{node.lineno}"
            old = _old_name(node)
            if old:
                report.old_names.append(f"{where}: {old}")
            for name in _imported_names(node, source, path.name == "__init__.py"):
                target = _resolve(name, known)
                if target is None or target == source:
                    continue
                graph[source].setdefault(target, where)
                if _part(target) != _part(source) and not _allowed(source, target):
                    report.cross_part.append(Edge(source, target, where))
    return graph


def _allowed(source: str, target: str) -> bool:
    # Everything may import the contract; the contract imports no part.
    return _part(target) == "proto"


def strongly_connected(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (deep graphs); components of more than one module, or
    one module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
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
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                if len(component) > 1 or node in graph.get(node, {}):
                    out.append(sorted(component))
    return out


def one_cycle(graph: dict[str, dict[str, str]], component: list[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside it."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    return component


def analyse(root: Path) -> tuple[Report, dict[str, dict[str, str]]]:
    report = Report()
    graph = build_graph(root, report)
    report.cycles = strongly_connected(graph)
    for path in source_files(root, OTHER_FOLDERS):
        for node in _imports(path):
            old = _old_name(node)
            if old:
                report.old_names.append(f"{path.relative_to(root)}:{node.lineno}: {old}")
    return report, graph


def describe_cycles(report: Report, graph: dict[str, dict[str, str]]) -> list[str]:
    lines = []
    for component in report.cycles:
        path = one_cycle(graph, component)
        lines.append(f"cycle of {len(component)} module(s): {', '.join(component)}")
        for a, b in zip(path, path[1:]):
            lines.append(f"    {a} -> {b}  ({graph[a][b]})")
    return lines


def describe(report: Report, graph: dict[str, dict[str, str]]) -> str:
    lines = [report.counts()]
    lines += [f"cross-part: {e.where}: {e.source} imports {e.target}" for e in report.cross_part]
    lines += [f"old top-level name: {o}" for o in report.old_names]
    lines += describe_cycles(report, graph)
    return "\n".join(lines)


# ---------------------------------------------------------------------- the checkout
@pytest.fixture(scope="module")
def checkout():
    report, graph = analyse(ROOT)
    print("\n" + describe(report, graph))
    return report, graph


def test_parts_meet_only_in_proto(checkout):
    report, graph = checkout
    assert not report.cross_part, describe(report, graph)


def test_no_old_top_level_imports(checkout):
    report, graph = checkout
    assert not report.old_names, describe(report, graph)


def test_no_import_cycles(checkout):
    report, graph = checkout
    assert not report.cycles, describe(report, graph)


# ---------------------------------------------------------------------- the checker itself
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for part in PARTS:
        (tmp_path / part).mkdir(exist_ok=True)
        (tmp_path / part / "__init__.py").touch()
    return tmp_path


def test_checker_finds_lazy_cross_part_import(tmp_path):
    root = _tree(tmp_path, {
        "agent/a.py": "def f():\n    from headroom_sidecar.controlplane import store\n",
        "controlplane/store.py": "from headroom_sidecar.proto import x\n",
        "proto/x.py": "",
        "dashboard/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                          "    import headroom_sidecar.agent.a\n",
    })
    report, _ = analyse(root)
    found = sorted((e.where, e.target) for e in report.cross_part)
    assert found == [("agent/a.py:2", "headroom_sidecar.controlplane.store"),
                     ("dashboard/d.py:3", "headroom_sidecar.agent.a")]
    assert not report.cycles and not report.old_names


def test_checker_finds_cycles_through_relative_and_lazy_imports(tmp_path):
    root = _tree(tmp_path, {
        "controlplane/a.py": "from .b import thing\n",
        "controlplane/b.py": "def g():\n    from headroom_sidecar.controlplane.c import h\n",
        "controlplane/c.py": "import headroom_sidecar.controlplane.a\n",
        "controlplane/d.py": "from headroom_sidecar.controlplane import a\n",   # into it, not on it
    })
    report, graph = analyse(root)
    assert report.cycles == [["headroom_sidecar.controlplane.a", "headroom_sidecar.controlplane.b",
                              "headroom_sidecar.controlplane.c"]]
    text = "\n".join(describe_cycles(report, graph))
    assert "controlplane/b.py:2" in text and "controlplane/c.py:1" in text


def test_checker_finds_old_top_level_names(tmp_path):
    root = _tree(tmp_path, {
        "agent/a.py": "import proto.headroom_pb2\nfrom agent import b\nfrom .b import c\n",
        "agent/b.py": "c = 1\n",
        "tests/t.py": "def f():\n    from controlplane.store import Store\n",
        "workloads/w.py": "import protobuf\nfrom dashboardx import y\n",
    })
    report, _ = analyse(root)
    assert report.old_names == ["agent/a.py:1: proto.headroom_pb2", "agent/a.py:2: agent",
                                "tests/t.py:2: controlplane.store"]


def test_checker_allows_imports_of_the_contract(tmp_path):
    root = _tree(tmp_path, {
        "agent/a.py": "from headroom_sidecar.proto import plandoc\n",
        "dashboard/d.py": "from headroom_sidecar.proto.plandoc import X\n",
        "proto/plandoc.py": "from headroom_sidecar.agent import a\n",   # the contract imports no part
    })
    report, _ = analyse(root)
    assert [(e.source, e.target) for e in report.cross_part] == [
        ("headroom_sidecar.proto.plandoc", "headroom_sidecar.agent.a")]


if __name__ == "__main__":
    found, import_graph = analyse(ROOT)
    print(describe(found, import_graph))
    sys.exit(1 if found.cross_part or found.old_names or found.cycles else 0)
