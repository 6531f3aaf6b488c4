"""The import rules of docs/design.md, read from the source: imports point one way (tools ->
search -> jaxyolo), form no cycle (imports inside functions included), and take no private name
from another module; JAX internals are reached from one place only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"jaxyolo": "jaxyolo", "search": "jaxyolo.search", "tools": "jaxyolo.tools"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, prefix in PACKAGES.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = f.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((prefix, *parts))
            out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = f
    return out


def _imports(path: Path):
    """(imported module, [names], line) of every absolute import in the file, nested ones too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names], node.lineno


def _graph():
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: set() for m in mods}
    for m, f in mods.items():
        for mod, names, _ in _imports(f):
            for target in [mod] + [f"{mod}.{n}" for n in names]:
                t = owner(target)
                if t and t != m and not m.startswith(t + "."):
                    edges[m].add(t)
    return edges


def test_imports_point_one_way():
    rank = {"jaxyolo": 0, "jaxyolo.search": 1, "jaxyolo.tools": 2}

    def layer(m):
        return max((r for p, r in rank.items() if m == p or m.startswith(p + ".")), default=0)

    bad = [(m, t) for m, ts in _graph().items() for t in ts if layer(t) > layer(m)]
    assert not bad, bad


def test_no_import_cycles():
    edges = _graph()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_private_names_across_modules():
    bad = []
    for m, f in _modules().items():
        for mod, names, line in _imports(f):
            if mod.startswith(("jaxyolo", "search", "tools")) and any(n.startswith("_") for n in names):
                bad.append(f"{f.relative_to(ROOT)}:{line} {mod} {names}")
            if mod.startswith("jax._src") and m != "jaxyolo.xla_cpu":
                bad.append(f"{f.relative_to(ROOT)}:{line} {mod}")
    assert not bad, bad


def test_the_rules_see_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    """The checks above are not vacuous: two modules importing each other, and a private import."""
    pkg = tmp_path / "jaxyolo"
    pkg.mkdir()
    (pkg / "a.py").write_text("from jaxyolo.b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    import jaxyolo.a\n")
    for folder in ("search", "tools"):
        (tmp_path / folder).mkdir()
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert _graph() == {"jaxyolo.a": {"jaxyolo.b"}, "jaxyolo.b": {"jaxyolo.a"}}
    with pytest.raises(AssertionError, match="jaxyolo.a"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="_hidden"):
        test_no_private_names_across_modules()
