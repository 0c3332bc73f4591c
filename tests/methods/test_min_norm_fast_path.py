"""The plain-float path of ``min_norm_simplex`` (every task in the optimal support, T ≤ SMALL_T) against the
general numpy path: the same weights to round-off, the same certificate, and a fallback wherever it does not apply."""

import numpy as np
import pytest

from mtlens.methods import _solvers
from mtlens.methods._solvers import _min_norm_all_tasks, _min_norm_all_tasks_numpy, min_norm_simplex


def _general(G, **kw):
    old, old_np = _solvers.SMALL_T, _solvers._min_norm_all_tasks_numpy
    _solvers.SMALL_T = 0
    _solvers._min_norm_all_tasks_numpy = lambda *a: None
    try:
        return min_norm_simplex(G, **kw)
    finally:
        _solvers.SMALL_T, _solvers._min_norm_all_tasks_numpy = old, old_np


def _interior_gramian(rng, T, spread):
    """Nearly orthogonal task gradients, norms ``spread`` apart: every task is in the optimal support
    (cosines below 0.3/(spread·T) keep the optimum, w_t ∝ 1/‖g_t‖², inside the simplex)."""
    R = rng.uniform(-1, 1, (T, T)) * 0.3 / (spread * T)
    C = np.eye(T) + np.triu(R, 1) + np.triu(R, 1).T
    n = np.logspace(0, np.log10(spread), T)
    return C * np.outer(n, n)


@pytest.mark.parametrize("T", [3, 4, 5, 8, 11, 20, 40])
@pytest.mark.parametrize("spread", [1.0, 1e2, 1e4])
@pytest.mark.parametrize("relative", [True, False])
def test_fast_path_matches_the_general_path_and_is_certified(T, spread, relative):
    rng = np.random.default_rng(T + int(np.log10(spread)))
    for _ in range(5):
        G = _interior_gramian(rng, T, spread)
        s = float(G.diagonal().max())
        fast = (_min_norm_all_tasks if T <= _solvers.SMALL_T else _min_norm_all_tasks_numpy)(G, s, 1e-13, relative)
        assert fast is not None  # the path these Gramians take
        ref = _general(G, relative=relative)
        np.testing.assert_allclose(fast.weights, ref.weights, rtol=1e-10, atol=1e-14)
        assert fast.value == pytest.approx(ref.value, rel=1e-12)
        assert fast.weights.min() > 0 and fast.weights.sum() == pytest.approx(1.0, abs=1e-15)
        # the certificate, recomputed here: (Gw)_i >= wᵀGw − tol·‖g_i‖·Σ_k w_k‖g_k‖ on G / max G_tt
        Gn = G / s
        w = fast.weights
        grad = Gn @ w
        n = np.sqrt(np.diag(Gn))
        assert np.all(grad >= w @ grad - 1e-13 * n * (n @ w) * (1 + 1e-9))
        assert min_norm_simplex(G, relative=relative).weights.tolist() == fast.weights.tolist()


def test_fast_path_declines_where_it_does_not_apply_and_the_general_path_answers():
    base = np.array([[1.0, 0.2, 0.1], [0.2, 2.0, 0.3], [0.1, 0.3, 3.0]])
    cases = {
        "vertex optimal": np.array([[1.0, 2.0, 3.0], [2.0, 5.0, 6.0], [3.0, 6.0, 10.0]]),  # g_0·g_t ≥ ‖g_0‖²
        "partial support": np.array([[1.0, 0.0, 0.9], [0.0, 1.0, 0.9], [0.9, 0.9, 4.0]]),
        "duplicated task": np.block([[base, base[:, :1]], [base[:1, :], base[:1, :1]]]),
        "zero task": np.diag([1.0, 2.0, 0.0]),
    }
    for name, G in cases.items():
        assert _min_norm_all_tasks(G, float(G.diagonal().max()), 1e-13, True) is None, name
        assert _min_norm_all_tasks_numpy(G, float(G.diagonal().max()), 1e-13, True) is None, name
        got, ref = min_norm_simplex(G, relative=True), _general(G, relative=True)
        assert got.weights.tolist() == ref.weights.tolist(), name


def test_mgda_weights_without_numpy_equal_the_general_route_and_raise_alike():
    """MGDA's numpy-free route (CPU, 3–12 tasks, normalization='none') returns the weights and logs of the general
    route (validation + min_norm_simplex), bitwise; faults still raise the general route's errors."""
    import torch

    from mtlens.errors import NonFiniteError
    from mtlens.methods import create

    rng = np.random.default_rng(0)
    for T in (3, 5, 8):
        G = torch.from_numpy(_interior_gramian(rng, T, 10.0))
        G[0, 1] += 1e-9  # slightly asymmetric: symmetrised alike
        losses = torch.rand(T, dtype=torch.float64)
        m = create("mgda")
        w = m.weights(G, losses)
        ref = min_norm_simplex(_solvers.check_gramian(G, losses, "mgda")[0], relative=True)
        assert w.dtype == torch.float64 and w.tolist() == ref.weights.tolist()
        assert m.log_values()["min_norm_sq"] == ref.value and m.log_values()["kkt_gap"] == ref.kkt_gap
        general = _general(_solvers.check_gramian(G, None, "mgda")[0], relative=True)  # numpy, to round-off
        np.testing.assert_allclose(w.numpy(), general.weights, rtol=1e-10, atol=1e-14)
        bad = G.clone()
        bad[1, 2] = float("nan")
        with pytest.raises(NonFiniteError):
            m.weights(bad, losses)
        with pytest.raises(NonFiniteError):
            m.weights(G, torch.full((T,), float("inf"), dtype=torch.float64))


