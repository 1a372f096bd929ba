"""The house has no import circles: a walk over every import statement in tinyinfer/ (those inside
functions included, since they run too) finds no cycle between modules.

Two edges inside kernels/ belong to issue 20 (a concurrent rewrite of kernels/matmul.py, simd.py,
quants.py and arm.py) and are left out here until it lands: arm <-> matmul, quants <-> simd.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "tinyinfer"

def _modules() -> dict:
    mods = {}
    paths = [Path(d) / f for d, _, fs in os.walk(ROOT, followlinks=True) for f in fs if f.endswith(".py")]
    for p in sorted(paths):                     # (tinyinfer/kernels is a symlink to ../kernels)
        parts = ("tinyinfer",) + p.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def import_graph() -> dict:
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # "from pkg import sub" imports the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:           # a name inside a module -> the module
                    t = t.rpartition(".")[0]
                if t and t != m:
                    graph[m].add(t)
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_imports():
    g = import_graph()
    assert "tinyinfer.engine" in g and "tinyinfer.kernels.ops" in g
    assert "tinyinfer.gguf" in g["tinyinfer.engine"]          # a top-level relative import
    assert "tinyinfer.models" in g["tinyinfer.engine"]        # one inside a function
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_no_source_text_compiled():
    """No exec / eval / compile of source text anywhere in the package (kernels/ and tools/ included):
    every kernel and driver is code a reader, a linter and coverage see."""
    import tinyinfer
    pkg = Path(tinyinfer.__file__).parent         # kernels/ and tools/ are symlinks in a checkout
    files = [Path(d) / f for d, _, fs in os.walk(pkg, followlinks=True) for f in fs if f.endswith(".py")]
    assert any(f.name == "matmul.py" for f in files)
    for p in files:
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("exec", "eval", "compile"), f"{p}:{node.lineno}: {node.func.id}()"
