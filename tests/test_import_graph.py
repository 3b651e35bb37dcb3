"""The package's import graph: no cycles among its modules, dependencies pointing one way.

Every module of `flexiq_tvm` is parsed (ast, not imported) and its imports resolved to module names,
relative ones included. Module-level imports (anything not inside a function body, so imports under
`if`/`try` at module level count) form the graph the checks run on: those are what Python executes
at import time, where a cycle breaks or half-initialises modules. An import inside a function (a
lazy import) is the deliberate, visible way to reach a later stage at run time (a target loaded on
demand, the search calling the compiler); those are listed by `lazy_upward_imports` for reports and
not asserted on.

Layers (a module may import its own layer and the layers below it, never above):

    0  errors, _version, quant                      (numpy-only math, plan; error types; the version)
    1  frontend, passes, schedules                  (Relax import/discovery, rewrites, TIR)
    2  targets, runtime                             (lowering per target; the compiled artifact)
    3  calibrate, search, tuning, report, transform (the offline stages; the public pass API)
    4  serving                                      (ratio control, batching, the server)
    5  flexiq_tvm (package root), api, cli, __main__
"""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Set, Tuple

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flexiq_tvm")
PKG = "flexiq_tvm"

LAYERS = {
    "errors": 0, "_version": 0, "quant": 0,
    "frontend": 1, "passes": 1, "schedules": 1,
    "targets": 2, "runtime": 2,
    "calibrate": 3, "search": 3, "tuning": 3, "report": 3, "transform": 3,
    "serving": 4,
    "": 5, "api": 5, "cli": 5, "__main__": 5,
}


def package_modules(root: str = ROOT) -> Dict[str, str]:
    """module name -> file path, for every .py under the package."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != "__pycache__" and not x.startswith(".")]
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(d, f), os.path.dirname(root))[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(d, f)
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: str, modules) -> List[Tuple[str, bool]]:
    """(imported package module, at module level?) for every import in the file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_pkg = os.path.basename(path) == "__init__.py"
    out = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            func = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    out.append((a.name, not in_func))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, is_pkg, child)
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    out.append((sub if sub in modules else target, not in_func))
            visit(child, func)

    visit(tree, False)
    res = []
    for name, top in out:
        while name and name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            res.append((name, top))
    return res


def import_graph(root: str = ROOT, module_level_only: bool = True) -> Dict[str, Set[str]]:
    modules = package_modules(root)
    g = {m: set() for m in modules}
    for m, p in modules.items():
        for dep, top in imports_of(m, p, modules):
            if top or not module_level_only:
                g[m].add(dep)
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = m.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in modules and parent != m:
                pass  # parents are run by the import system, not by this module: not an edge of m
    return g


def find_cycles(g: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                strong(w)
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

    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10000))
    try:
        for v in sorted(g):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(old)
    return out


def layer_of(module: str):
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    return LAYERS.get(top)


def layer_violations(g: Dict[str, Set[str]]) -> List[str]:
    out = []
    for m in sorted(g):
        lm = layer_of(m)
        if lm is None:
            out.append(f"{m}: not in any layer (a loose module or a folder the layer table does not know)")
            continue
        for d in sorted(g[m]):
            ld = layer_of(d)
            if ld is not None and ld > lm:
                out.append(f"{m} (layer {lm}) imports {d} (layer {ld}) at module level")
    return out


def lazy_upward_imports(root: str = ROOT) -> List[str]:
    """Function-level imports that reach a higher layer (allowed; listed for reports)."""
    full, top = import_graph(root, False), import_graph(root, True)
    return [f"{m} -> {d}" for m in sorted(full) for d in sorted(full[m] - top[m])
            if layer_of(m) is not None and layer_of(d) is not None and layer_of(d) > layer_of(m)]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "module-level import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_dependencies_point_one_way():
    bad = layer_violations(import_graph())
    assert not bad, "layer direction violated:\n" + "\n".join(bad)


def test_graph_sees_relative_and_function_level_imports():
    """The walker itself: relative imports resolve, function-level ones are told apart."""
    g_top, g_all = import_graph(module_level_only=True), import_graph(module_level_only=False)
    assert "flexiq_tvm.quant.plan" in g_top["flexiq_tvm.quant"]          # `from .plan import ...` in __init__
    assert all(g_top[m] <= g_all[m] for m in g_top)
    assert sum(len(v) for v in g_all.values()) > sum(len(v) for v in g_top.values())


if __name__ == "__main__":
    g = import_graph()
    print("cycles:", find_cycles(g))
    print("\n".join(layer_violations(g)))
    print("lazy upward imports:\n  " + "\n  ".join(lazy_upward_imports()))
