"""Projection onto the dual cone of the rows of J, written on the Gramian (UPGrad, DualProj).

For a weight vector ``u`` (T,), the projection of ``Jᵀu`` onto the dual cone
``{d : J d ≥ 0}`` is ``Jᵀv`` with (Quinton & Rey, arXiv:2406.16232, Proposition 1)::

    v = argmin_{v ≥ u} vᵀ G v,         G = J Jᵀ.

We solve it exactly: factor a positive-semidefinite matrix ``M = Q Λ Qᵀ`` (``numpy.linalg.eigh``;
eigenvalues clamped at 0), add the ridge, write ``vᵀMv = ‖R v‖²`` with ``R = (Λ + ridge)^{1/2} Qᵀ``
and substitute ``x = v − u ≥ 0``: ``min_{x ≥ 0} ‖R x + R u‖²`` is a non-negative least-squares
problem, solved by the active-set algorithm of ``scipy.optimize.nnls`` (exact up to rounding).

Scaling and the ridge (``ridge=``):

* ``"relative"`` (default, ours): the problem is solved on the unit gradients. With
  ``n_t = ‖g_t‖`` and ``y = n ⊙ v`` it reads ``min_{y ≥ n ⊙ u} yᵀ(C + reg_eps I) y`` with ``C`` the
  cosine matrix (unit diagonal, :func:`~mtlens.methods._solvers.cosine_matrix`): every task on its
  own scale, so gradients 1e12 apart in norm are projected as accurately as equal ones. The ridge
  is ``reg_eps · ‖g_t‖²`` per task, and the update meets ``(J d)_t ≥ −reg_eps ‖g_t‖² v_t`` — relative
  to each task's own scale. Zero gradients (``‖g_t‖² ≤ ZERO_REL · max‖g‖²``) cannot conflict with
  any update: they keep ``v_t = u_t``.
* ``"trace"`` (TorchJD's problem): ``G`` is divided by its trace and the ridge ``reg_eps`` added
  (``vᵀ(G + reg_eps·trace(G) I)v``); the update meets ``J d ≥ −reg_eps · trace(G) · v``, which for
  a task whose ``‖g_t‖²`` is below ``reg_eps · trace(G)`` is no guarantee at all (norms 1e6 apart
  with ``reg_eps = 1e-12``). The eigen-decomposition of the trace-normalised G also loses such
  tasks (round-off ``eps · trace``). Use it to reproduce TorchJD (``reg_eps=1e-4``).

Either way the result is invariant to a positive scale of G. TorchJD additionally replaces G by 0
when ``trace(G) < norm_eps = 1e-4`` (absolute), which turns tiny gradients into plain averaging;
we do not (only an exactly zero or sub-normal trace is treated as ``G = 0``, where every
``v ≥ u`` gives the zero update and we return ``v = u``). TorchJD uses ``reg_eps = 1e-4``; our
default is ``1e-12`` because NNLS does not need a strongly positive-definite matrix (quadprog
does: it gets the same ridge).

Certificate (tested, not run at every call): the KKT conditions on the unit gradients,
``v ≥ u``, ``ĝ_t·d ≥ −tol`` and ``ĝ_t·d ≤ tol`` where ``v_t > u_t``, ``tol`` relative to
``Σ_t n_t v_t`` (tests/methods/test_solver_certificates.py, norm spreads to 1e12).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from operator import mul
from typing import Protocol

import numpy as np
from torch import Tensor

from ..engine.numerics import ZERO_REL, check_gramian_rows
from ..engine.numerics import check_gramian as validate_gramian
from ..errors import NonFiniteError, SolverError, require
from ._solvers import cosine_matrix
from ._utils import check, in_range

SOLVERS = ("nnls", "quadprog")
RIDGES = ("relative", "trace")
TRACE_TINY = 1e-290  # below this the Gramian is numerically zero (float64)
_EPS = 2.220446049250313e-16  # float64 machine epsilon


def require_solver(solver: str, method: str) -> None:
    """Check at construction that ``solver`` can run; raise :class:`MissingDependencyError`."""
    if solver == "quadprog":
        require("qpsolvers", "qp", f"{method}(solver='quadprog')")
        require("quadprog", "qp", f"{method}(solver='quadprog')")


def _as_numpy(G: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(G, Tensor):
        G = G.detach().to("cpu").double().numpy()
    return np.asarray(G, dtype=np.float64)


def dual_cone_weights(
    G: Tensor | np.ndarray,
    U: np.ndarray,
    *,
    reg_eps: float,
    solver: str = "nnls",
    method: str = "dual cone projection",
    ridge: str = "relative",
) -> np.ndarray:
    """For each row ``u`` of ``U`` (k×T) return ``v = argmin_{v ≥ u} vᵀ G v`` (k×T).

    ``ridge``: ``"relative"`` (each task on its own scale) or ``"trace"`` (TorchJD's problem); see
    the module docstring. ``v`` is positively homogeneous in ``u`` and so is the answer: each row is solved
    scaled by a power of two (exactly) to ``max_t u_t`` in [1, 2) and scaled back, ``v(c·u) = c·v(u)`` for
    any scale of ``u`` (DualProj's ``pref_vector``). Raises :class:`SolverError` when the Gramian is not
    finite, a solve fails or the weights overflow float64.
    """
    Gn = _as_numpy(G)
    U = np.atleast_2d(np.asarray(U, dtype=np.float64))
    T = Gn.shape[0]
    if Gn.shape != (T, T) or U.shape[1] != T:
        raise SolverError(f"{method}: Gramian of shape {Gn.shape} and weights of shape {U.shape} do not fit")
    if not np.isfinite(Gn).all():
        raise SolverError(f"{method}: the Gramian has non-finite entries; cannot project")
    if solver not in SOLVERS:
        raise SolverError(f"{method}: unknown solver {solver!r}; choose one of {SOLVERS}")
    if ridge not in RIDGES:
        raise SolverError(f"{method}: unknown ridge {ridge!r}; choose one of {RIDGES}")
    trace = float(np.trace(Gn))
    if not trace > TRACE_TINY:
        # J = 0 (every row zero): every v gives the zero update; keep the requested weights.
        return U.copy()
    # v(c·u) = c·v(u): each row is solved scaled by a power of two (exact) to max_t u_t in [1, 2) and its answer
    # scaled back, so that a tiny or huge u (DualProj's pref_vector) neither underflows the certificate's scale nor
    # overflows u ⊙ n (UPGrad's rows e_i need no scaling)
    e = [math.frexp(x)[1] - 1 if x > 0.0 else 0 for x in U.max(axis=1).tolist()]
    E = None if not any(e) else e[0] if len(e) == 1 else np.array(e)[:, None]
    if E is not None:
        U = np.ldexp(U, -E)
    solver_fn = _solve_nnls if solver == "nnls" else _solve_quadprog

    def solve(M: np.ndarray, low: np.ndarray, reg_eps: float, method: str) -> np.ndarray:
        return _solve_where_needed(solver_fn, M, low, reg_eps, method)

    if ridge == "trace":
        out = solve((0.5 * Gn + 0.5 * Gn.T) / trace, U, reg_eps, method)
        if E is not None:
            out = _scaled_back(out, E, max(e))
            if not np.isfinite(out).all():
                raise SolverError(f"{method}: the weights overflow float64 (requested weights up to 2^{max(e) + 1})")
        return out
    Gn = 0.5 * Gn + 0.5 * Gn.T  # not 0.5 * (Gn + Gnᵀ): the sum overflows for entries above ~9e307
    d = np.diag(Gn)
    live = (d > 0) & (d > ZERO_REL * float(d.max()))  # nonzero_tasks, inlined: this runs every step
    if live.all():
        n = np.sqrt(d)
        C = Gn / np.outer(n, n)  # the cosine matrix (its diagonal set to 1 below)
        np.fill_diagonal(C, 1.0)
        low = U * n
        Y = solve(C, low, reg_eps, method)
        out = Y / n
    else:
        C, n = cosine_matrix(Gn, live)
        low = U[:, live] * n
        Y = solve(C, low, reg_eps, method)
        out = U.copy()  # zero gradients keep v_t = u_t
        out[:, live] = Y / n
    _check_kkt(C, low, Y, reg_eps, method, solver)
    if E is not None:
        out = _scaled_back(out, E, max(e))
    if not np.isfinite(out).all():
        raise SolverError(f"{method}: the weights overflow after rescaling by the gradient norms {n.tolist()}")
    return out


def _scaled_back(V: np.ndarray, E: np.ndarray | int, top: int) -> np.ndarray:
    """``V · 2^E`` row by row (exact; ``top = max E``; an overflow gives inf, which the caller reports)."""
    if top <= 0:  # scaling down cannot overflow
        return np.ldexp(V, E)
    with np.errstate(over="ignore"):
        return np.ldexp(V, E)


SMALL_T = 6
"""Up to this many tasks, :func:`dual_cone_rows` solves the projection on Python floats (``ridge="relative"``,
``solver="nnls"``): inside a training step (the interpreter cold after the backward) its ≤ T³ operations
cost less than the ≈ 15 numpy and scipy calls of the general route — 0.30 against 0.52 ms at T = 5, 0.44
against 0.56 ms at T = 6; at T = 8 they are even, 0.64 and 0.61 ms (docs/performance.md, "The dual-cone
projection at few tasks")."""

PIVOT_MIN = 1e-6
"""The smallest squared Cholesky pivot :func:`dual_cone_rows` accepts in a free block of ``C + reg_eps I`` (unit
diagonal): below it the block's condition number exceeds ≈ 1e6 and the normal-equations solve could lose more
than ≈ 1e-10 of the solution, so the general route (NNLS on the square root) solves that problem instead."""


def dual_cone_rows(G: list[list[float]], U: list[list[float]], reg_eps: float) -> list[list[float]] | None:
    """:func:`dual_cone_weights` with ``ridge="relative"``, ``solver="nnls"`` on Python floats, or ``None``.

    ``G`` is a validated symmetric Gramian (:func:`~mtlens.engine.numerics.check_gramian_rows`: T lists
    of T finite floats), ``U`` k rows of T requested weights ``u ≥ 0``. For each row the problem on the
    unit gradients, ``min_{y ≥ n ⊙ u} yᵀ(C + reg_eps I)y`` (``C`` the cosine matrix, ``n_t = ‖g_t‖``),
    is solved by the active-set algorithm of Lawson & Hanson (Solving Least Squares Problems, 1974,
    ch. 23) in the normal-equations form of Bro & De Jong (J. Chemometrics 11, 1997, "FNNLS"), which
    works on ``C + reg_eps I`` itself — here the data — with a Cholesky solve of the free block at each
    step; ``v = y / n``. Each row is solved for ``u`` scaled by a power of two to ``max_t u_t`` in [1, 2) and
    scaled back, as in :func:`dual_cone_weights` (``v(c·u) = c·v(u)`` for any scale of ``u``). The result is
    certified by the same KKT conditions as the general route (:func:`_check_kkt`, ``KKT_RTOL`` relative to
    ``Σ_t |y_t|``).

    Returns ``None`` — the caller then runs the general route (eigen-decomposition + NNLS on the square
    root), which handles these cases and raises its errors — when: T > :data:`SMALL_T`; a zero-gradient
    task (``‖g_t‖² ≤ ZERO_REL · max``); the trace below :data:`TRACE_TINY`; a free block that is not
    well conditioned (a squared Cholesky pivot ≤ :data:`PIVOT_MIN`: nearly dependent gradients); no
    convergence within ``3T + 10`` steps; a KKT residual above ``KKT_RTOL``; or weights beyond the float64
    range. Both routes solve the
    same strictly convex problem (``reg_eps > 0``) and agree to rounding (tests/methods/test_dual_cone_rows.py).
    """
    T = len(G)
    if not 0 < T <= SMALL_T or any(len(u) != T for u in U):
        return None
    d = [G[i][i] for i in range(T)]
    if not sum(d) > TRACE_TINY:
        return None
    top = max(d)
    if not all(x > 0.0 and x > ZERO_REL * top for x in d):
        return None
    n = [math.sqrt(x) for x in d]
    # C + reg_eps I, the cosine matrix as the general route forms it (G_ij / (n_i n_j), an exact unit diagonal)
    A = [[(1.0 + reg_eps) if i == j else G[i][j] / (n[i] * n[j]) for j in range(T)] for i in range(T)]
    out: list[list[float]] = []
    for u in U:
        # solved for u / 2^e with max_t u_t in [1, 2) (exact) and scaled back, as in dual_cone_weights: a tiny or
        # huge u neither underflows the certificate's scale nor overflows u ⊙ n
        top_u = max(u)
        e = math.frexp(top_u)[1] - 1 if top_u > 0.0 else 0
        if e == 0:  # UPGrad's rows e_i
            low = [u[t] * n[t] for t in range(T)]
        elif e >= -1022:  # 2^-e is a float: multiplying by it is exact (as ldexp)
            f = math.ldexp(1.0, -e)
            low = [u[t] * f * n[t] for t in range(T)]
        else:  # a subnormal max u_t
            low = [math.ldexp(u[t], -e) * n[t] for t in range(T)]
        y = _bound_qp(A, low, T)
        if y is None or _kkt_residual(A, low, y, T) > KKT_RTOL:
            return None
        # v ≥ u exactly (u_t n_t / n_t can round below u_t); 2^e (e ≥ -1074) is a float, an overflow gives inf
        if e == 0:
            v = [max(y[t] / n[t], u[t]) for t in range(T)]
        else:
            f = math.ldexp(1.0, e)
            v = [max(y[t] / n[t] * f, u[t]) for t in range(T)]
        if not all(map(math.isfinite, v)):
            return None
        out.append(v)
    return out


def _bound_qp(A: list[list[float]], low: list[float], T: int) -> list[float] | None:
    """``argmin_{y ≥ low} yᵀ A y`` for a symmetric positive-definite ``A`` (T×T floats), or ``None``.

    Lawson–Hanson on ``x = y − low ≥ 0`` with the half-gradient ``g = A y`` as the dual: a bound
    variable with the most negative ``g_j`` is freed; the minimiser over the free set with the others at
    their bounds (``A_FF y_F = −A_FB low_B``, Cholesky) is taken if every freed variable stays above
    its bound, else the step is cut back to the first bound met and that variable is fixed again."""
    y = list(low)
    free: list[int] = []
    g = [sum(map(mul, Ai, y)) for Ai in A]
    for _ in range(3 * T + 10):
        scale = sum(map(abs, y))
        j, gj = -1, -64 * _EPS * T * (scale if scale > 0.0 else 1.0)
        for i in range(T):
            if g[i] < gj and i not in free:
                j, gj = i, g[i]
        if j < 0:
            return y
        free.append(j)
        while True:
            z = _free_minimiser(A, low, free)
            if z is None:
                return None
            bad = [i for i in free if not z[i] > low[i]]
            if not bad:
                y = z
                break
            # step from y towards z, cut where the first free variable reaches its bound; that one (and any
            # other now at its bound) is fixed again
            alpha, first = min(((y[i] - low[i]) / (y[i] - z[i]) if y[i] > z[i] else 0.0, i) for i in bad)
            for i in free:
                y[i] += alpha * (z[i] - y[i])
            left = [i for i in free if i != first and y[i] > low[i]]
            for i in free:
                if i not in left:
                    y[i] = low[i]
            free = left
        g = [sum(map(mul, Ai, y)) for Ai in A]
    return None


def _free_minimiser(A: list[list[float]], low: list[float], free: list[int]) -> list[float] | None:
    """``y`` with ``y_B = low_B`` and ``A_FF y_F = −A_FB low_B`` (Cholesky), or ``None`` if a squared pivot of
    ``A_FF`` is ≤ :data:`PIVOT_MIN`."""
    fixed = list(low)
    for i in free:
        fixed[i] = 0.0
    b = [-sum(map(mul, A[i], fixed)) for i in free]
    f = len(free)
    y = list(low)
    if f == 1:
        (i,) = free
        if not A[i][i] > PIVOT_MIN:
            return None
        y[i] = b[0] / A[i][i]
        return y
    L = [[0.0] * f for _ in range(f)]
    for r in range(f):
        Ar, Lr = A[free[r]], L[r]
        for c in range(r + 1):
            Lc = L[c]
            v = Ar[free[c]] - sum(map(mul, Lr[:c], Lc[:c]))
            if r == c:
                if not v > PIVOT_MIN:  # A_FF near singular (nearly dependent gradients): the eigen route decides
                    return None
                Lr[r] = math.sqrt(v)
            else:
                Lr[c] = v / Lc[c]
    w = [0.0] * f  # L w = b, then Lᵀ x = w
    for r in range(f):
        Lr = L[r]
        w[r] = (b[r] - sum(map(mul, Lr[:r], w[:r]))) / Lr[r]
    for r in range(f - 1, -1, -1):
        x = w[r]
        for k in range(r + 1, f):
            x -= L[k][r] * y[free[k]]
        y[free[r]] = x / L[r][r]
    return y


def _kkt_residual(A: list[list[float]], low: list[float], y: list[float], T: int) -> float:
    """:func:`_check_kkt`'s residual of one row on Python floats (``A`` already holds the ridge)."""
    g = [sum(map(mul, Ai, y)) for Ai in A]
    s = sum(map(abs, y))
    s = s if s > 0.0 else 1.0
    feas = max(low[t] - y[t] for t in range(T))
    dual = max(-x for x in g)
    comp = max(abs((y[t] - low[t]) * g[t]) for t in range(T))
    res = max(max(feas, dual) / s, comp / (s * s))
    return res if math.isfinite(res) else math.inf


def _solve_where_needed(solve: Callable[..., np.ndarray], M: np.ndarray, low: np.ndarray, reg_eps: float,
                        method: str) -> np.ndarray:
    """Rows ``y = argmin_{y ≥ low} yᵀ(M + reg_eps I)y``, calling ``solve`` only for the rows whose lower bound
    is not already the minimiser.

    ``y = low`` is optimal exactly when the gradient there, ``(M + reg_eps I) low``, is ≥ 0 (the KKT conditions:
    ``y ≥ low``, gradient ≥ 0, complementarity with ``y − low = 0``). For UPGrad's rows ``low = n_i e_i`` that
    is: task i's gradient conflicts with no other (no negative cosine), so it is not projected. Such rows
    cost no eigen-decomposition or NNLS; when no row needs a solve (no conflict at all) none runs."""
    grad = low @ M + reg_eps * low  # M is symmetric: row k is (M + reg_eps I) low_k
    need = (grad < 0.0).any(axis=1)
    if need.all():
        return solve(M, low, reg_eps, method)
    out = low.copy()
    if need.any():
        out[need] = solve(M, low[need], reg_eps, method)
    return out


KKT_RTOL = 1e-8
"""Tolerance of the KKT certificate of the projection on the unit gradients (relative to ``Σ_t y_t``)."""


def _check_kkt(C: np.ndarray, low: np.ndarray, Y: np.ndarray, reg_eps: float, method: str, solver: str) -> None:
    """Certify each row ``y`` of ``Y`` as ``argmin_{y ≥ low} yᵀ(C + reg_eps I)y`` by its KKT conditions.

    With ``g = (C + reg_eps I) y`` (``g_t`` is ``ĝ_t·d`` plus the ridge): ``y ≥ low``, ``g ≥ 0`` and
    ``(y − low)_t g_t = 0``, each to ``KKT_RTOL`` relative to ``s = Σ_t |y_t|`` (``s²`` for the
    products) — every task on its own scale. Raises :class:`SolverError` ("not converged") naming the
    residual otherwise (none known: nnls reaches ~1e-16, quadprog ~1e-10 at condition numbers 1e10)."""
    G = Y @ C + reg_eps * Y  # C is symmetric: row k is (C + reg_eps I) y_k
    scale = np.abs(Y).sum(axis=1)
    scale = np.where(scale > 0.0, scale, 1.0)  # y = 0: nothing to certify (every term below is 0)
    res = float(np.max(np.maximum(np.maximum((low - Y).max(axis=1), -G.min(axis=1)) / scale,
                                   np.abs((Y - low) * G).max(axis=1) / scale**2)))
    if not res <= KKT_RTOL:
        raise SolverError(
            f"{method}: not converged: the {solver} solution of the dual-cone projection has a relative KKT "
            f"residual {res:.2e} > {KKT_RTOL:.0e} on the unit gradients (cosine matrix condition number "
            f"{np.linalg.cond(C):.1e}). Try solver='nnls' (exact active set) or a larger reg_eps."
        )


def _solve_nnls(Gn: np.ndarray, U: np.ndarray, reg_eps: float, method: str) -> np.ndarray:
    from scipy.optimize import nnls

    if not np.isfinite(Gn).all():  # scipy's nnls aborts the process (double free) on inf/NaN
        raise NonFiniteError(f"{method}: the scaled Gramian has non-finite entries (entries near the float64 limit?)")
    try:
        lam, Q = np.linalg.eigh(Gn)
    except np.linalg.LinAlgError as exc:
        raise SolverError(f"{method}: eigen-decomposition of the Gramian failed ({exc})") from exc
    lam = np.clip(lam, 0.0, None) + reg_eps
    R = np.sqrt(lam)[:, None] * Q.T  # vᵀ(G + reg_eps I)v = ‖R v‖²
    out = np.empty_like(U)
    T = Gn.shape[0]
    for k, u in enumerate(U):
        try:
            x, _ = nnls(R, -(R @ u), maxiter=max(50 * T, 100))
        except RuntimeError as exc:  # iteration limit
            raise SolverError(
                f"{method}: NNLS did not converge ({exc}); the Gramian may be badly conditioned. "
                "Try solver='quadprog' or a larger reg_eps."
            ) from exc
        if not np.isfinite(x).all():
            raise SolverError(f"{method}: NNLS returned non-finite weights")
        out[k] = u + x
    return out


def _solve_quadprog(Gn: np.ndarray, U: np.ndarray, reg_eps: float, method: str) -> np.ndarray:
    from qpsolvers import solve_qp

    T = Gn.shape[0]
    P = Gn + reg_eps * np.eye(T)
    out = np.empty_like(U)
    for k, u in enumerate(U):
        try:
            v = solve_qp(P, np.zeros(T), -np.eye(T), -u, solver="quadprog")
        except Exception as exc:  # quadprog raises ValueError on a non-PD matrix / infeasibility
            raise SolverError(f"{method}: quadprog failed ({type(exc).__name__}: {exc})") from exc
        if v is None or not np.isfinite(v).all():
            raise SolverError(
                f"{method}: quadprog returned no solution; try solver='nnls' or a larger reg_eps"
            )
        out[k] = np.maximum(v, u)  # quadprog meets v ≥ u only to its feasibility tolerance
    return out


class _DualConeMethod(Protocol):
    @property
    def name(self) -> str: ...
    pref_vector: tuple[float, ...] | None
    reg_eps: float
    solver: str
    ridge: str


def init_dual_cone(method: _DualConeMethod, pref_vector: Sequence[float] | None, reg_eps: float,
                   solver: str, ridge: str = "relative") -> None:
    """Validate and store the hyper-parameters shared by UPGrad and DualProj on ``method``.

    Sets ``method.pref_vector``, ``method.reg_eps``, ``method.solver`` and ``method.ridge``;
    raises :class:`ConfigurationError` / :class:`MissingDependencyError` naming ``method.name``.
    """
    name = method.name
    method.pref_vector = check_pref_vector(pref_vector, name)
    method.reg_eps = in_range("reg_eps", reg_eps, 0.0, 1.0, name)
    check(solver in SOLVERS, f"{name}: solver={solver!r}; choose one of {SOLVERS}")
    check(solver != "quadprog" or method.reg_eps > 0,
          f"{name}: solver='quadprog' needs reg_eps > 0 (a strictly positive-definite matrix)")
    check(ridge in RIDGES, f"{name}: ridge={ridge!r}; choose one of {RIDGES} ('relative': reg_eps·‖g_t‖² per task, "
          "scale-aware; 'trace': reg_eps·trace(G), TorchJD's problem)")
    require_solver(solver, name)
    method.solver = solver
    method.ridge = ridge


def check_pref_vector(pref_vector: Sequence[float] | None, method: str) -> tuple[float, ...] | None:
    """Validate a preference vector given at construction (non-negative, not all zero)."""
    from ..errors import ConfigurationError

    if pref_vector is None:
        return None
    try:
        values = tuple(float(x) for x in pref_vector)
    except TypeError as exc:
        raise ConfigurationError(
            f"{method}: pref_vector must be a sequence of numbers, got {pref_vector!r}"
        ) from exc
    if not values or any(not np.isfinite(x) or x < 0 for x in values) or sum(values) <= 0:
        raise ConfigurationError(
            f"{method}: pref_vector must hold finite non-negative numbers, not all zero; got {list(values)}"
        )
    return values


def pref_weights(pref: tuple[float, ...] | None, T: int, method: str) -> np.ndarray:
    """The preference weights for T tasks: ``1/T`` each by default (the mean)."""
    from ..errors import ShapeError

    if pref is None:
        return np.full(T, 1.0 / T)
    if len(pref) != T:
        raise ShapeError(f"{method}: pref_vector has {len(pref)} entries but there are {T} tasks")
    return np.asarray(pref, dtype=np.float64)


def check_gramian(gramian: Tensor, method: str) -> int:
    """T of a Gramian validated by :func:`mtlens.engine.numerics.check_gramian` (the one validation)."""
    return int(validate_gramian(gramian, method).shape[0])


def small_route(method: _DualConeMethod, gramian: Tensor,
                rows_of_u: Callable[[int], list[list[float]]]) -> list[list[float]] | None:
    """UPGrad's and DualProj's entry into :func:`dual_cone_rows`: ``V`` (k lists of T floats) for the rows
    ``rows_of_u(T)`` of ``U``, or ``None`` where the general route (:func:`dual_cone_weights`) must run — a
    ridge or solver other than ``"relative"`` / ``"nnls"``, T > :data:`SMALL_T`, or the route declining. The
    Gramian is validated first (:func:`~mtlens.engine.numerics.check_gramian_rows`: the general route's
    errors); ``rows_of_u`` may raise (a ``pref_vector`` of the wrong length)."""
    if (method.ridge != "relative" or method.solver != "nnls" or not isinstance(gramian, Tensor)
            or gramian.ndim != 2 or gramian.shape[0] > SMALL_T):
        return None
    rows = check_gramian_rows(gramian, method.name)
    return dual_cone_rows(rows, rows_of_u(len(rows)), method.reg_eps)
