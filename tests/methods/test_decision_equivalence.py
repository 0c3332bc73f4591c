"""The fast decisions compute what the straightforward algorithms compute.

PCGrad's and GradVac's projections run for all tasks at once, position by position in the visiting orders
(and task by task in Python floats for few tasks). Each test here runs a method against a reference written
below as the task-by-task loop of the paper's Algorithm 1 on the Gramian (the implementation of mtlens up to
commit 6f53918), with its own generator seeded alike, over many random Gramians: T = 2 … 40, conflicting and
aligned gradients, norms spread over 1e±6, a zero gradient, several calls on one object (the generator and
GradVac's targets carry over). They require the same orders, the same number of projections / corrections,
the same logged values and the same weights up to the rounding of the inner products (≤ 1e-12 relative
per weight).

Only Gramians of full row rank (zero rows aside) are compared projection by projection: on a rank-deficient
Gramian a projected gradient can be zero up to round-off, and whether a later inner product of size
eps·‖G‖ is negative depends on the order of a dot product's additions (the BLAS build's as much as ours).
Those are compared on the update they give (``J^T w``, through ``w^T G w``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtlens.methods import create
from mtlens.methods.pcgrad import SMALL_T

TASK_COUNTS = (2, 3, 4, 5, 7, SMALL_T, SMALL_T + 1, 11, 16, 20, 33, 40)
KINDS = ("conflicting", "aligned", "spread", "zero_task")
RTOL = 1e-12


# ------------------------------------------------------------------------------------------------
# References: the task-by-task loops, on the Gramian, with numpy inner products
# ------------------------------------------------------------------------------------------------
def _orders(T: int, gen: torch.Generator) -> list[list[int]]:
    out = []
    for i in range(T):
        others = [j for j in range(T) if j != i]
        out.append([others[k] for k in torch.randperm(len(others), generator=gen).tolist()])
    return out


def _pcgrad_reference(G: np.ndarray, gen: torch.Generator) -> tuple[np.ndarray, int, list[list[int]]]:
    T = G.shape[0]
    C = np.eye(T)
    n = 0
    orders = _orders(T, gen)
    for i in range(T):
        for j in orders[i]:
            gjj = G[j, j]
            if gjj <= 0.0:
                continue
            dot = float(C[i] @ G[:, j])
            if dot < 0.0:
                C[i, j] -= dot / gjj
                n += 1
    return C.sum(axis=0), n, orders


class _GradVacReference:
    def __init__(self, T: int, beta: float, seed: int) -> None:
        self.phi_hat = np.zeros((T, T))
        self.beta = beta
        self.gen = torch.Generator()
        self.gen.manual_seed(seed)

    def step(self, G: np.ndarray, reverse: bool = False) -> tuple[np.ndarray, int]:
        T = G.shape[0]
        C = np.eye(T)
        n = 0
        for i, order in enumerate(_orders(T, self.gen)):
            cg = C[i] @ G
            for j in reversed(order) if reverse else order:
                gjj = G[j, j]
                nrm_i2 = float(cg @ C[i])
                if gjj <= 0.0 or nrm_i2 <= 0.0:
                    continue
                nrm_i, nrm_j = math.sqrt(nrm_i2), math.sqrt(gjj)
                phi = max(-1.0, min(1.0, float(cg[j]) / (nrm_i * nrm_j)))
                target = float(self.phi_hat[i, j])
                sin_t = math.sqrt(max(0.0, 1.0 - target * target))
                if phi < target and sin_t > 1e-8:
                    sin_p = math.sqrt(max(0.0, 1.0 - phi * phi))
                    coef = nrm_i * (target * sin_p - phi * sin_t) / (nrm_j * sin_t)
                    C[i, j] += coef
                    cg = cg + coef * G[j]
                    n += 1
                self.phi_hat[i, j] = (1.0 - self.beta) * target + self.beta * phi
        return C.sum(axis=0), n


# ------------------------------------------------------------------------------------------------
# Gramians
# ------------------------------------------------------------------------------------------------
def _jacobian(kind: str, T: int, seed: int, rank: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(1000 * seed + 7 * T + KINDS.index(kind))
    P = T + 7 if rank is None else rank
    J = rng.standard_normal((T, P))
    if rank is not None:
        J = J @ rng.standard_normal((P, T + 7))
    base = rng.standard_normal(J.shape[1])
    if kind == "aligned":  # a shared direction: few conflicts
        J = J + 1.5 * base
    if kind == "conflicting":  # a third of the tasks against a shared direction (benchmarks/decision_cost.py)
        J = J + 2.0 * base
        J[: max(1, T // 3)] *= -0.3
    if kind in ("spread", "zero_task"):
        J = J * 10.0 ** rng.uniform(-6.0, 6.0, (T, 1))
    if kind == "zero_task":
        J[T // 2] = 0.0
    return J


def _gramian(J: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(J @ J.T)


def _symmetric(G: torch.Tensor) -> np.ndarray:
    A = G.numpy()
    return 0.5 * A + 0.5 * A.T  # what the methods' check_gramian hands them


def _assert_weights(w: torch.Tensor, w_ref: np.ndarray) -> None:
    assert w.dtype == torch.float64 and w.shape == w_ref.shape
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=RTOL, atol=0.0)


# ------------------------------------------------------------------------------------------------
# PCGrad
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 2, 3, 11, 40])
def test_visiting_orders_are_the_task_by_task_draws(T: int) -> None:
    from mtlens.methods._utils import visiting_order_lists, visiting_orders

    gens = [torch.Generator().manual_seed(3) for _ in range(3)]
    for _ in range(2):  # consecutive calls advance the generators alike
        ref = _orders(T, gens[0])
        assert visiting_orders(gens[1], T).tolist() == ref == visiting_order_lists(gens[2], T)
    assert all(sorted(o + [i]) == list(range(T)) for i, o in enumerate(ref))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", TASK_COUNTS)
def test_pcgrad_equals_the_task_by_task_loop(T: int, kind: str) -> None:
    m = create("pcgrad", seed=T)
    gen = torch.Generator()
    gen.manual_seed(T)
    projections = []
    for call in range(3):  # the generator advances alike over calls
        G = _gramian(_jacobian(kind, T, call))
        w = m.weights(G, torch.ones(T, dtype=torch.float64))
        w_ref, n_ref, orders_ref = _pcgrad_reference(_symmetric(G), gen)
        assert m.last_orders == orders_ref
        assert m.log_values() == {"projections": float(n_ref)}
        _assert_weights(w, w_ref)
        projections.append(n_ref)
    if kind == "conflicting":
        assert min(projections) > 0  # the comparison covers projections at every call


@pytest.mark.parametrize("T", [3, SMALL_T, 11, 40])
def test_pcgrad_comparison_sees_the_order_of_projections(T: int) -> None:
    """The reference with every task's order reversed gives other weights on these Gramians: the test above
    would fail if the implementation applied a task's projections in another order (or skipped one)."""
    G = _gramian(_jacobian("conflicting", T, 0))
    m = create("pcgrad", seed=5)
    w = m.weights(G, torch.ones(T, dtype=torch.float64)).numpy()
    A = _symmetric(G)
    C = np.eye(T)
    for i, order in enumerate(m.last_orders):
        for j in reversed(order):
            dot = float(C[i] @ A[:, j])
            if dot < 0.0:
                C[i, j] -= dot / A[j, j]
    assert not np.allclose(w, C.sum(axis=0), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("T", [5, SMALL_T + 1, 20, 40])
def test_pcgrad_rank_deficient_gives_the_same_update(T: int) -> None:
    for seed in range(3):
        J = _jacobian("spread", T, seed, rank=max(2, T // 3))
        G = _gramian(J)
        w = create("pcgrad", seed=seed).weights(G, torch.ones(T, dtype=torch.float64)).numpy()
        gen = torch.Generator()
        gen.manual_seed(seed)
        w_ref, _, _ = _pcgrad_reference(_symmetric(G), gen)
        d, d_ref = w @ J, w_ref @ J
        scale = np.abs(w_ref) @ np.linalg.norm(J, axis=1)  # Σ_k |w_k| ‖g_k‖
        assert np.linalg.norm(d - d_ref) <= 1e-10 * scale


def test_pcgrad_single_task_and_zero_gramian() -> None:
    m = create("pcgrad", seed=0)
    assert m.weights(torch.ones(1, 1, dtype=torch.float64), torch.ones(1)).tolist() == [1.0]
    assert m.last_orders == [[]] and m.log_values() == {"projections": 0.0}
    for T in (3, 12):
        w = m.weights(torch.zeros(T, T, dtype=torch.float64), torch.ones(T))
        assert w.tolist() == [1.0] * T and m.log_values() == {"projections": 0.0}


# ------------------------------------------------------------------------------------------------
# GradVac
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", TASK_COUNTS)
def test_gradvac_equals_the_task_by_task_loop(T: int, kind: str) -> None:
    beta = 0.5 if T % 2 else 0.01
    m = create("gradvac", beta=beta, seed=T)
    ref = _GradVacReference(T, beta, seed=T)
    corrections = []
    for call in range(4):  # the targets move: later calls correct towards non-zero targets
        G = _gramian(_jacobian(kind, T, call))
        w = m.weights(G, torch.ones(T, dtype=torch.float64))
        w_ref, n_ref = ref.step(_symmetric(G))
        _assert_weights(w, w_ref)
        assert m.phi_hat is not None
        np.testing.assert_allclose(m.phi_hat.numpy(), ref.phi_hat, rtol=RTOL, atol=1e-15)
        log = m.log_values()
        assert log["corrections"] == float(n_ref)
        off = ref.phi_hat[~np.eye(T, dtype=bool)]
        assert log["mean_target"] == pytest.approx(float(off.mean()), rel=RTOL, abs=1e-15)
        assert m.steps == call + 1
        corrections.append(n_ref)
    if kind == "conflicting":
        assert min(corrections) > 0


@pytest.mark.parametrize("T", [3, SMALL_T, 11, 40])
def test_gradvac_comparison_sees_the_order_of_corrections(T: int) -> None:
    """Visiting every task's others in reverse order gives other weights: the test above would fail if the
    implementation applied a task's corrections in another order."""
    G = _gramian(_jacobian("conflicting", T, 0))
    m = create("gradvac", seed=5)
    m.weights(G, torch.ones(T, dtype=torch.float64))  # non-zero targets
    w = m.weights(G, torch.ones(T, dtype=torch.float64)).numpy()
    ref = _GradVacReference(T, 0.5, seed=5)
    ref.step(_symmetric(G))
    w_ref, _ = ref.step(_symmetric(G), reverse=True)
    assert not np.allclose(w, w_ref, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("T", [5, SMALL_T + 1, 20, 40])
def test_gradvac_rank_deficient_gives_the_same_update(T: int) -> None:
    m = create("gradvac", seed=1)
    ref = _GradVacReference(T, 0.5, seed=1)
    for call in range(3):
        J = _jacobian("spread", T, call, rank=max(2, T // 3))
        G = _gramian(J)
        w = m.weights(G, torch.ones(T, dtype=torch.float64)).numpy()
        w_ref, _ = ref.step(_symmetric(G))
        d, d_ref = w @ J, w_ref @ J
        scale = np.abs(w_ref) @ np.linalg.norm(J, axis=1)
        assert np.linalg.norm(d - d_ref) <= 1e-10 * scale


# ------------------------------------------------------------------------------------------------
# The fair system G x = p ⊙ x^{-1/α} (FairGrad, PIVRG, ConsMTL, Nash-MTL's exact path)
# ------------------------------------------------------------------------------------------------
def _fair_reference(G: np.ndarray, alpha: float, p: np.ndarray) -> tuple[np.ndarray, float, int]:
    """``solve_fair_system`` up to commit 6f53918 (damped Newton on the cosine-scaled system, each step by
    ``numpy.linalg.cholesky`` and two ``numpy.linalg.solve``), feasible problems only: ``(x, residual, iterations)``."""
    from mtlens.methods._solvers import cosine_matrix, nonzero_tasks

    T = G.shape[0]
    live = nonzero_tasks(G)
    C, d = cosine_matrix(G, live)
    a = float(alpha)
    q = p[live] * np.power(d, 1.0 / a - 1.0)

    def h(y):
        return np.log(y) if a == 1.0 else np.power(y, 1.0 - 1.0 / a) / (1.0 - 1.0 / a)

    def f(y):
        return 0.5 * float(y @ C @ y) - float(q @ h(y))

    def residual(y):
        rhs = q * np.power(y, -1.0 / a)
        return float(np.max(np.abs(C @ y - rhs) / (np.abs(C) @ y + rhs)))

    y = np.power(q, a / (1.0 + a))
    fy = f(y)
    res = residual(y)
    best = (res, y)
    it = 0
    for it in range(1, 101):  # noqa: B007
        if res <= 1e-14:
            break
        rhs = q * np.power(y, -1.0 / a)
        grad = C @ y - rhs
        H = C + np.diag(rhs / (a * y))
        s = 1.0 / np.sqrt(np.diag(H))
        Hs = H * np.outer(s, s)
        L = np.linalg.cholesky(Hs)
        step = -s * np.linalg.solve(L.T, np.linalg.solve(L, s * grad))
        slope = float(grad @ step)
        if slope >= 0:
            break
        t = 1.0
        neg = step < 0
        if np.any(neg):
            t = min(1.0, 0.99 * float(np.min(-y[neg] / step[neg])))
        decrement = -slope
        f_noise = 1e4 * np.finfo(np.float64).eps * (0.5 * abs(float(y @ C @ y)) + abs(float(q @ h(y))))
        while True:
            yn = y + t * step
            if np.all(yn > 0):
                fn = f(yn)
                if decrement <= f_noise or fn <= fy + 1e-4 * t * slope:
                    break
            t *= 0.5
        y, fy = yn, f(yn)
        res = residual(y)
        if res < best[0]:
            best = (res, y)
        elif best[0] <= 1e-9 and decrement <= f_noise:
            break
    res, y = best
    x = np.zeros(T)
    x[live] = y / d
    return x, res, it


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("T", [2, 3, 5, 11, 20, 40])
def test_fair_system_equals_the_previous_newton_steps(T: int, alpha: float) -> None:
    """Each Newton step's linear system by one LAPACK ``dposv`` (Cholesky and triangular solves) instead of a
    Cholesky factor and two general LU solves: the same iterates up to rounding, the same certified solution."""
    from mtlens.methods._solvers import solve_fair_system

    for kind in ("aligned", "spread", "zero_task"):  # feasible: a shared direction improves every task
        for seed in range(2):
            rng = np.random.default_rng(seed)
            J = _jacobian("aligned", T, seed)
            if kind != "aligned":
                J = J * 10.0 ** rng.uniform(-6.0, 6.0, (T, 1))
            if kind == "zero_task":
                J[T // 2] = 0.0
            p = rng.uniform(0.5, 2.0, T)
            G = J @ J.T
            x_ref, res_ref, it_ref = _fair_reference(G, alpha, p)
            r = solve_fair_system(G, alpha, p)
            np.testing.assert_allclose(r.weights, x_ref, rtol=RTOL, atol=0.0)
            assert r.residual <= 1e-13 and res_ref <= 1e-13
            assert r.iterations == it_ref
