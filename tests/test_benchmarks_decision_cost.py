"""benchmarks/decision_cost.py runs end to end on a tiny configuration (a smoke test, not a timing test)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest


def test_decision_cost_prints_every_table(capsys, benchmark_script, tmp_path):
    mod = benchmark_script("decision_cost")
    mod.main(["--tasks", "2,3", "--rounds", "1", "--methods", "pcgrad,mgda,pivrg", "--columns", "5000"])
    out = capsys.readouterr().out
    assert "Decision time, ms" in out and "decision / Gramian" in out and "| Gramian |" in out
    assert "| pcgrad |" in out and "| T = 3 |" in out and "nan" not in out
    assert "pivrg warns on its first call" in out  # no on_task_scores calls: said, not hidden
    assert "reference" not in out.split("\n", 1)[1]
    # --reference: another revision's methods (here this one, renamed) in the same rounds
    src = Path(mod.__file__).resolve().parents[1] / "src" / "mtlens"
    shutil.copytree(src, tmp_path / "mtlens_ref", ignore=shutil.ignore_patterns("__pycache__"))
    try:
        mod.main(["--tasks", "2", "--rounds", "1", "--methods", "pcgrad,gradvac", "--columns", "5000",
                  "--reference", str(tmp_path)])
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "mtlens_ref" or m.startswith("mtlens_ref.")]:
            del sys.modules[name]
    out = capsys.readouterr().out
    assert "Reference decision time" in out and "decision / reference" in out and "| gradvac |" in out
    assert "nan" not in out and "—" not in out


def test_decision_cost_rejects_unknown_methods(benchmark_script):
    mod = benchmark_script("decision_cost")
    with pytest.raises(SystemExit, match="unknown methods"):
        mod.main(["--methods", "pcgrad,not_a_method", "--rounds", "1"])
