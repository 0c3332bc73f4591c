"""Small numerical helpers shared by the Gramian-based aggregators (float64, CPU, small T).

Every helper works on the task Gramian ``G = J Jᵀ`` (T×T) and never needs J itself. They are
meant for reuse by any method module; each one documents its contract:

* :func:`check_gramian` — the Gramian (validated by :func:`mtlens.engine.numerics.check_gramian`)
  and the loss vector as numpy arrays; raises :class:`~mtlens.errors.ShapeError` /
  :class:`~mtlens.errors.NonFiniteError`.
* :func:`gramian_scale` — the largest squared gradient norm (``max_t G_tt``), the natural unit
  for relative tolerances.
* :func:`nonzero_tasks` — which rows of J are numerically non-zero.
* :func:`cosine_matrix` — ``G_ij / (‖g_i‖‖g_j‖)`` for the non-zero rows.
* :func:`psd_eigh` — ``torch.linalg.eigh`` with the numerical null space dropped (relative
  tolerance), eigenvalues in decreasing order.
* :func:`min_norm_simplex` — the EXACT minimiser of ``wᵀGw`` over the probability simplex
  (the min-norm point of the convex hull of the gradients, MGDA's sub-problem) by Wolfe's
  finite active-set algorithm, with a KKT certificate and a deterministic, permutation
  equivariant tie-break among optimal weight vectors.

All functions take and return ``numpy`` float64 arrays unless stated otherwise; the methods
convert from/to torch at their boundary (``G`` is tiny, T×T).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from operator import mul
from typing import overload

import numpy as np
import torch
from scipy.linalg.lapack import dposv as _dposv
from scipy.linalg.lapack import dpotrs as _dpotrs
from torch import Tensor

from ..engine.numerics import ZERO_REL, check_gramian_numpy
from ..errors import NonFiniteError, ShapeError, SolverError

ZERO_ROW_RTOL = ZERO_REL
"""The zero tolerance of :mod:`mtlens.engine.numerics` (:data:`~mtlens.engine.numerics.ZERO_REL`)."""


@overload
def check_gramian(gramian: Tensor, losses: Tensor, method: str) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def check_gramian(gramian: Tensor, losses: None, method: str) -> tuple[np.ndarray, None]: ...
def check_gramian(
    gramian: Tensor, losses: Tensor | None, method: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """A method's inputs as float64 numpy arrays ``(G, losses)``.

    ``G`` is validated and symmetrised by :func:`mtlens.engine.numerics.check_gramian` (the one
    Gramian validation: :class:`~mtlens.errors.ShapeError` / :class:`~mtlens.errors.NonFiniteError`);
    ``losses`` (optional) must be a finite vector of length T.
    """
    G = check_gramian_numpy(gramian, method)
    L = None
    if losses is not None:
        lt = losses if isinstance(losses, Tensor) else torch.as_tensor(losses)
        L = lt.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1)
        if L.shape[0] != G.shape[0]:
            raise ShapeError(f"{method}: got {L.shape[0]} losses for a {G.shape[0]}×{G.shape[0]} Gramian")
        if not np.isfinite(L).all():
            raise NonFiniteError(f"{method}: non-finite task loss {L.tolist()}")
    return G, L


def to_weights(w: np.ndarray, like: Tensor) -> Tensor:
    """numpy weights → float64 tensor on ``like``'s device."""
    return torch.as_tensor(np.asarray(w, dtype=np.float64), dtype=torch.float64, device=like.device)


def gramian_scale(G: np.ndarray) -> float:
    """``max_t G_tt`` (the largest squared task-gradient norm); 0 when every row is zero."""
    return float(max(np.max(np.diag(G)), 0.0))


def nonzero_tasks(G: np.ndarray, rtol: float = ZERO_ROW_RTOL) -> np.ndarray:
    """Boolean mask of the tasks whose gradient is not (numerically) zero."""
    d = np.diag(G)
    s = gramian_scale(G)
    return (d > 0) & (d > rtol * s)