def _two_task_reference(G, relative):
    """The two-task closed form as min_norm_simplex wrote it in numpy (before the plain-float version)."""
    s = float(G.diagonal().max())
    Gn = G / s
    a, b, c = float(Gn[0, 0]), float(Gn[0, 1]), float(Gn[1, 1])
    den = a + c - 2.0 * b
    t = min(max((a - b) / den, 0.0), 1.0) if den > 0.0 else 0.5
    w = np.array([1.0 - t, t])
    grad = Gn @ w
    x2 = float(w @ grad)
    n = np.sqrt(np.maximum(Gn.diagonal(), 0.0))
    scale = n * float(n @ w)
    gap_task = max(0.0, float(np.max((x2 - grad) / np.where(scale > 0, scale, 1.0))))
    gap_abs = max(0.0, float(np.max(x2 - grad)))
    return w, x2 * s, gap_task if relative else gap_abs


@pytest.mark.parametrize("relative", [True, False])
def test_two_tasks_in_plain_floats_equal_the_numpy_closed_form(relative):
    """The same weights bitwise; the value and the gap to round-off (a dot product's summation order); the
    certificate decides alike; near-identical gradients decline (Wolfe's algorithm then runs)."""
    rng = np.random.default_rng(2)
    cases = [np.array([[1.0, 0.3], [0.3, 2.0]]), np.array([[1.0, -1.0], [-1.0, 1.0]]),  # opposite: ½ each
             np.array([[4.0, 1.0], [1.0, 1.0]]), np.array([[1.0, 2.0], [2.0, 5.0]]),  # vertex optimal
             np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[1.0, 1.0], [1.0, 1.0]])]  # a zero task; identical
    for _ in range(200):
        J = rng.normal(size=(2, 7)) * np.array([[1.0], [10.0 ** rng.uniform(-6, 6)]])
        cases.append(J @ J.T)
    for G in cases:
        s = float(G.diagonal().max())
        got = _solvers._min_norm_two_tasks_floats(G.tolist(), s, 1e-13, relative)
        w, value, gap = _two_task_reference(G, relative)
        if gap <= 1e-13:
            assert got is not None and got[0] == w.tolist()
            assert got[1] == pytest.approx(value, rel=1e-14, abs=1e-300) and got[2] <= 1e-13
            res = min_norm_simplex(G, relative=relative)
            assert res.weights.tolist() == w.tolist() and res.iterations == 1
        else:
            assert got is None or got[2] <= 1e-13  # the float gap may certify where numpy's rounding did not


def test_mgda_two_tasks_without_numpy_equal_the_general_route():
    import torch

    from mtlens.errors import NonFiniteError
    from mtlens.methods import create

    rng = np.random.default_rng(1)
    for _ in range(50):
        J = rng.normal(size=(2, 9))
        G = torch.from_numpy(J @ J.T)
        G[0, 1] += 1e-9  # slightly asymmetric: symmetrised alike
        losses = torch.rand(2, dtype=torch.float64)
        m = create("mgda")
        w = m.weights(G, losses)
        ref = min_norm_simplex(_solvers.check_gramian(G, losses, "mgda")[0], relative=True)
        assert w.dtype == torch.float64 and w.tolist() == ref.weights.tolist()
        assert m.log_values() == {"min_norm_sq": ref.value, "solver_iterations": 1.0, "kkt_gap": ref.kkt_gap,
                                  "clipped_eigenvalue": 0.0}
    bad = G.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(NonFiniteError):
        m.weights(bad, losses)
    with pytest.raises(NonFiniteError):
        m.weights(G, torch.full((2,), float("inf"), dtype=torch.float64))


def test_mgda_fast_route_reads_float32_and_attached_inputs_as_their_float64_values():
    import torch

    from mtlens.methods import create

    rng = np.random.default_rng(3)
    for T in (2, 3, 5):
        G32 = torch.from_numpy(_interior_gramian(rng, T, 10.0)).float().requires_grad_()
        L32 = torch.rand(T).requires_grad_()
        a, b = create("mgda"), create("mgda")
        wa = a.weights(G32, L32)
        wb = b.weights(G32.detach().double(), L32.detach().double())
        assert wa.dtype == torch.float64 and wa.tolist() == wb.tolist() and a.log_values() == b.log_values()
