"""ddref's modules form layers: no import circles (issue 21).

Every ``import ddref.x`` / ``from ddref import x`` / ``from ddref.x import y`` edge between
ddref modules is collected from the source — at module level AND inside functions (a
deferred import still ties the two modules together) — and the graph must be acyclic, so a
reader can draw the layers from the bottom (backend, losses, …) up to the command line.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "ddref")


def modules():
    """{module name: source path} for every module of the ddref package (sub-packages too)."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), REPO)[:-3].replace(os.sep, ".")
                found[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, name)
    return found


def _resolve(name, known):
    """The longest known module that ``name`` (a dotted import target) lies in, else None."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges(known=None):
    """{module: {ddref modules it imports anywhere in its source}} (the package itself excluded)."""
    known = known or modules()
    edges = {}
    for module, path in known.items():
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:                      # relative: from . import x / from .x import y
                    parts = package.split(".")
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        found = {_resolve(t, known) for t in targets if t == "ddref" or t.startswith("ddref.")}
        edges[module] = {t for t in found if t and t != module and t != "ddref"}
    return edges


def cycles(edges):
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_planted_circle_and_a_deferred_import(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    pkg = tmp_path / "ddref"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("from ddref import y\n")
    (pkg / "y.py").write_text("def f():\n    from ddref.x import g\n    return g\n")
    known = {"ddref": str(pkg / "__init__.py"), "ddref.x": str(pkg / "x.py"), "ddref.y": str(pkg / "y.py")}
    edges = import_edges(known)
    assert edges["ddref.x"] == {"ddref.y"} and edges["ddref.y"] == {"ddref.x"}
    assert cycles(edges) == [["ddref.x", "ddref.y"]]


@pytest.mark.parametrize("pair", [("ddref.backend", "ddref._cupy"), ("ddref.fused", "ddref.nn")])
def test_the_gpu_circles_are_gone(pair):
    """The two circles of issue 21 this branch removes (the others are removed elsewhere)."""
    a, b = pair
    edges = import_edges()
    assert not (b in edges[a] and a in edges[b]), f"{a} and {b} import each other"


def test_no_import_circles_among_ddref_modules():
    found = cycles(import_edges())
    assert not found, "import circles: " + "; ".join(" ↔ ".join(c) for c in found)
