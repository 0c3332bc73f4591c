"""benchmarks/gramian_cost.py runs end to end on a tiny configuration (a smoke test, not a timing test)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def _rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| conv")]


def test_gramian_cost_prints_the_table_with_errors_within_the_contract(capsys, benchmark_script, tmp_path):
    mod = benchmark_script("gramian_cost")
    mod.main(["--kinds", "conv", "--tasks", "2,3", "--steps", "1"])
    out = capsys.readouterr().out
    assert "| workload | T | P | Jacobian, ms | Gramian, µs |" in out and "reference" not in out.split("\n", 1)[1]
    rows = _rows(out)
    assert [r[1] for r in rows] == ["2", "3"] and all(r[2] == "56640" for r in rows)
    assert all(float(r[-2]) < 2e-6 for r in rows)  # the Gramian's error against float64: within the contract
    assert "nan" not in out
    # --reference: another revision's Gramian (here this one, renamed) on its own workspace, in the same steps
    src = Path(mod.__file__).resolve().parents[1] / "src" / "mtlens"
    shutil.copytree(src, tmp_path / "mtlens_ref", ignore=shutil.ignore_patterns("__pycache__"))
    try:
        mod.main(["--kinds", "conv", "--tasks", "3", "--steps", "1", "--reference", str(tmp_path)])
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "mtlens_ref" or m.startswith("mtlens_ref.")]:
            del sys.modules[name]
    out = capsys.readouterr().out
    assert "reference, µs | reference / Gramian |" in out and "nan" not in out
    (row,) = _rows(out)
    assert float(row[-2]) < 2e-6 and float(row[8]) > 0  # reference / Gramian: a ratio of two timings
