"""The dual-cone projection skips the solver for rows whose lower bound is already optimal (no conflict)."""

from __future__ import annotations

import numpy as np
import pytest

from mtlens.methods import _qp


def _gram(J: np.ndarray) -> np.ndarray:
    return J @ J.T


@pytest.mark.parametrize("ridge", ["relative", "trace"])
def test_no_conflict_returns_the_bounds_without_solving(monkeypatch, ridge):
    rng = np.random.default_rng(0)
    J = np.abs(rng.standard_normal((4, 30)))  # non-negative rows: every cosine ≥ 0, nothing conflicts
    calls = []
    real = _qp._solve_nnls
    monkeypatch.setattr(_qp, "_solve_nnls", lambda *a: calls.append(a) or real(*a))
    V = _qp.dual_cone_weights(_gram(J), np.eye(4), reg_eps=1e-12, ridge=ridge)
    assert not calls
    np.testing.assert_array_equal(V, np.eye(4))


@pytest.mark.parametrize("ridge", ["relative", "trace"])
def test_only_conflicting_rows_are_solved_and_match_the_full_solve(monkeypatch, ridge):
    """Tasks 0 and 1 conflict; 2 and 3 conflict with nobody: their rows keep v = e_i, the others are solved,
    and everything equals the solver's answer on all rows."""
    rng = np.random.default_rng(1)
    J = np.zeros((4, 40))
    J[0] = np.abs(rng.standard_normal(40))
    J[1, :20] = -0.3 * J[0, :20] + 0.05 * np.abs(rng.standard_normal(20))  # conflicts with task 0 only
    J[2:, 20:] = np.abs(rng.standard_normal((2, 20)))  # tasks 2, 3: columns task 1 does not touch
    G = _gram(J)
    C = G / np.sqrt(np.outer(np.diag(G), np.diag(G)))
    assert C[0, 1] < 0 and (C[2:] >= 0).all()  # the premise
    rows = []
    real = _qp._solve_nnls
    monkeypatch.setattr(_qp, "_solve_nnls", lambda M, U, *a: rows.append(len(U)) or real(M, U, *a))
    V = _qp.dual_cone_weights(G, np.eye(4), reg_eps=1e-12, ridge=ridge)
    assert rows == [2]  # one solve, for the two conflicting rows only
    np.testing.assert_array_equal(V[2:], np.eye(4)[2:])
    M = G / np.trace(G) if ridge == "trace" else C
    n = np.ones(4) if ridge == "trace" else np.sqrt(np.diag(G))
    full = real(M, np.eye(4) * n, 1e-12, "reference") / n
    np.testing.assert_allclose(V, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ridge", ["relative", "trace"])
@pytest.mark.parametrize("pref", [None, (1.0, 2.0, 0.5, 3.0)])
def test_upgrad_without_conflict_is_the_general_route_bit_for_bit(monkeypatch, ridge, pref):
    """UPGrad on a Gramian with no negative entry returns p from one tolist(): the same tensor as the
    general route (eigen-decomposition / NNLS skipped there too), which it never enters."""
    import torch

    from mtlens.methods import create

    J = torch.rand(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    J[3] = 0.0  # a zero gradient: no conflict either
    G = J @ J.T
    up = create("upgrad", ridge=ridge, pref_vector=pref)
    fast = up.weights(G)
    monkeypatch.setattr(type(up), "_without_conflict", lambda self, g: None)
    general = up.weights(G)
    assert fast.dtype == general.dtype == torch.float64 and torch.equal(fast, general)


def test_upgrad_fast_path_defers_conflicts_and_faults_to_the_general_route():
    import torch

    from mtlens.errors import NonFiniteError, ShapeError
    from mtlens.methods import create

    up = create("upgrad")
    G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
    assert up._without_conflict(G) is None
    w = up.weights(G)
    assert not torch.equal(w, torch.full((2,), 0.5, dtype=torch.float64))  # projected: more than the mean
    with pytest.raises(NonFiniteError):
        up.weights(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=torch.float64))
    with pytest.raises(ShapeError):
        up.weights(torch.ones(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("reg_eps", [0.0, 1e-12, 1e-3])
@pytest.mark.parametrize("pref", [None, (1.0, 3.0)])
def test_upgrad_two_conflicting_tasks_in_closed_form_match_the_nnls_route(monkeypatch, reg_eps, pref):
    """T = 2 with a conflict: the closed form equals the eigendecomposition + NNLS route (as coefficients of
    the unit gradients, to that route's own round-off) over cosines from -0.999999 to -1e-6 and gradient
    norms 1e-6 to 1e6 apart, and weights() never enters that route."""
    import torch

    from mtlens.methods import create

    up = create("upgrad", reg_eps=reg_eps, pref_vector=pref)
    rng = np.random.default_rng(7)
    cases = 0
    for c in (-0.999999, -0.9, -0.5, -0.1, -1e-6):
        for ratio in (1e-6, 0.3, 1.0, 7.0, 1e6):
            n0, n1 = float(rng.uniform(0.5, 2.0)), None
            n1 = n0 * ratio
            G = torch.tensor([[n0 * n0, c * n0 * n1], [c * n0 * n1, n1 * n1]], dtype=torch.float64)
            closed = up._two_tasks(G)
            assert closed is not None
            monkeypatch.setattr(type(up), "_two_tasks", lambda self, g: None)
            general = up.weights(G)
            monkeypatch.undo()
            # compared as coefficients of the unit gradients (w ⊙ n: the update's own scale), to 1e-13 times the
            # cosine matrix's condition number — the general route's eigh + NNLS round-off on that scale
            cond = (1.0 + abs(c)) / (1.0 - abs(c))
            n = torch.tensor([n0, n1], dtype=torch.float64)
            scale = float((general * n).abs().max())
            torch.testing.assert_close(closed * n, general * n, rtol=0, atol=1e-13 * cond * scale)
            torch.testing.assert_close(up.weights(G), closed, rtol=0, atol=0)
            cases += 1
    assert cases == 25


def test_upgrad_two_tasks_defer_degenerate_cases_to_the_general_route():
    import torch

    from mtlens.methods import create

    up = create("upgrad")
    opposite = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    aligned = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    assert up._two_tasks(opposite) is None and up._two_tasks(zero) is None and up._two_tasks(aligned) is None
    assert create("upgrad", ridge="trace")._two_tasks(torch.tensor([[1.0, -0.5], [-0.5, 1.0]])) is None
    assert torch.isfinite(up.weights(opposite)).all()
