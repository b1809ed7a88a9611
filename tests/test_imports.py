"""The modules of src/fourwalls import one another without cycles: data flows one way (see the README's
Architecture). Imports inside functions count too: a lazy import hides a cycle from Python, not from the design."""

from __future__ import annotations

import ast
import importlib
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import fourwalls

ROOT = Path(fourwalls.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The fourwalls modules that ``path`` imports anywhere in it (``from package import module`` names the module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, or from its parents for each extra dot
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def test_the_graph_sees_imports_at_every_level():
    graph = import_graph()
    assert "fourwalls.serve.app" in graph["fourwalls.serve.server"]  # at the top of the module
    assert "fourwalls.serve.server" in graph["fourwalls.cli"]  # inside a function
    assert "fourwalls.rag.stores" in graph["fourwalls.rag.retrieve"]  # from a package's __init__


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None


def test_route_modules_share_only_through_serve_common():
    """A route module (one with a ``router``) imports what routes share from serve.common, never another route
    module: new APIs are added beside the others without reaching into them."""
    graph = import_graph()
    serve = [m for m in graph if m.startswith("fourwalls.serve.")]
    routes = {m for m in serve if hasattr(importlib.import_module(m), "router")}
    assert {"fourwalls.serve.openai", "fourwalls.serve.rag", "fourwalls.serve.embeddings"} <= routes
    assert {m: graph[m] & routes for m in routes if graph[m] & routes} == {}
    assert all("fourwalls.serve.common" in graph[m] for m in routes)
