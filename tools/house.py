"""The house in figures: import graph, import cycles, lazy imports that hide one, class sizes, file sizes.

    python tools/house.py                # summary (cycles, hidden cycles, largest classes and files)
    python tools/house.py --graph        # also the subpackage import graph (module-level edges)
    python tools/house.py --json         # everything as JSON

Static analysis with :mod:`ast` over ``src/mtlens`` (nothing is imported):

* a *module-level* import is one executed when the module is imported (top level, or inside a
  top-level ``if``/``try``; ``if TYPE_CHECKING:`` blocks are left out: they never run);
* a *function-level* import sits inside a function or method body;
* an import *cycle* is a strongly connected component (> 1 module) of the module-level graph;
* a function-level import from ``a`` to ``b`` *hides a cycle* when ``b`` leads back to ``a``
  through imports of either kind: it works only because it is deferred (imports of a module's own
  ancestor packages, which Python has loaded already, are not counted).

``tests/test_architecture.py`` asserts there are no cycles, no hidden cycles and no class with more
than :data:`MAX_METHODS` methods, so that the figures stay true.
"""

from __future__ import annotations

import argparse
import ast
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "mtlens"
MAX_METHODS = 15


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    lines: int
    top: set[str] = field(default_factory=set)  # module-level imports (mtlens modules)
    lazy: dict[str, list[int]] = field(default_factory=dict)  # function-level imports: target -> line numbers
    classes: dict[str, int] = field(default_factory=dict)  # class name -> number of methods


def _modules(root: Path = ROOT) -> dict[str, Module]:
    mods: dict[str, Module] = {}
    for p in sorted((root / PACKAGE).rglob("*.py")):
        rel = p.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        name = ".".join(parts)
        mods[name] = Module(name, p, is_pkg, len(p.read_text(encoding="utf-8").splitlines()))
    return mods


def _resolve(mod: Module, node: ast.ImportFrom | ast.Import, known: set[str]) -> set[str]:
    """The mtlens modules an import statement loads (the deepest existing module of each name)."""
    targets: set[str] = set()

    def deepest(name: str) -> str | None:
        parts = name.split(".")
        while parts:
            cand = ".".join(parts)
            if cand in known:
                return cand
            parts.pop()
        return None

    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name == PACKAGE or a.name.startswith(PACKAGE + "."):
                d = deepest(a.name)
                if d:
                    targets.add(d)
        return targets
    if node.level:
        base = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    if not (prefix == PACKAGE or prefix.startswith(PACKAGE + ".")):
        return targets
    for a in node.names:
        sub = f"{prefix}.{a.name}"
        d = sub if sub in known else deepest(prefix)
        if d:
            targets.add(d)
    return targets


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _scan(mod: Module, known: set[str]) -> None:
    tree = ast.parse(mod.path.read_text(encoding="utf-8"))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for c in child.orelse:
                    visit_stmt(c, in_function)
                continue
            visit_stmt(child, in_function)

    def visit_stmt(child: ast.AST, in_function: bool) -> None:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            for t in _resolve(mod, child, known):
                if t == mod.name:
                    continue
                if in_function:
                    mod.lazy.setdefault(t, []).append(child.lineno)
                else:
                    mod.top.add(t)
            return
        if isinstance(child, ast.ClassDef):
            n = sum(isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef)) for b in child.body)
            mod.classes[child.name] = n
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        visit(child, inner)

    visit(tree, False)


