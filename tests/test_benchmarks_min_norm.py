"""The min-norm solver benchmarks run end to end (smoke tests, not timing tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _markdown import markdown_tables_are_rectangular

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
def test_min_norm_solver_benchmark_against_a_reference_copy():
    ref = str(ROOT / "src" / "mtlens" / "methods" / "_solvers.py")  # itself: the A/B machinery runs
    out = _run("benchmarks/min_norm_solver.py", "--reference", ref, "--families", "random,rank5,ill",
               "--tasks", "2,7", "--rounds", "1", "--min-run-time", "0.001")
    rows = [line for line in out.splitlines() if line.startswith(("| random", "| rank5", "| ill"))]
    assert len(rows) == 6 and markdown_tables_are_rectangular(out) == 1  # the ``|value − ref|`` column escaped
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[4]) <= 1e-13  # KKT gap of the current solver
        assert float(cells[9]) <= 1e-12 or cells[0] == "rank5"  # same value as the reference (rank5: ~0)


@pytest.mark.slow
def test_mgda_floor_benchmark_prints_the_bound():
    out = _run("benchmarks/mgda_floor.py", "--kinds", "mlp", "--tasks", "2", "--rounds", "1",
               "--min-run-time", "0.001")
    assert markdown_tables_are_rectangular(out) == 1  # the ``T²·|Z|`` column escaped
    row = next(line for line in out.splitlines() if line.startswith("| mlp | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "0.3 M" and cells[3] == "327 M"  # T²·|Z| = 4·65 536; 3 × 109 M encoder MACs
    assert float(cells[-2]) > 0 and float(cells[-1]) > 0


@pytest.mark.slow
def test_feature_fixed_cost_benchmark_against_a_reference_copy(tmp_path):
    shutil.copytree(ROOT / "src" / "mtlens", tmp_path / "mtlens_ref")  # itself, renamed: the A/B machinery runs
    out = _run("benchmarks/feature_fixed_cost.py", "--reference", str(tmp_path), "--kinds", "mlp", "--tasks", "2",
               "--rounds", "1")
    row = next(line for line in out.splitlines() if line.startswith("| mlp | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # EW ms, floor / EW, MGDA floor / EW, (MGDA, UPGrad) × (ref, new) / EW, MGDA ref/new / MGDA floor, faults
    assert len(cells) == 12
    assert all(float(c) > 0 for c in cells[2:11])


@pytest.mark.slow
def test_feature_ladder_benchmark_prints_every_row():
    out = _run("benchmarks/feature_ladder.py", "--kinds", "mlp", "--tasks", "3", "--steps", "2")
    row = next(line for line in out.splitlines() if line.startswith("| mlp | 3 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 8 and float(cells[2]) > 0  # EW ms, then floor … mgda as "ms (ratio to EW)"
    assert all(float(c.split()[0]) > 0 and c.split()[1].startswith("(") for c in cells[3:])