def cosine_matrix(G: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(C, norms)`` with ``C_ij = G_ij/(‖g_i‖‖g_j‖)`` over the tasks in ``mask``.

    ``C`` is clipped to [-1, 1] and has an exact unit diagonal; it is invariant to any
    positive per-task rescaling of the gradients (its conditioning does not depend on scale)."""
    idx = np.flatnonzero(mask) if mask is not None else np.arange(G.shape[0])
    n = np.sqrt(np.diag(G)[idx])
    C = G[np.ix_(idx, idx)] / np.outer(n, n)
    C = np.clip(0.5 * (C + C.T), -1.0, 1.0)
    np.fill_diagonal(C, 1.0)
    return C, n


def psd_eigh(G: Tensor | np.ndarray, rtol: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a PSD matrix by ``torch.linalg.eigh``; null space dropped.

    Returns ``(lam, V)`` with the eigenvalues ``lam`` (k,) in decreasing order and the matching
    eigenvectors as the columns of ``V`` (T×k), keeping only ``lam > rtol · max(lam)``.
    Default ``rtol = T · eps(float64)`` (the rank tolerance of ``numpy.linalg.matrix_rank``).
    An all-zero matrix gives ``k = 0``.
    """
    M = torch.as_tensor(np.asarray(G, dtype=np.float64)) if not isinstance(G, Tensor) else \
        G.detach().to(device="cpu", dtype=torch.float64)
    T = M.shape[0]
    lam, V = torch.linalg.eigh(0.5 * (M + M.T))
    lam, V = lam.numpy()[::-1].copy(), V.numpy()[:, ::-1].copy()
    top = float(lam[0]) if T else 0.0
    if rtol is None:
        rtol = T * np.finfo(np.float64).eps
    if top <= 0.0:
        return lam[:0], V[:, :0]
    keep = lam > rtol * top
    return lam[keep], V[:, keep]


# ---------------------------------------------------------------------------------------------
# Min-norm point of the convex hull (MGDA's sub-problem), exact.
# ---------------------------------------------------------------------------------------------


@dataclass
class MinNormResult:
    """Solution of ``min_{w ∈ Δ} wᵀGw``.

    Attributes:
        weights: optimal ``w`` (T,), non-negative, summing to 1.
        value: ``wᵀGw`` (the squared norm of the min-norm point), in ``G``'s units.
        iterations: Wolfe major cycles.
        kkt_gap: Frank-Wolfe duality gap ``wᵀGw − min_i (Gw)_i`` relative to ``max_t G_tt``
            (0 at the exact optimum; the returned point satisfies it to ``tol``); with
            ``relative=True`` the per-task gap (``kkt_gap_task``).
        kkt_gap_task: the largest per-task violation ``(wᵀGw − (Gw)_i) / (‖g_i‖·Σ_k w_k‖g_k‖)``: ``w`` is
            exactly optimal for a Gramian whose entries ``G_ij`` are perturbed by at most
            ``3·kkt_gap_task·‖g_i‖‖g_j‖`` (a componentwise backward error; scale free).
        clipped_eigenvalue: 0, or ``−λ_min(G)/max_t G_tt`` when ``G`` was not positive semi-definite
            (round-off of a float32 Gramian) and the certified answer is that of its PSD part.
    """

    weights: np.ndarray
    value: float
    iterations: int
    kkt_gap: float
    kkt_gap_task: float = 0.0
    clipped_eigenvalue: float = 0.0


def _affine_minimizer(M: np.ndarray) -> np.ndarray:
    """``argmin vᵀMv s.t. Σv = 1`` by SVD least squares (the route for numerically singular supports).

    The same lifted, equilibrated system as :func:`_affine_minimizer_chol`, ``(M + c11ᵀ) u = 1``,
    solved by ``numpy.linalg.lstsq`` (minimum-norm solution; the system is consistent even when the
    points are affinely dependent, e.g. duplicated tasks, and every solution gives the same affine
    minimiser ``Σ v_i p_i``). Scale-aware like the Cholesky route: the bordered KKT matrix
    ``[[M, 1], [1ᵀ, 0]]`` formerly used here mixed the border's unit scale with ``M``'s, and
    its rank cut dropped the information of supports of small gradients."""
    k = M.shape[0]
    diag = M.diagonal()
    c = float(diag.min()) if diag.min() > 0 else float(max(diag.max(), 1.0))
    A = M + c
    d = 1.0 / np.sqrt(A.diagonal())
    y = np.linalg.lstsq(A * np.outer(d, d), d, rcond=None)[0]
    u = d * y
    su = float(u.sum())
    if not (su > 0.0 and np.isfinite(su)):  # cannot happen for a consistent PSD system; be loud
        raise SolverError(f"min_norm_simplex: the affine minimiser of a {k}-task support is undefined (Σu = {su})")
    return u / su


def _affine_minimizer_chol(M: np.ndarray) -> np.ndarray | None:
    return _affine_minimizer_chol_pivot(M)[0]


def _affine_minimizer_chol_pivot(M: np.ndarray) -> tuple[np.ndarray | None, bool]:
    """``argmin vᵀMv s.t. Σv = 1`` by one Cholesky solve (Wolfe 1976, §3), or ``None``.

    With ``c > 0`` the lifted Gramian ``M + c·11ᵀ`` (Gramian of the points ``(√c, p_i)``) is
    positive definite iff the points are affinely independent, and ``(M + c11ᵀ) v = (c + vᵀMv)·1``
    at the affine minimiser, so ``v = u/Σu`` with ``(M + c11ᵀ) u = 1``. ``c = min_i M_ii``: the
    smallest point's own scale, so that points far smaller than the largest (norms 1e12 apart) keep
    their relative precision in the lifted matrix (with ``c = max_i M_ii`` the small points' entries
    drown in ``c``; on random Gramians with norm spreads to 1e12 that left 25 of 300 per-task KKT
    certificates unmet, against 2 of 300 with the minimum). Equilibrated to a unit diagonal, one step of
    iterative refinement.
    ``None`` when ``c = 0`` or LAPACK's ``dposv`` finds the lifted matrix not positive definite
    (affinely dependent to working precision: the caller takes the SVD route).

    ``_affine_minimizer_chol_pivot`` also returns :func:`_clearly_independent` of ``M``, read off the
    same factor (the same matrix is factored; only the right-hand side differs)."""
    k = M.shape[0]
    c = float(M.diagonal().min())
    if not c > 0.0:
        return None, False
    A = M + c
    d = 1.0 / np.sqrt(A.diagonal())  # equilibrated: unit diagonal (norms 1e12 apart factor alike)
    ones = np.ones(k)
    fac, y, info = _dposv(A * np.outer(d, d), d, lower=0)
    if info != 0:
        return None, False
    independent = float(np.min(np.abs(fac.diagonal()))) ** 2 > 1e-10  # as _clearly_independent(M)
    u = d * y
    dy, info = _dpotrs(fac, d * (ones - A @ u), lower=0)
    if info == 0:
        u = u + d * dy
    su = float(u.sum())
    if not (su > 0.0 and np.isfinite(su)):
        return None, independent
    return u / su, independent


SMALL_T = 12
"""Up to this many tasks :func:`min_norm_simplex` first tries :func:`_min_norm_all_tasks` (plain floats)."""


def _min_norm_all_tasks(G: np.ndarray, s: float, tol: float, relative: bool) -> MinNormResult | None:
    """:func:`_min_norm_all_tasks_floats` of a numpy Gramian, as a :class:`MinNormResult` (or ``None``)."""
    out = _min_norm_all_tasks_floats(G.tolist(), s, tol, relative)
    if out is None:
        return None
    w, value, gap, gap_task = out
    return MinNormResult(np.array(w), value, 1, gap, gap_task)


def _min_norm_all_tasks_numpy(G: np.ndarray, s: float, tol: float, relative: bool) -> MinNormResult | None:
    """:func:`_min_norm_all_tasks_floats` for larger T, in numpy: the same steps and tests in ~35 array calls
    instead of the general path's ~90 (each costs ~5 µs inside a training step)."""
    Gn = G / s
    dn = Gn.diagonal()
    if not float(dn.min()) > 0.0:
        return None
    norms = np.sqrt(dn)
    i0 = int(np.argmin(dn))
    if max(0.0, float(np.max((dn[i0] - Gn[:, i0]) / (norms * norms[i0])))) <= tol:
        return None  # the vertex is optimal: the general path returns it
    v, independent = _affine_minimizer_chol_pivot(Gn)
    if v is None or not independent or not float(v.min()) > 0.0:
        return None
    grad = Gn @ v
    x2 = float(v @ grad)
    if x2 > float(dn[i0]):
        return None
    gap_task = max(0.0, float(np.max((x2 - grad) / (norms * float(norms @ v)))))
    if gap_task > tol:
        return None
    gap_abs = max(0.0, float(np.max(x2 - grad)))
    return MinNormResult(v, x2 * s, 1, gap_task if relative else gap_abs, gap_task)


def _min_norm_two_tasks_floats(G: list[list[float]], s: float, tol: float, relative: bool
                               ) -> tuple[list[float], float, float, float] | None:
    """Two tasks in closed form, in plain floats: the minimiser of ``‖(1−t)g_1 + t g_2‖²`` on ``[0, 1]``,
    ``t = (Gn_11 − Gn_12)/‖g_1 − g_2‖²`` clipped (identical gradients: ½ each), ``Gn = G/s``, kept when it meets
    the certificate asked for — :func:`min_norm_simplex`'s two-task step (it calls this), with the certificate of
    its ``gaps``. Returns ``(weights, value, kkt_gap, kkt_gap_task)``, or ``None`` (near-identical gradients whose
    closed form misses the certificate: Wolfe's algorithm decides). Each numpy call on a 2×2 matrix costs ~5 µs
    right after a backward pass, more than this whole function."""
    a, b, b1, c = G[0][0] / s, G[0][1] / s, G[1][0] / s, G[1][1] / s
    den = a + c - 2.0 * b
    t = min(max((a - b) / den, 0.0), 1.0) if den > 0.0 else 0.5
    w0, w1 = 1.0 - t, t
    g0, g1 = a * w0 + b * w1, b1 * w0 + c * w1
    x2 = w0 * g0 + w1 * g1
    n0, n1 = math.sqrt(max(a, 0.0)), math.sqrt(max(c, 0.0))
    nw = n0 * w0 + n1 * w1
    s0, s1 = n0 * nw, n1 * nw
    gap_abs = max(0.0, x2 - g0, x2 - g1)
    gap_task = max(0.0, (x2 - g0) / (s0 if s0 > 0 else 1.0), (x2 - g1) / (s1 if s1 > 0 else 1.0))
    gap = gap_task if relative else gap_abs
    if not gap <= tol:
        return None
    return [w0, w1], x2 * s, gap, gap_task


def _min_norm_all_tasks_floats(G: list[list[float]], s: float, tol: float, relative: bool
                               ) -> tuple[list[float], float, float, float] | None:
    """Wolfe's algorithm on its most common path — every task in the optimal support — in plain floats.

    The same steps and tests as :func:`min_norm_simplex` takes on that path: ``Gn = G/s``; the vertex of
    least norm is not optimal; the whole task set's lifted Gramian ``Gn + c·11ᵀ`` (``c = min_t Gn_tt``),
    equilibrated to a unit diagonal, has a Cholesky factor with every pivot² above ``1e-10`` (clearly
    affinely independent: the optimal weights are unique, no tie-break applies, and no two tasks are
    copies); its affine minimiser (one solve, one step of iterative refinement) is positive, no worse
    than the vertex, and meets the per-task KKT condition — the one certificate, unchanged:
    ``(Gw)_i ≥ wᵀGw − tol·‖g_i‖·Σ_k w_k‖g_k‖`` for every task. Anything else returns ``None`` and the
    general algorithm runs from the start.

    Why: for small T the numpy version's ~90 calls on T×T arrays cost more than their arithmetic, and
    inside a training step (after the backward passes) each call costs ~5 µs: 0.3–0.45 ms per decision
    (docs/performance.md, "Feature-level Gramian methods"). Here: T² / T³ float operations in Python.

    ``G``: the T×T Gramian as nested lists (finite, symmetric), ``s = max_t G_tt > 0``. Returns
    ``(weights, wᵀGw, gap, per-task gap)`` (``gap`` per task with ``relative``, else absolute) or ``None``."""
    T = len(G)
    g = [[x / s for x in row] for row in G]  # Gn = G / s, entry by entry (the same IEEE divisions)
    dn = [g[i][i] for i in range(T)]
    norms = [math.sqrt(x) if x > 0.0 else 0.0 for x in dn]
    if min(norms) <= 0.0:
        return None
    i0 = min(range(T), key=dn.__getitem__)  # the first index of the least norm, as np.argmin
    x2v, n0 = dn[i0], norms[i0]
    if max(0.0, max((x2v - g[i][i0]) / (norms[i] * n0) for i in range(T))) <= tol:
        return None  # the vertex is optimal: the general path returns it
    # the lifted, equilibrated Gramian and its Cholesky factor (rows of the lower factor L, M = L Lᵀ)
    c = min(dn)
    A = [[x + c for x in row] for row in g]
    d = [1.0 / math.sqrt(A[i][i]) for i in range(T)]
    L = [[0.0] * T for _ in range(T)]
    for i in range(T):
        Ai, di, Li = A[i], d[i], L[i]
        for j in range(i + 1):
            Lj = L[j]
            acc = Ai[j] * (di * d[j]) - sum(map(mul, Li[:j], Lj[:j]))
            if j == i:
                if not acc > 0.0:
                    return None  # not positive definite to working precision
                Li[i] = math.sqrt(acc)
            else:
                Li[j] = acc / Lj[j]
    if min(L[i][i] for i in range(T)) ** 2 <= 1e-10:
        return None  # not clearly independent: the tie-breaks may apply

    Lt = [list(col) for col in zip(*L)]  # Lᵀ by rows

    def solve(b: list[float]) -> list[float]:  # M y = b by L Lᵀ
        y = [0.0] * T
        for i in range(T):
            Li = L[i]
            y[i] = (b[i] - sum(map(mul, Li[:i], y[:i]))) / Li[i]
        for i in range(T - 1, -1, -1):
            y[i] = (y[i] - sum(map(mul, Lt[i][i + 1:], y[i + 1:]))) / L[i][i]
        return y

    u = [di * yi for di, yi in zip(d, solve(d))]  # (A) u = 1 through the equilibrated M
    r = [d[i] * (1.0 - sum(map(mul, A[i], u))) for i in range(T)]
    u = [u[i] + d[i] * dy for i, dy in enumerate(solve(r))]  # one step of iterative refinement
    su = sum(u)
    if not (su > 0.0 and math.isfinite(su)):
        return None
    w = [x / su for x in u]
    if min(w) <= 0.0:
        return None  # a task outside the optimal support: Wolfe's cycles decide
    grad = [sum(map(mul, gi, w)) for gi in g]
    x2 = sum(map(mul, w, grad))
    if x2 > dn[i0]:
        return None  # worse than the vertex (the general path would start from the vertex)
    nw = sum(map(mul, norms, w))
    gap_task = max(0.0, max((x2 - grad[i]) / (norms[i] * nw) for i in range(T)))
    if gap_task > tol:
        return None
    gap_abs = max(0.0, max(x2 - gi for gi in grad))
    return w, x2 * s, gap_task if relative else gap_abs, gap_task


def min_norm_simplex(G: np.ndarray, tol: float = 1e-13, max_iter: int | None = None,
                     tie_break: bool = True, relative: bool = False, strict: bool = True,
                     *, _psd: bool = False) -> MinNormResult:
    """Exact minimiser of ``wᵀGw`` over the simplex ``{w ≥ 0, Σw = 1}`` (Wolfe, 1976).

    Wolfe's min-norm-point algorithm is a finite active-set method: each minor cycle solves the
    affine minimiser on the current support exactly (a small linear system), so the result is
    exact up to floating point — unlike Frank–Wolfe, whose iterates only approach the optimum.
    ``G`` is first divided by ``max_t G_tt`` (the solution is scale invariant), so ``tol`` is
    relative to the largest squared gradient norm. Optimality is certified by the KKT condition
    ``(Gw)_i ≥ wᵀGw − tol`` for every i (the Frank–Wolfe gap); a violation after the finite
    algorithm stops raises :class:`~mtlens.errors.SolverError` ("not converged", with the gap).

    Implementation (ours; the certified result does not depend on it): two tasks in closed form;
    otherwise each affine minimiser is one LAPACK Cholesky solve of the lifted support Gramian
    ``G_SS + c·11ᵀ`` (Wolfe's own formulation), with ``c`` the support's smallest squared norm and
    the matrix equilibrated to a unit diagonal so that norms 1e12 apart keep their relative
    precision (SVD least squares on the same system where it is numerically singular: duplicated or
    affinely dependent tasks). Start: the vertex of least norm when it is optimal; otherwise the
    whole task set when its lifted Gramian is positive definite, shrunk (tasks whose affine weight
    is ≤ 0 dropped, repeatedly) to a corral — a valid start of Wolfe's algorithm — and kept if no
    worse than the vertex; otherwise the vertex. Major cycles run until every task's KKT condition
    holds on its own scale (below), which implies the absolute one, and stop after 3 cycles without
    decrease of ``‖x‖²`` (stalling in floating point). On the Gramians of the synthetic benchmark
    workloads (all tasks in the support) this is one cycle: 0.03–0.12 ms for T = 2–40, against
    0.1–4.8 ms for the former ``lstsq``-per-cycle version (``benchmarks/min_norm_solver.py``,
    docs/performance.md).

    A ``G`` that is not positive semi-definite (a float32 Gramian's round-off: eigenvalues down to
    about −1e-8·max G_tt with duplicated or opposite tasks) on which Wolfe's algorithm does not
    certify is solved on its PSD part (eigenvalues clipped at 0, a change within the Gramian's own
    round-off); ``clipped_eigenvalue`` reports it.

    With ``tie_break`` (default) the optimal weight vector of minimum Euclidean norm is chosen
    when the optimum is not unique (identical or affinely dependent gradients), which makes the
    weights equivariant to a permutation of the tasks (e.g. two identical rows get 1/2 each).
    An all-zero ``G`` returns uniform weights (every point of the simplex is optimal).

    With ``relative=True`` each task's KKT condition is measured on its own scale instead:
    ``(Gw)_i ≥ wᵀGw − tol·‖g_i‖·Σ_k w_k‖g_k‖`` (the round-off bound of ``(Gw)_i``), which resolves
    min-norm points far below the largest gradient (norms 1e8 apart: the optimum sits near the
    small ones, below the absolute tolerance); ``kkt_gap`` is then the largest relative violation.
    ``strict=False`` returns the last point with its ``kkt_gap`` instead of raising (for callers that
    certify their own result). ``kkt_gap_task`` is always the per-task gap, a componentwise backward
    error (:class:`MinNormResult`).

    Raises:
        NonFiniteError: ``G`` has a NaN or infinite entry.
        SolverError: "not converged" — Wolfe's algorithm stopped (``max_iter``, default ``50 + 20T``
            major cycles, or no further progress in floating point) with a KKT gap above ``1e3·tol``
            on a positive semi-definite Gramian; the message gives the gap, the iterations and the
            Gramian's diagonal.
    """
    G = np.asarray(G, dtype=np.float64)
    T = G.shape[0]
    if not np.isfinite(G).all():  # NaN compares false everywhere below: it would give uniform weights
        raise NonFiniteError(f"min_norm_simplex: the Gramian has non-finite entries (diagonal {np.diag(G).tolist()})")
    if T == 1:
        return MinNormResult(np.ones(1), float(G[0, 0]), 0, 0.0)
    s = max(float(G.diagonal().max()), 0.0)  # gramian_scale
    if s <= 0.0:
        return MinNormResult(np.full(T, 1.0 / T), 0.0, 0, 0.0)
    if T >= 3:
        fast = (_min_norm_all_tasks if T <= SMALL_T else _min_norm_all_tasks_numpy)(G, s, tol, relative)
        if fast is not None:
            return fast
    Gn = G / s
    max_iter = max_iter if max_iter is not None else 50 + 20 * T
    pos_eps = 0.0  # weights are kept however small: norms 1e8 apart give optimal weights of 1e-16

    norms = np.sqrt(np.maximum(Gn.diagonal(), 0.0))

    def gaps(w: np.ndarray) -> tuple[float, float, float]:
        """(x2, absolute gap, per-task gap) of the point ``w``."""
        grad = Gn @ w
        x2 = float(w @ grad)
        scale = norms * float(norms @ w)
        per_task = (x2 - grad) / np.where(scale > 0, scale, 1.0)
        return x2, max(0.0, float(np.max(x2 - grad))), max(0.0, float(np.max(per_task)))

    def affine(S: np.ndarray) -> np.ndarray:
        GS = Gn[S[:, None], S]
        v = _affine_minimizer_chol(GS)
        return _affine_minimizer(GS) if v is None else v

    if T == 2:
        # two tasks in closed form, kept when it meets the certificate asked for (it does but for
        # near-identical gradients), else Wolfe below
        two = _min_norm_two_tasks_floats(G.tolist(), s, tol, relative)
        if two is not None:
            return MinNormResult(np.array(two[0]), two[1], 1, two[2], two[3])

    # start: Wolfe's vertex of least norm when it is already optimal; otherwise the whole task set
    # when it is affinely independent (its affine minimiser is the answer when it lies in the
    # simplex) and no worse than the vertex, otherwise the vertex (Wolfe's start)
    i0 = int(np.argmin(Gn.diagonal()))
    S = np.array([i0])
    wS = np.ones(1)
    w = np.zeros(T)
    w[i0] = 1.0
    full_independent: bool | None = None  # _clearly_independent(Gn), when the whole set was factored
    if gaps(w)[2] > tol and norms.min() > 0.0:
        v, full_independent = _affine_minimizer_chol_pivot(Gn)
        S2, wS2 = S, wS
        if v is not None and v.min() > pos_eps:
            S2, wS2 = np.arange(T), v
        elif v is not None:
            # a guess of the optimal support: drop every task the affine minimiser gives a weight
            # ≤ 0 and repeat on the rest (a few Cholesky solves; the support shrinks every time)
            # until the affine minimiser is positive: a corral, a valid start of Wolfe's algorithm
            S2 = np.arange(T)
            while v is not None and v.min() <= pos_eps:
                S2 = S2[v > pos_eps]
                v = affine(S2) if S2.size > 1 else np.ones(1)
            wS2 = v
        w2 = np.zeros(T)
        w2[S2] = wS2
        if float(w2 @ Gn @ w2) <= float(Gn[i0, i0]):
            S, wS, w = S2, wS2, w2
    # Wolfe's major cycles, run until the per-task KKT condition holds (it implies the absolute
    # one); only the certificate asked for (absolute by default) is required of the result
    it = 0
    best, stalls = np.inf, 0
    certified: tuple[float, float, float] | None = None  # gaps(w), when the loop stopped on a certified w
    for it in range(1, max_iter + 1):  # noqa: B007 - `it` is reported
        grad = Gn @ w
        x2 = float(w @ grad)
        # Wolfe's ‖x‖² decreases strictly every major cycle; in floating point it can stall or cycle
        # among degenerate supports: after 3 cycles without decrease, stop and certify below
        stalls = stalls + 1 if x2 >= best else 0
        if stalls > 3:
            break
        best = min(best, x2)
        scale = norms * float(norms @ w)
        viol = (x2 - grad) / np.where(scale > 0, scale, 1.0)
        j = int(np.argmax(viol))
        if viol[j] <= tol:
            # gaps(w) from this cycle's own products (the same arithmetic on the same w)
            certified = (x2, max(0.0, float(np.max(x2 - grad))), max(0.0, float(viol[j])))
            break
        if w[j] > 0.0:  # no progress possible in floating point: stop and certify below
            break
        S = np.append(S, j)
        wS = np.append(wS, 0.0)
        v = affine(S)
        if np.all(v > pos_eps):
            wS = v
        else:
            wS, S = _minor_cycles(S, wS, v, affine, pos_eps, T)
        w_next = np.zeros(T)
        w_next[S] = wS
        if not relative and gaps(w)[1] <= tol < gaps(w_next)[1]:
            break  # never trade a met absolute certificate for the pursuit of the per-task one
        w = w_next
    x2, gap_abs, gap_task = certified if certified is not None else gaps(w)
    gap = gap_task if relative else gap_abs
    if gap > 1e3 * tol and not _psd:
        # Wolfe's algorithm assumes a PSD G; a Gramian computed in float32 (or with cancellation) can
        # have eigenvalues down to about −1e-7·max G_tt (opposite or duplicated tasks). Solve for its
        # PSD part (eigenvalues clipped at 0, a change within the Gramian's own round-off), reported
        # as ``clipped_eigenvalue``; a PSD G that still fails is an error below.
        lam, V = np.linalg.eigh(Gn)
        if lam[0] < 0.0:
            Gp = (V * np.maximum(lam, 0.0)) @ V.T
            r = min_norm_simplex(0.5 * (Gp + Gp.T) * s, tol, max_iter, tie_break, relative, strict, _psd=True)
            r.clipped_eigenvalue = float(-lam[0])
            return r
    if strict and gap > 1e3 * tol:
        raise SolverError(
            f"min_norm_simplex: not converged: Wolfe's algorithm stopped after {it} major cycles with KKT gap "
            f"{gap:.3e} > {1e3 * tol:.0e} ({'per task' if relative else 'relative to max‖g‖²'}) on a positive "
            f"semi-definite Gramian with diagonal {np.diag(G).tolist()}. Please report this Gramian."
        )
    if tie_break:
        for wt in (_min_norm_weights(Gn, w, x2, tol, S, norms, full_independent), _share_among_copies(Gn, w)):
            if wt is w:
                continue
            x2t, gap_abs_t, gap_task_t = gaps(wt)
            # the tie-break must keep the point (value and both certificates) to round-off
            if x2t <= x2 + tol * float(norms @ w) ** 2 and gap_abs_t <= max(gap_abs, tol) \
                    and gap_task_t <= max(gap_task, tol):
                w, x2, gap_abs, gap_task = wt, x2t, gap_abs_t, gap_task_t
    return MinNormResult(w, x2 * s, it, gap_task if relative else gap_abs, gap_task)


def _minor_cycles(S: np.ndarray, wS: np.ndarray, v: np.ndarray, affine: Callable[[np.ndarray], np.ndarray],
                  pos_eps: float, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Wolfe's minor cycles: from the feasible ``wS`` (on support ``S``) towards the affine minimiser
    ``v`` of ``S`` until an entry reaches 0, drop it, repeat until the affine minimiser lies inside
    the simplex. Each cycle drops at least one index (the blocking one is set to exactly 0, so a
    round-off remainder cannot keep it), so at most ``|S|`` cycles."""
    for _ in range(T + 5):
        if np.all(v > pos_eps):
            return v, S
        neg = np.flatnonzero(v <= pos_eps)
        denom = wS[neg] - v[neg]
        ok = denom > 0
        ratios = np.where(ok, wS[neg] / np.where(ok, denom, 1.0), np.inf)
        b = int(np.argmin(ratios))
        theta = min(max(float(ratios[b]), 0.0), 1.0) if np.isfinite(ratios[b]) else 0.0
        wS = wS + theta * (v - wS)
        wS[neg[b]] = 0.0
        keep = wS > pos_eps
        if not np.any(keep):  # cannot happen for a convex combination; be loud if it does
            raise SolverError("min_norm_simplex: Wolfe's minor cycle emptied the support")
        S = S[keep]
        wS = wS[keep]
        wS = wS / wS.sum()
        v = affine(S)
    return wS, S


def _clearly_independent(GS: np.ndarray) -> bool:
    """The points of the (normalised) Gramian ``GS`` are affinely independent with margin: the
    lifted Gramian ``GS + c·11ᵀ`` (``c = min diag``), scaled to a unit diagonal, has a Cholesky
    factor whose smallest pivot² is above ``1e-10``. Then the optimal weights on them are unique and
    the SVD of the tie-break is not needed (its null-space threshold is ~1e-13)."""
    c = float(GS.diagonal().min())
    if not c > 0.0:
        return False
    M = GS + c
    d = 1.0 / np.sqrt(M.diagonal())
    fac, _, info = _dposv(M * np.outer(d, d), np.ones(GS.shape[0]), lower=0)
    return info == 0 and float(np.min(np.abs(fac.diagonal()))) ** 2 > 1e-10


def _share_among_copies(Gn: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``w`` with the weight of every group of duplicated tasks shared equally among the copies.

    Copies are tasks whose gradients coincide to the Gramian's round-off,
    ``‖g_i − g_j‖² = G_ii + G_jj − 2G_ij ≤ 1e-12·(G_ii + G_jj)``; any optimal ``w`` averaged over them
    is optimal with a smaller ``‖w‖`` (the caller keeps the result only if the value and the KKT
    certificates hold). The SVD tie-break alone cannot promise this when the optimal set meets the
    simplex's boundary; this makes duplicated tasks get equal weights (permutation equivariance)."""
    d = Gn.diagonal()
    D2 = d[:, None] + d[None, :] - 2.0 * Gn
    close = 1e-12 * (d[:, None] + d[None, :]) >= D2
    if int(close.sum()) == Gn.shape[0]:  # only the diagonal
        return w
    rep = np.argmax(close, axis=1)  # the first task each one coincides with
    counts = np.bincount(rep, minlength=Gn.shape[0])
    share = np.bincount(rep, weights=w, minlength=Gn.shape[0])
    return share[rep] / counts[rep]


def _min_norm_weights(Gn: np.ndarray, w: np.ndarray, x2: float, tol: float,
                      support: np.ndarray | None = None, norms: np.ndarray | None = None,
                      full_independent: bool | None = None) -> np.ndarray:
    """Among the optimal weights (same min-norm point), move towards the one of least ‖w‖.

    The optimal set is ``{w ≥ 0, Σw = 1, G w = G w*}`` restricted to the active tasks
    ``{i : (Gw*)_i = w*ᵀGw*}``. We take the minimum-norm point of its affine hull; when that
    point has a negative entry we stop on the segment from ``w*`` where the first entry reaches
    0 (still optimal: the optimal set is convex). When the active tasks are Wolfe's final
    ``support`` and clearly affinely independent, the optimal weights are unique: returned as is.
    With ``norms`` (the task-gradient norms) a task is active when its KKT condition is tight on its
    own scale, ``(Gw)_i ≤ wᵀGw + 10·tol·‖g_i‖·Σ_k w_k‖g_k‖``, else to ``10·tol`` absolute.
    ``full_independent``: :func:`_clearly_independent` of the whole ``Gn`` when the caller already
    knows it (read off the Cholesky factor of its start), used when every task is active."""
    T = Gn.shape[0]
    grad = Gn @ w
    slack = 10 * tol * (norms * float(norms @ w) if norms is not None else 1.0)
    active = np.flatnonzero(grad <= x2 + slack)
    if active.size <= 1:
        return w
    if support is not None and active.size <= support.size:
        in_support = np.zeros(T, dtype=bool)
        in_support[support] = True
        if in_support[active].all():
            if active.size == T and full_independent is not None:
                independent = full_independent  # the same matrix, already factored
            else:
                independent = _clearly_independent(Gn[active[:, None], active])
            if independent:
                return w
    A = np.vstack([np.ones((1, active.size)), Gn[:, active]])
    # null space of A (directions that keep Σw and Gw, hence the update, unchanged)
    _, sv, Vt = np.linalg.svd(A)
    rank = int(np.sum(sv > max(A.shape) * 1e-13 * max(sv[0], 1.0)))
    N = Vt[rank:].T
    if N.shape[1] == 0:
        return w
    wa = w[active]
    target = wa - N @ (N.T @ wa)
    d = target - wa
    if np.max(np.abs(d)) <= 1e-15:
        return w
    neg = d < 0
    theta = 1.0
    if np.any(neg):
        theta = min(1.0, float(np.min(wa[neg] / -d[neg])))
    out = np.zeros(T)
    out[active] = np.clip(wa + theta * d, 0.0, None)
    out /= out.sum()
    # guard: the tie-break must not change the min-norm value
    if float(out @ Gn @ out) > x2 + 10 * tol:
        return w
    return out


# ---------------------------------------------------------------------------------------------
# The positive solution of G x = p ⊙ x^{-1/α} (FairGrad, Nash-MTL for α = 1, PIVRG/ConsMTL), exact.
# ---------------------------------------------------------------------------------------------

FAIR_RTOL = 1e-9
"""Certificate of :func:`solve_fair_system`: componentwise backward error of ``G x = p ⊙ x^{-1/α}``,
``max_t |(Gx)_t − p_t x_t^{-1/α}| / ((|G| x)_t + p_t x_t^{-1/α}) ≤ FAIR_RTOL``."""

INFEASIBLE_MIN_NORM = 1e-14
"""Squared distance from 0 to the convex hull of the UNIT task gradients below which 0 counts as in the
hull (to working precision): then no direction improves every task and the system has no positive
solution. Two gradients at 180° − 2e-7 rad are at this threshold."""


@dataclass
class FairResult:
    """Solution of ``G x = p ⊙ x^{-1/α}``, ``x > 0``, and its certificate.

    Attributes:
        weights: ``x`` (T,); 0 for zero-gradient tasks (they cannot satisfy their equation).
        residual: componentwise backward error ``max_t |(Gx)_t − r_t| / ((|G| x)_t + r_t)``,
            ``r = p ⊙ x^{-1/α}``, over the live tasks: scale free (each task's equation relative to
            the size of its own terms), and ~1e-16 at the exact solution even where ``(Gx)_t`` is a
            difference of large terms (strongly conflicting tasks whose norms are far apart).
        iterations: Newton iterations.
        inactive: number of zero-gradient tasks left out.
    """

    weights: np.ndarray
    residual: float
    iterations: int
    inactive: int


def _fair_residual(C: np.ndarray, y: np.ndarray, q: np.ndarray, alpha: float, absC: np.ndarray | None = None) -> float:
    """Componentwise backward error ``max_t |(Cy)_t − r_t| / ((|C| y)_t + r_t)``, ``r = q ⊙ y^{-1/α}``
    (``absC``: ``|C|`` when the caller has it)."""
    rhs = q * np.power(y, -1.0 / alpha)
    return float(np.max(np.abs(C @ y - rhs) / ((np.abs(C) if absC is None else absC) @ y + rhs)))


def solve_fair_system(
    G: np.ndarray,
    alpha: float = 1.0,
    p: np.ndarray | None = None,
    *,
    rtol: float = FAIR_RTOL,
    max_iter: int = 100,
    method: str = "solve_fair_system",
) -> FairResult:
    """The positive ``x`` with ``G x = p ⊙ x^{-1/α}`` (α > 0, ``p > 0``; ``p = 1`` by default), certified.

    This is the optimality condition of FairGrad's α-fair allocation (Ban & Ji 2024, Eq. 4;
    ``p = 1``), of Nash-MTL's bargaining solution (Navon et al. 2022, ``Gα = 1/α``: α = 1, p = 1),
    and of the FairGrad-family weightings with task priorities ``p``.

    Method (ours, exact): the system is the stationarity condition ``∇f(x) = 0`` of the strictly
    convex ``f(x) = ½ xᵀGx − Σ_t p_t h(x_t)`` with ``h(x) = log x`` (α = 1) or
    ``x^{1−1/α}/(1−1/α)`` (``h′(x) = x^{-1/α}``, concave), so the positive solution is unique when
    it exists, and it exists iff 0 is not in the convex hull of the task gradients (Gordan: some
    direction improves every task; otherwise ``f`` decreases without bound along a null direction of
    G). It is found by damped Newton's method (Armijo backtracking, steps kept inside x > 0) on the
    diagonally scaled problem ``x_t = y_t/‖g_t‖``, ``C y = q ⊙ y^{-1/α}``, ``C`` the cosine matrix
    and ``q_t = p_t ‖g_t‖^{1/α − 1}``; Newton's iterates do not depend on the scaling (affine
    invariance) and the scaled Hessian is well conditioned, so gradients of norm 1e-10 and 1e10, or
    tasks 1e12 apart, solve alike. Start: the solution for orthogonal gradients,
    ``y_t = q_t^{α/(1+α)}``. Each Newton system: one LAPACK ``dposv`` (Cholesky factor and its two
    triangular solves) on the unit-diagonal scaled Hessian; least squares where that factor does not exist
    to working precision.

    Certificate: the componentwise backward error ``max_t |(Gx)_t − r_t| / ((|G| x)_t + r_t) ≤ rtol``
    with ``r = p ⊙ x^{-1/α}`` — ``x`` solves the system exactly for a Gramian whose entries are
    perturbed by at most ``rtol`` relative (a plain relative residual cannot be certified where
    ``(Gx)_t`` cancels: two strongly conflicting tasks 1e10 apart in norm).
    Zero-gradient tasks (``‖g_t‖² ≤ ZERO_REL · max‖g‖²``, :data:`mtlens.engine.numerics.ZERO_REL`,
    or exactly 0) cannot satisfy their equation (``0 = p_t x_t^{-1/α}``): they get ``x_t = 0`` and
    the others are solved among themselves. All-zero G: ``x = 1``.

    Raises:
        SolverError: either *infeasible* — 0 is in the convex hull of the (unit) task gradients to
            working precision (squared distance ≤ :data:`INFEASIBLE_MIN_NORM`), so no positive
            solution exists — or *not converged* — a solution exists but Newton's method did not
            certify it within ``max_iter`` iterations; the message says which, with the numbers.
    """
    G = np.asarray(G, dtype=np.float64)
    T = G.shape[0]
    p = np.ones(T) if p is None else np.asarray(p, dtype=np.float64).reshape(-1)
    if p.shape[0] != T or not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ShapeError(f"{method}: task priorities p must be {T} finite positive numbers, got {p.tolist()}")
    live = nonzero_tasks(G)
    k = int(live.sum())
    x = np.zeros(T)
    if k == 0:
        return FairResult(np.ones(T), 0.0, 0, T)
    C, d = cosine_matrix(G, live)
    a = float(alpha)
    q = p[live] * np.power(d, 1.0 / a - 1.0)
    if not np.all(np.isfinite(q)) or np.any(q <= 0):
        raise SolverError(f"{method}: the scaled priorities overflow (gradient norms {d.tolist()}, alpha {a})")

    mn = min_norm_simplex(C).value if k > 1 else 1.0
    if mn <= INFEASIBLE_MIN_NORM:
        # checked first: near such a problem a Newton iterate can look certified while diverging
        # along the null direction (a perturbation of G by round-off would make it solvable)
        raise SolverError(
            f"{method}: infeasible: no positive solution of G w = w^(-1/alpha) exists. 0 is in the convex "
            f"hull of the task gradients (squared distance {mn:.2e} of 0 to the hull of the unit gradients), "
            "so no direction improves every task (e.g. opposite gradients, or more conflicting tasks than "
            "the rank of J): a Pareto-stationary point. Use a method defined there (upgrad, mgda)."
        )

    def h(y):
        return np.log(y) if a == 1.0 else np.power(y, 1.0 - 1.0 / a) / (1.0 - 1.0 / a)

    def f(y):
        """``(f(y), yᵀCy, qᵀh(y))``: the value and its two terms (the terms give f's round-off)."""
        quad, lin = float(y @ C @ y), float(q @ h(y))
        return 0.5 * quad - lin, quad, lin

    absC = np.abs(C)
    inv_a = -1.0 / a

    def residual(y):
        """``(_fair_residual, r, Cy)`` with ``r = q ⊙ y^{-1/α}`` (Newton's next step needs both)."""
        rhs = q * np.power(y, inv_a)
        Cy = C @ y
        return float(np.max(np.abs(Cy - rhs) / (absC @ y + rhs))), rhs, Cy

    y = np.power(q, a / (1.0 + a))
    fy, quad, lin = f(y)
    it = 0
    res, rhs, Cy = residual(y)
    best = (res, y)
    eps = float(np.finfo(np.float64).eps)
    diagonal = np.arange(k) * (k + 1)  # flat indices of a k×k matrix's diagonal
    for it in range(1, max_iter + 1):  # noqa: B007 - reported
        if res <= 1e-14:  # round-off level: Newton cannot do better
            break
        grad = Cy - rhs
        H = C.copy()
        H.flat[diagonal] += rhs / (a * y)  # C + diag(r / (α y))
        s = 1.0 / np.sqrt(H.diagonal())
        Hs = H * (s[:, None] * s)
        _, z, info = _dposv(Hs, s * grad, lower=1)  # Cholesky factor and its two triangular solves
        if info < 0:
            raise SolverError(f"{method}: LAPACK dposv rejected its argument {-info} (a bug: please report it)")
        # info > 0: Hs not positive definite to working precision (a nearly singular C at tiny rhs)
        step = -s * (z if info == 0 else np.linalg.lstsq(Hs, s * grad, rcond=None)[0])
        slope = float(grad @ step)
        if not np.isfinite(step).all() or slope >= 0:
            break
        t = 1.0
        neg = step < 0
        if neg.any():
            t = min(1.0, 0.99 * float((-y[neg] / step[neg]).min()))
        newton_decrement = -slope  # λ² (affine invariant)
        # f's round-off: once λ²/2 (the predicted decrease) is below it, Armijo cannot be tested;
        # Newton is then in its quadratic region and takes the (boundary-limited) step
        f_noise = 1e4 * eps * (0.5 * abs(quad) + abs(lin))
        while True:
            yn = y + t * step
            if (yn > 0).all():
                fn, quad_n, lin_n = f(yn)
                if newton_decrement <= f_noise or fn <= fy + 1e-4 * t * slope:
                    break
            t *= 0.5
            if t < 1e-20:
                break
        if t < 1e-20:
            break
        y, fy, quad, lin = yn, fn, quad_n, lin_n  # the backtracking loop left only after computing f(yn)
        res, rhs, Cy = residual(y)
        if res < best[0]:
            best = (res, y)
        elif best[0] <= rtol and newton_decrement <= f_noise:
            break  # stagnation at round-off after certification
    res, y = best
    if not (res <= rtol) or not np.all(np.isfinite(y)) or np.any(C @ y <= 0):
        raise SolverError(
            f"{method}: not converged: a positive solution of G w = w^(-1/alpha) exists (squared distance "
            f"{mn:.2e} of 0 to the hull of the unit gradients) but Newton's method stopped after {it} "
            f"iterations with relative residual {res:.2e} > {rtol:.0e}; gradient norms {d.tolist()}. "
            "Please report this Gramian."
        )
    x[live] = y / d
    if not np.all(np.isfinite(x)):
        raise SolverError(f"{method}: the weights overflow after rescaling by the gradient norms {d.tolist()}")
    return FairResult(x, res, it, T - k)