def analyse(root: Path = ROOT) -> dict[str, Module]:
    mods = _modules(root)
    known = set(mods)
    for m in mods.values():
        _scan(m, known)
    return mods


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        n = todo.pop()
        for m in graph.get(n, ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def cycles(mods: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components (> 1 module) of the module-level import graph (Tarjan)."""
    graph = {n: m.top for n, m in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _ancestor(pkg: str, mod: str) -> bool:
    return mod.startswith(pkg + ".")


def full_graph(mods: dict[str, Module]) -> dict[str, set[str]]:
    """Module-level and function-level imports together, without a module's imports of its own ancestor
    packages (``from .. import __version__``, ``from .. import methods`` inside ``methods``): Python has
    those packages loaded before the module runs."""
    return {n: {t for t in (m.top | set(m.lazy)) if not _ancestor(t, n)} for n, m in mods.items()}


def hidden_cycles(mods: dict[str, Module]) -> list[str]:
    """Function-level imports ``a -> b`` where ``b`` leads back to ``a`` (through any imports).

    Such an import only works because it is deferred: at module level it would be a cycle."""
    graph = full_graph(mods)
    found = []
    for a, m in sorted(mods.items()):
        for b, lines in sorted(m.lazy.items()):
            if b in graph[a] and a in _reach(graph, b):
                found.append(f"{a}:{lines[0]} -> {b}")
    return found


def subpackage(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def subpackage_graph(mods: dict[str, Module], *, lazy: bool = False) -> dict[str, set[str]]:
    g: dict[str, set[str]] = defaultdict(set)
    for n, m in mods.items():
        targets = set(m.top) | (set(m.lazy) if lazy else set())
        for t in targets:
            a, b = subpackage(n), subpackage(t)
            if a != b and b != PACKAGE:
                g[a].add(b)
    return dict(g)


def largest_classes(mods: dict[str, Module], n: int = 10) -> list[tuple[str, int]]:
    rows = [(f"{name}.{cls}", k) for name, m in mods.items() for cls, k in m.classes.items()]
    return sorted(rows, key=lambda r: (-r[1], r[0]))[:n]


def largest_files(mods: dict[str, Module], n: int = 10) -> list[tuple[str, int]]:
    rows = [(f"{m.name.replace('.', '/')}{'/__init__' if m.is_package else ''}.py", m.lines) for m in mods.values()]
    return sorted(rows, key=lambda r: (-r[1], r[0]))[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="store_true", help="print the subpackage import graph")
    ap.add_argument("--json", action="store_true", help="print everything as JSON")
    ap.add_argument("--src", type=Path, default=ROOT, help="the source root holding mtlens/ (default: this checkout's)")
    args = ap.parse_args()
    root = args.src.resolve()
    mods = analyse(root)
    report = {
        "modules": len(mods),
        "lines": sum(m.lines for m in mods.values()),
        "cycles": cycles(mods),
        "hidden_cycles": hidden_cycles(mods),
        "largest_classes": largest_classes(mods),
        "largest_files": largest_files(mods),
        "function_level_imports": sum(len(m.lazy) for m in mods.values()),
        "classes_over_limit": [r for r in largest_classes(mods, 10**6) if r[1] > MAX_METHODS],
        "subpackage_graph": {k: sorted(v) for k, v in sorted(subpackage_graph(mods).items())},
        "subpackage_graph_with_lazy": {k: sorted(v) for k, v in sorted(subpackage_graph(mods, lazy=True).items())},
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['modules']} modules, {report['lines']} lines under src/{PACKAGE}")
    print(f"module-level import cycles: {len(report['cycles'])}")
    for c in report["cycles"]:
        print("  " + " <-> ".join(c))
    print(f"function-level imports of mtlens modules: {report['function_level_imports']} "
          f"(hiding a cycle: {len(report['hidden_cycles'])})")
    for h in report["hidden_cycles"]:
        print("  " + h)
    print(f"classes with more than {MAX_METHODS} methods: {len(report['classes_over_limit'])}")
    print("largest classes (methods):")
    for name, k in report["largest_classes"]:
        print(f"  {k:3d}  {name}")
    print("largest files (lines):")
    for name, k in report["largest_files"]:
        print(f"  {k:5d}  {name}")
    if args.graph:
        print("subpackage imports (module level; + function level in brackets):")
        lazy = report["subpackage_graph_with_lazy"]
        for k in sorted(lazy):
            top = report["subpackage_graph"].get(k, [])
            extra = [x for x in lazy[k] if x not in top]
            print(f"  {k} -> {', '.join(top)}" + (f"  [{', '.join(extra)}]" if extra else ""))


if __name__ == "__main__":
    main()
