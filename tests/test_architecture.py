"""The house stays in order: no import cycle, no function-level import that hides one, no oversized class.

Static (``ast``) analysis of ``src/mtlens`` by ``tools/house.py`` (``python tools/house.py --graph``
prints the figures); docs/architecture.md describes the layout these assertions keep true.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "house.py"


@pytest.fixture(scope="module")
def house():
    spec = importlib.util.spec_from_file_location("_house", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through the module's entry
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def modules(house):
    return house.analyse()


def test_the_analysis_sees_the_package(house, modules):
    assert "mtlens.train.loop" in modules and "mtlens.engine.backward" in modules
    # it resolves relative imports: the loop imports the engine and the evaluator at module level
    assert {"mtlens.engine", "mtlens.train.evaluator"} <= modules["mtlens.train.loop"].top


def test_the_analysis_finds_a_cycle_and_a_hidden_one(house, tmp_path):
    pkg = tmp_path / house.PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .a import x\n")
    (pkg / "c.py").write_text("def f():\n    from .d import y\n")
    (pkg / "d.py").write_text("from .c import f\n")
    mods = house.analyse(tmp_path)
    assert house.cycles(mods) == [[f"{house.PACKAGE}.a", f"{house.PACKAGE}.b"]]
    assert [h.split(":")[0] for h in house.hidden_cycles(mods)] == [f"{house.PACKAGE}.c"]


def test_no_module_level_import_cycle(house, modules):
    assert house.cycles(modules) == []


def test_no_function_level_import_hides_a_cycle(house, modules):
    assert house.hidden_cycles(modules) == []


def test_no_class_has_more_than_fifteen_methods(house, modules):
    over = [r for r in house.largest_classes(modules, 10**6) if r[1] > house.MAX_METHODS]
    assert over == []


def test_imports_flow_one_way_between_layers(house, modules):
    """cli -> bench -> train -> diagnose/methods -> engine: no lower layer imports a higher one (either kind)."""
    order = ["mtlens.cli", "mtlens.bench", "mtlens.train", "mtlens.diagnose", "mtlens.methods", "mtlens.engine"]
    rank = {p: i for i, p in enumerate(order)}
    graph = house.subpackage_graph(modules, lazy=True)
    upward = [f"{a} -> {b}" for a, bs in graph.items() for b in bs
              if a in rank and b in rank and rank[b] < rank[a]]
    assert upward == []


_ROOT = Path(__file__).resolve().parents[1]


def _user_facing_files():
    yield _ROOT / "README.md"
    yield from sorted((_ROOT / "docs").glob("*.md"))
    yield from sorted((_ROOT / "src" / "mtlens").rglob("*.py"))
    yield from sorted((_ROOT / "src" / "mtlens").rglob("*.yaml"))


def test_user_facing_text_cites_no_project_internal_shared_folder():
    """Users get the package and docs/, not the project's internal ``shared/`` folder: a citation
    must name the paper or a docs/ page."""
    offenders = []
    for f in _user_facing_files():
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if "shared/spec" in line or "shared/published" in line or "shared/papers" in line:
                offenders.append(f"{f.relative_to(_ROOT)}:{i}: {line.strip()}")
    assert not offenders, "cite the paper or a docs/ page instead:\n" + "\n".join(offenders)

