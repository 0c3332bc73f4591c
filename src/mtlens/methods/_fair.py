"""Helpers shared by the FairGrad-family weightings (PIVRG, ConsMTL) and by NTKMTL.

* :func:`solve_power_system`: the positive solution ``x`` of ``G x = p ⊙ x^{-1/α}``, certified
  (:func:`~mtlens.methods._solvers.solve_fair_system`; the authors' ``least_squares`` only for
  infeasible problems on request).
* :func:`clip_update`: the authors' ``x T`` scaling ("to match the sum loss") and the clipping of
  the shared update's norm ``√(wᵀGw)`` at ``max_norm``, written on the weights.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import SolverError
from ._solvers import FAIR_RTOL, nonzero_tasks, solve_fair_system
from ._utils import check

INFEASIBLE = ("raise", "least_squares")


def check_max_norm(max_norm: float, method: str) -> float:
    check(isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool) and math.isfinite(max_norm)
          and max_norm >= 0, f"{method}: max_norm must be a finite number ≥ 0 (0 disables), got {max_norm!r}")
    return float(max_norm)


def check_infeasible(infeasible: str, method: str) -> str:
    check(infeasible in INFEASIBLE, f"{method}: infeasible={infeasible!r}; choose one of {INFEASIBLE}")
    return infeasible


def solve_power_system(G: np.ndarray, p: np.ndarray, alpha: float, *, method: str, infeasible: str = "raise",
                       max_nfev: int = 200, residual_tol: float = FAIR_RTOL) -> tuple[np.ndarray, dict[str, float]]:
    """Positive ``x`` (T,) with ``G x = p ⊙ x^{-1/α}`` (``p > 0``); returns ``(x, info)``.

    Solved and certified by :func:`~mtlens.methods._solvers.solve_fair_system` (damped Newton on
    the convex potential of the system, on the problem scaled by the gradient norms; componentwise
    backward error ≤ ``residual_tol``). The authors' code calls ``scipy.optimize.least_squares``
    from ``1/T``, which stops short on solvable but badly scaled problems (FairGrad: two tasks at
    150° with norms 1 and 1e4). Zero-gradient tasks have no solution (``0 = p_t x_t^{-1/α}``): they
    are left out and get 0 (``info["inactive_tasks"]``); an all-zero G gives ``x = 1``. When no
    positive solution exists (0 in the convex hull of the gradients: no direction improves every
    task) ``infeasible="raise"`` raises :class:`SolverError` saying "infeasible"; ``"least_squares"``
    returns the authors' bounded least-squares point (at most ``max_nfev`` evaluations, on the
    trace-normalised Gramian) and logs its residual. A solvable problem that is not certified
    raises :class:`SolverError` saying "not converged".
    """
    T = G.shape[0]
    try:
        r = solve_fair_system(G, alpha, p, rtol=residual_tol, method=method)
    except SolverError as exc:
        if infeasible == "raise" or "infeasible" not in str(exc):
            raise
    else:
        return r.weights, {"inactive_tasks": float(r.inactive), "residual": r.residual, "nfev": float(r.iterations)}
    from scipy.optimize import least_squares

    x = np.zeros(T)
    idx = np.flatnonzero(nonzero_tasks(G))
    Gl = G[np.ix_(idx, idx)]
    pl = p[idx]
    n = len(idx)
    s = float(np.trace(Gl)) / n
    Gt = Gl / s

    def residual(v: np.ndarray) -> np.ndarray:
        return Gt @ v - pl * np.power(v, -1.0 / alpha)

    res = least_squares(residual, np.full(n, 1.0 / n), bounds=(0.0, np.inf), max_nfev=max_nfev,
                        ftol=1e-12, xtol=1e-12, gtol=1e-12)
    v = res.x
    with np.errstate(divide="ignore"):
        target = pl * np.power(v, -1.0 / alpha)
    rel = float(np.linalg.norm(Gt @ v - target) / np.linalg.norm(target)) if np.isfinite(target).all() \
        else float("inf")
    x[idx] = v * s ** (-alpha / (1.0 + alpha))
    if not np.isfinite(x).all():
        raise SolverError(f"{method}: the least-squares point is not finite (residual {rel:.3g}); the problem is "
                          "infeasible: use upgrad or mgda")
    return x, {"inactive_tasks": float(T - n), "residual": rel, "nfev": float(res.nfev)}


def clip_update(w: np.ndarray, G: np.ndarray, max_norm: float) -> tuple[np.ndarray, dict[str, float]]:
    """``w`` rescaled so that ``‖Σ w_t g_t‖ = √(wᵀGw) ≤ max_norm`` (0: no clipping)."""
    norm = math.sqrt(max(float(w @ G @ w), 0.0))
    clipped = max_norm > 0 and norm > max_norm
    if clipped:
        w = w * (max_norm / norm)
    return w, {"update_norm": norm, "clipped": float(clipped)}
