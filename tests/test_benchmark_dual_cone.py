"""benchmarks/dual_cone_in_step.py runs end to end and leaves UPGrad's Python route switched on."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_dual_cone_in_step_prints_its_table(capsys, benchmark_script):
    from mtlens.methods import _qp

    before = _qp.SMALL_T
    mod = benchmark_script("dual_cone_in_step")
    mod.main(["--steps", "2", "--kinds", "mlp", "--tasks", "3"])
    out = capsys.readouterr().out
    assert "| mlp | 3 |" in out and "without / with" in out and "nan" not in out
    assert _qp.SMALL_T == before > 0
