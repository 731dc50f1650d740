"""
Imports among quebert's modules go one way: no module imports, even inside
a function, a module that imports it back (directly or through others).

The graph is read from the source with ``ast``: every ``import`` and
``from ... import`` of a quebert module, at module level or in a function,
except under ``if TYPE_CHECKING:`` (never run).  An import placed in a
function to dodge a circle is still a circle.  A package's own
``__init__`` running before its submodules is Python's doing, not an
import statement, so it is no edge.
"""

from __future__ import annotations

import ast
import functools
import os
from typing import Dict, Iterator, List, Set, Tuple

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "quebert")

#: Cycles known to remain, each owned by another piece of work: tolerated,
#: not required (the test passes once they are gone too).  Their members,
#: as one frozenset per cycle.
KNOWN_CYCLES: tuple = ()


def module_files() -> Dict[str, str]:
    """Each quebert module's dotted name and file."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imported_names(tree: ast.AST, package: str, modules: Set[str]) -> Iterator[Tuple[str, int]]:
    """
    Every module an import statement of ``tree`` loads, with its line:
    ``from quebert import protocol`` loads ``quebert.protocol`` (the
    package itself is loaded anyway, as the parent), ``from quebert import
    task`` the package, for the name its ``__init__`` gives.
    """
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield (submodule if submodule in modules else base), node.lineno


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """``ast.walk`` without the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield other
                yield from _walk(other)
            continue
        yield child
        yield from _walk(child)


@functools.cache
def import_graph() -> Dict[str, Dict[str, int]]:
    """``{module: {module it imports: line of the first such import}}``."""
    files = module_files()
    graph: Dict[str, Dict[str, int]] = {}
    for module, path in files.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        edges: Dict[str, int] = {}
        for name, line in _imported_names(tree, package, set(files)):
            if name in files and name != module:
                edges.setdefault(name, line)
        graph[module] = edges
    return graph


def cycles(graph: Dict[str, Dict[str, int]]) -> List[Set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[Set[str]] = []

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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reaches(graph: Dict[str, Dict[str, int]], start: str, goal: str) -> bool:
    """Whether importing ``start`` may import ``goal``, through any modules."""
    seen, todo = {start}, [start]
    while todo:
        for w in graph[todo.pop()]:
            if w == goal:
                return True
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return False


class ImportGraphTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.graph = import_graph()

    def describe(self, component: Set[str]) -> str:
        return "; ".join(f"{a} -> {b} (line {line})" for a in sorted(component)
                         for b, line in sorted(self.graph[a].items()) if b in component)

    def test_function_level_imports_are_seen(self) -> None:
        """Else the checks below would pass for imports tucked into functions."""
        self.assertIn("quebert.dispatch", self.graph["quebert.config"])  # in a method
        self.assertIn("quebert.protocol", self.graph["quebert.client"])  # from quebert import

    def test_no_import_cycle(self) -> None:
        unexpected = [c for c in cycles(self.graph) if frozenset(c) not in KNOWN_CYCLES]
        self.assertEqual(unexpected, [], "\n".join(map(self.describe, unexpected)))

    def test_registry_does_not_reach_the_client(self) -> None:
        """The default client is looked up in quebert._default_client."""
        self.assertTrue(reaches(self.graph, "quebert.client", "quebert.registry"))
        self.assertFalse(reaches(self.graph, "quebert.registry", "quebert.client"))

    def test_protocol_does_not_reach_legacy(self) -> None:
        """quebert.legacy registers its decoder with the protocol."""
        self.assertTrue(reaches(self.graph, "quebert.legacy", "quebert.protocol"))
        self.assertFalse(reaches(self.graph, "quebert.protocol", "quebert.legacy"))

    def test_tap_worker_watchdog_go_one_way(self) -> None:
        """tap -> worker -> watchdog; the exit codes and api_config live below them."""
        for upper, lower in (("quebert.tap", "quebert.worker"),
                             ("quebert.worker", "quebert.watchdog"),
                             ("quebert.tap", "quebert.watchdog")):
            self.assertTrue(reaches(self.graph, upper, lower), (upper, lower))
            self.assertFalse(reaches(self.graph, lower, upper), (lower, upper))
