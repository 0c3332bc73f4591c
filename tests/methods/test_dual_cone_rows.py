"""The small-T dual-cone projection on Python floats (``_qp.dual_cone_rows``) against the general route.

Both solve ``min_{v ≥ u} vᵀ(G + reg_eps·diag(‖g_t‖²))v`` on the unit gradients exactly; UPGrad and DualProj take
the small route for T ≤ ``SMALL_T`` (``ridge="relative"``, ``solver="nnls"``) and the general route
(eigen-decomposition + NNLS) otherwise or where the small route declines (``None``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtlens.engine.numerics import check_gramian_rows
from mtlens.errors import NonFiniteError, ShapeError, SolverError
from mtlens.methods import _qp, create


def _update_gap(J: np.ndarray, V1: np.ndarray, V2: np.ndarray) -> float:
    """max over rows of ‖Jᵀ(v1 − v2)‖ / Σ_t |v2_t| ‖g_t‖: the updates' difference on the problem's own scale."""
    n = np.linalg.norm(J, axis=1)
    return float((np.linalg.norm((V1 - V2) @ J, axis=1) / np.maximum(np.abs(V2) @ n, 1e-300)).max())


def _jacobians(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        T = int(rng.integers(1, _qp.SMALL_T + 1))
        P = int(rng.integers(1, 40))
        J = rng.standard_normal((T, P)) * 10.0 ** rng.uniform(-6, 6, size=(T, 1))  # norms 1e12 apart
        if rng.random() < 0.4:
            J[: T // 2] *= -0.5  # conflicts
        if rng.random() < 0.15 and T > 1:
            J[-1] = -2.0 * J[0]  # exactly opposite gradients
        yield rng, J


def test_matches_the_general_route_on_random_problems():
    solved = 0
    for rng, J in _jacobians(0, 1500):
        T = J.shape[0]
        G = torch.tensor(J @ J.T)
        for U in (np.eye(T), rng.random((2, T))):
            eps = 1e-12 if rng.random() < 0.8 else 0.0
            Vr = _qp.dual_cone_rows(check_gramian_rows(G), U.tolist(), eps)
            Vg = _qp.dual_cone_weights(G, U, reg_eps=eps)
            if Vr is None:
                continue
            solved += 1
            Vr = np.asarray(Vr)
            assert (Vr >= U).all()
            assert _update_gap(J, Vr, Vg) < 1e-11
    assert solved > 2500  # declining is the exception (nearly dependent gradients), not the rule


def test_conflicting_rows_are_projected():
    """Two tasks at 120°: each row is moved off its bound (v_other > 0) and the update conflicts with no task."""
    J = np.array([[1.0, 0.0], [-0.5, np.sqrt(3) / 2]])
    V = np.asarray(_qp.dual_cone_rows(check_gramian_rows(torch.tensor(J @ J.T)), np.eye(2).tolist(), 1e-12))
    assert V[0, 1] > 0.1 and V[1, 0] > 0.1
    assert (J @ (V.sum(axis=0) @ J) >= -1e-12).all()


@pytest.mark.parametrize("G, why", [
    (np.diag([1.0, 0.0, 1.0]), "a zero-gradient task"),
    (np.zeros((2, 2)), "a zero Gramian"),
])
def test_declines_what_the_general_route_handles(G, why):
    rows = check_gramian_rows(torch.tensor(G))
    assert _qp.dual_cone_rows(rows, np.eye(len(G)).tolist(), 0.0) is None, why


def test_declines_an_ill_conditioned_free_block(monkeypatch):
    """Two free variables whose block has a squared pivot ≤ PIVOT_MIN: declined (the general route solves it)."""
    J = np.array([[1.0, 0.0, 0.0], [-1.0, 1e-4, 0.0], [-1.0, -1e-4, 1e-9]])  # rows 1, 2 nearly parallel
    rows = check_gramian_rows(torch.tensor(J @ J.T))
    assert _qp.dual_cone_rows(rows, [[1.0, 0.0, 0.0]], 1e-12) is None
    monkeypatch.setattr(_qp, "PIVOT_MIN", 0.0)  # accepted, it still meets the KKT certificate
    (v,) = _qp.dual_cone_rows(rows, [[1.0, 0.0, 0.0]], 1e-12)
    assert min(np.asarray(v) - np.array([1.0, 0.0, 0.0])) >= 0.0


def test_declines_beyond_small_t():
    J = np.random.default_rng(3).standard_normal((_qp.SMALL_T + 1, 50))
    assert _qp.dual_cone_rows(check_gramian_rows(torch.tensor(J @ J.T)), np.eye(len(J)).tolist(), 1e-12) is None


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("pref", [None, (1.0, 2.0, 0.5, 3.0, 1.0)])
def test_methods_take_the_small_route_and_agree_with_the_general_one(monkeypatch, name, pref):
    rng = np.random.default_rng(7)
    J = rng.standard_normal((5, 60))
    J[:2] *= -0.7
    G = torch.tensor(J @ J.T)
    small = create(name, pref_vector=pref).weights(G)
    calls = []
    monkeypatch.setattr(_qp, "dual_cone_rows", lambda *a: calls.append(1))  # declines: the general route runs
    general = create(name, pref_vector=pref).weights(G)
    assert calls == [1]
    assert small.dtype == general.dtype == torch.float64
    n = np.linalg.norm(J, axis=1)
    gap = np.linalg.norm((small - general).numpy() @ J) / (np.abs(general.numpy()) @ n)
    assert gap < 1e-12


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_methods_raise_as_before_on_bad_gramians(name):
    m = create(name)
    with pytest.raises(NonFiniteError):
        m.weights(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    with pytest.raises(ShapeError):
        m.weights(torch.ones(3, 2, dtype=torch.float64))
    with pytest.raises(ShapeError):
        create(name, pref_vector=[1.0, 2.0]).weights(torch.eye(3, dtype=torch.float64) - 0.4)


def test_an_uncertified_answer_is_declined(monkeypatch):
    """An active-set answer that fails the KKT certificate (here: the lower bound returned unchanged on a
    conflicting problem) is never returned: the route declines and the general route solves the problem."""
    J = np.array([[1.0, 0.0, 0.0], [-0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    rows = check_gramian_rows(torch.tensor(J @ J.T))
    assert _qp.dual_cone_rows(rows, np.eye(3).tolist(), 1e-12) is not None
    monkeypatch.setattr(_qp, "_bound_qp", lambda A, low, T: list(low))
    assert _qp.dual_cone_rows(rows, np.eye(3).tolist(), 1e-12) is None


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("T", [3, _qp.SMALL_T + 2])  # the small route and the general one
@pytest.mark.parametrize("c", [2.0**-1060, 2.0**-600, 2.0**1000])
def test_weights_are_homogeneous_in_the_preference_scale(name, T, c):
    """``v(c·u) = c·v(u)``: the projection is positively homogeneous in ``u``, so a preference vector scaled by a
    power of two scales the weights exactly. Before, DualProj raised ZeroDivisionError for ``p ≤ 2^-560`` on the
    small route (the certificate's ``s²`` underflowed), SolverError on the general one (a NaN residual), and
    ValueError for ``p·‖g‖`` beyond the float64 range (scipy's NNLS on an infinite bound); a subnormal ``c·p``
    lost its precision in ``u ⊙ n``."""
    rng = np.random.default_rng(11)
    J = rng.standard_normal((T, 20)) * 2.0**30
    p = np.zeros(T)
    p[[0, 2]] = [1.0, 0.75]  # zeros in the preference too
    J[1] = -0.5 * (p @ J) + 0.3 * J[1]  # task 1 conflicts with the preferred direction
    G = torch.tensor(J @ J.T)
    assert (_qp.dual_cone_rows(check_gramian_rows(G), [p.tolist()], 1e-12) is None) == (T > _qp.SMALL_T)
    w1 = create(name, pref_vector=p.tolist()).weights(G)
    wc = create(name, pref_vector=(c * p).tolist()).weights(G)
    assert torch.isfinite(w1).all() and (w1 - torch.tensor(p)).abs().max() > 0.01  # a real projection
    torch.testing.assert_close(wc, c * w1, rtol=1e-12, atol=8 * 2.0**-1074)


@pytest.mark.parametrize("T", [3, _qp.SMALL_T + 2])
def test_weights_beyond_the_float64_range_raise_solver_error(T):
    """A preference at the top of the float64 range whose projection overflows: SolverError on either route (the
    small one declines; before, its ``math.ldexp`` could raise OverflowError)."""
    rng = np.random.default_rng(12)
    J = rng.standard_normal((T, 20))
    J[1] = -J[0] + 0.1 * J[1]  # task 1 conflicts with task 0: v_1 > 0 ≈ u_0 ‖g_0‖ / ‖g_1‖ ≫ 1
    J[1] *= 1e-3
    pref = [0.0] * T
    pref[0] = 2.0**1023
    for ridge in ("relative", "trace"):
        with pytest.raises(SolverError, match="overflow"):
            create("dualproj", pref_vector=pref, ridge=ridge).weights(torch.tensor(J @ J.T))


@st.composite
def _problems(draw):
    """A Jacobian (T ≤ SMALL_T, norms up to 1e12 apart) of a degenerate family, a ridge and rows ``U``."""
    T = draw(st.integers(1, _qp.SMALL_T))
    P = draw(st.integers(1, 8))
    kind = draw(st.sampled_from(["gaussian", "integer", "duplicate", "opposite", "near_parallel", "simplex"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "integer":  # ties everywhere: equal gradients of the QP, several bounds met at once
        J = rng.integers(-1, 2, size=(T, P)).astype(float)
        J[~J.any(axis=1), 0] = 1.0
    elif kind == "simplex":  # T unit gradients summing to 0: every cosine -1/(T-1), a singular C
        J = (np.eye(T) - 1.0 / T) @ np.linalg.qr(rng.standard_normal((max(P, T), T)))[0].T + (T == 1)
    else:
        J = rng.standard_normal((T, P))
        if T > 1 and kind != "gaussian":
            sign = -1.0 if kind == "opposite" else rng.choice([-1.0, 1.0])
            tilt = draw(st.sampled_from([1e-15, 1e-12, 1e-8, 1e-4])) if kind == "near_parallel" else 0.0
            J[1] = sign * J[0] + tilt * rng.standard_normal(P)
    J *= 10.0 ** (draw(st.floats(0, 12)) * rng.random((T, 1)))
    reg_eps = draw(st.sampled_from([0.0, 1e-12, 1e-8, 1e-4, 1.0]))
    rows = draw(st.sampled_from(["eye", "pref", "random"]))
    U = np.eye(T) if rows == "eye" else rng.random((2, T)) * (rng.random((2, T)) < 0.6)
    if rows == "pref":
        U[:, rng.integers(T)] = 1.0  # DualProj's preference, zeros included
    return J, U, reg_eps


@given(_problems())
@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_property_the_small_route_is_the_general_one(problem):
    """On degenerate families (ties, duplicate, opposite and nearly parallel gradients, singular C, norms 1e12
    apart, reg_eps 0 to 1, preference rows with zeros), whatever the route returns is the general route's
    update to rounding (reg_eps > 0: a unique answer), meets ``v ≥ u`` exactly and the non-conflict guarantee
    ``ĝ_t·d ≥ −reg_eps ‖g_t‖ v_t`` to rounding; and with ``reg_eps ≥ 1e-4`` (every squared pivot ≥ reg_eps >
    PIVOT_MIN) it never declines."""
    J, U, reg_eps = problem
    G = torch.tensor(J @ J.T)
    Vr = _qp.dual_cone_rows(check_gramian_rows(G), U.tolist(), reg_eps)
    if Vr is None:
        assert reg_eps < 1e-4
        return
    Vr = np.asarray(Vr)
    assert (Vr >= U).all()
    if reg_eps > 0.0:  # at reg_eps = 0 the weights are not unique (opposite gradients) and the general route's NNLS
        # can return weights 1e8 along C's null space with the update 6% off (a relative certificate on that scale)
        assert _update_gap(J, Vr, _qp.dual_cone_weights(G, U, reg_eps=reg_eps)) < 1e-10
    n = np.linalg.norm(J, axis=1)
    for v in Vr:
        d = v @ J
        assert ((J @ d) / n + reg_eps * n * v >= -1e-10 * (v @ n)).all()


def _edge_jacobians():
    rng = np.random.default_rng(5)
    g = rng.standard_normal((4, 6))
    yield "T = 1", g[:1]
    yield "identical gradients", np.stack([g[0], g[0], -g[1]])
    yield "exactly opposite gradients", np.stack([g[0], -g[0], g[1]])
    yield "cosine -1 + 1e-16", np.stack([g[0], -g[0] + 1e-8 * g[2] / np.linalg.norm(g[2]), g[1]])
    yield "norms 1e150 apart (a zero-gradient task)", np.stack([1e75 * g[0], -1e-75 * g[0] + 1e-76 * g[1], g[2]])
    spread = np.stack([1e147 * g[0], -1e133 * g[1], 1e133 * g[2], 1e140 * g[3]])
    yield "norms 1e14 apart, Gramian entries to 1e295", spread
    yield "norms 1e14 apart, Gramian entries to 1e-280", 1e-287 * spread[:3]
    yield "a subnormal cosine", np.stack([np.eye(6)[0], np.eye(6)[1] - 1e-310 * np.eye(6)[0], -g[0]])
    yield "a subnormal Gramian (trace below TRACE_TINY)", 1e-155 * np.stack([g[0], -g[0] + 1e-3 * g[1], g[2]])


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("reg_eps", [0.0, 1e-12, 1.0])
@pytest.mark.parametrize("pref", [None, "zeros"])
def test_edge_inputs_give_the_general_routes_update(monkeypatch, name, reg_eps, pref):
    """The edge cases of the review (T = 1, identical, opposite and nearly opposite gradients, norms 1e150
    apart, subnormal entries; reg_eps 0 and 1; a preference with zeros): the methods' small route gives the
    general route's update to rounding on the problem's scale (or the same error), float64, no warnings."""
    import warnings


    for why, J in _edge_jacobians():
        T = len(J)
        p = None if pref is None else [0.0] * (T - 1) + [1.0]
        G = torch.tensor(J @ J.T)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            small = create(name, pref_vector=p, reg_eps=reg_eps).weights(G)
        with monkeypatch.context() as m:
            m.setattr(_qp, "dual_cone_rows", lambda *a: None)
            general = create(name, pref_vector=p, reg_eps=reg_eps).weights(G)
        assert small.dtype == torch.float64, why
        n = np.linalg.norm(J, axis=1)
        gap = np.linalg.norm((small - general).numpy() @ J) / (np.abs(general.numpy()) @ n)
        assert gap < 1e-12, (why, gap)
