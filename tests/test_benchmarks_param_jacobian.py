"""benchmarks/param_jacobian.py's modes run (smoke tests, not timing tests) and leave the engine as they found it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pj(benchmark_script):
    return benchmark_script("param_jacobian")


def test_phases_time_the_engine_and_restore_its_functions(pj, capsys):
    import mtlens.engine.backward as backward_mod
    import mtlens.engine.gradients as gradients_mod

    before = (gradients_mod._heads_pass, gradients_mod._encoder_rows, gradients_mod.TaskGradients.gramian,
              backward_mod.apply_decision, backward_mod.compute_task_gradients)
    pj.phases("conv", 2, 1)
    out = capsys.readouterr().out
    for label in ("Jacobian loop (floor)", "heads pass", "encoder rows", "Gramian", "decision (UPGrad)",
                  "apply_decision"):
        assert label in out
    after = (gradients_mod._heads_pass, gradients_mod._encoder_rows, gradients_mod.TaskGradients.gramian,
             backward_mod.apply_decision, backward_mod.compute_task_gradients)
    assert after == before


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_against_another_commit_runs_both_engines(pj, capsys):
    pj.run("conv", 2, 1, against="HEAD")
    out = capsys.readouterr().out
    assert "UPGrad loop @HEAD" in out and "UPGrad loop this tree / @HEAD" in out and "PCGrad loop this tree" in out


def test_steady_with_too_few_steps_is_a_usage_error(pj, capsys):
    """--steady drops each block's first two steps; --steps 2 used to end in StatisticsError (no median)."""
    with pytest.raises(SystemExit) as exc:
        pj.main(["--steady", "--kinds", "conv", "--tasks", "2", "--steps", "2", "--blocks", "1"])
    assert exc.value.code == 2 and "give 3 or more" in capsys.readouterr().err
