"""benchmarks/rep_mtl_cost.py runs (a smoke test, not a timing test), also against another commit's engine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rc(benchmark_script):
    return benchmark_script("rep_mtl_cost")


def test_rows_and_operator_counts(rc, capsys):
    rc.main(["--steps", "1", "--loads", "conv:2,mlp:2", "--profile"])
    out = capsys.readouterr().out
    assert "| conv, T = 2 |" in out and "| mlp, T = 2 |" in out
    assert "- EW + Rep-MTL:" in out and "aten operators per step, conv:2" in out and "floor / EW" in out


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_against_another_commit(rc, capsys, tmp_path):
    subprocess.run(f"git -C {ROOT} archive HEAD src/mtlens | tar -x -C {tmp_path}", shell=True, check=True)
    (tmp_path / "src" / "mtlens").rename(tmp_path / "src" / "mtlens_ref")
    rc.main(["--steps", "1", "--loads", "conv:2", "--reference", str(tmp_path / "src")])
    out = capsys.readouterr().out
    assert "new / old" in out and "| conv, T = 2 |" in out
