"""Helpers shared by the FairGrad-family weightings (PIVRG, ConsMTL) and by NTKMTL.

* :func:`solve_power_system`: the positive solution ``x`` of ``G x = p ⊙ x^{-1/α}`` solved with
  ``scipy.optimize.least_squares`` (bounds ``x ≥ 0``, started at ``1/T``) as in the authors' code,
  on the trace-normalised Gramian so that 1e-10 and 1e10 gradients solve the same problem.
* :func:`clip_update`: the authors' ``x T`` scaling ("to match the sum loss") and the clipping of
  the shared update's norm ``√(wᵀGw)`` at ``max_norm``, written on the weights.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import SolverError
from ._utils import check

ZERO_REL = 1e-16  # ‖g_t‖² below ZERO_REL · max_s ‖g_s‖² counts as a zero gradient
INFEASIBLE = ("raise", "least_squares")


def check_max_norm(max_norm: float, method: str) -> float:
    check(isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool) and math.isfinite(max_norm)
          and max_norm >= 0, f"{method}: max_norm must be a finite number ≥ 0 (0 disables), got {max_norm!r}")
    return float(max_norm)


def check_infeasible(infeasible: str, method: str) -> str:
    check(infeasible in INFEASIBLE, f"{method}: infeasible={infeasible!r}; choose one of {INFEASIBLE}")
    return infeasible


def solve_power_system(G: np.ndarray, p: np.ndarray, alpha: float, *, method: str, infeasible: str = "raise",
                       max_nfev: int = 200, residual_tol: float = 1e-6) -> tuple[np.ndarray, dict[str, float]]:
    """Positive ``x`` (T,) with ``G x = p ⊙ x^{-1/α}`` (``p > 0``); returns ``(x, info)``.

    Zero-gradient tasks have no solution (``0 = p_t x_t^{-1/α}``): they are left out and get 0
    (``info["inactive_tasks"]``); an all-zero G gives ``x = 1``. The system is solved for
    ``G̃ = G / s`` (``s = trace / T``) and rescaled, ``x = x̃ · s^{-α/(1+α)}``. When no positive
    solution exists (no direction improves every task) the relative residual stays large:
    ``infeasible="raise"`` raises :class:`SolverError`, ``"least_squares"`` returns the bounded
    least-squares point as the authors' code does silently (the residual is logged).
    """
    from scipy.optimize import least_squares

    T = G.shape[0]
    sq = np.clip(np.diag(G), 0.0, None)
    x = np.zeros(T)
    if not sq.max() > 0.0:
        return np.ones(T), {"inactive_tasks": float(T), "residual": 0.0, "nfev": 0.0}
    idx = np.flatnonzero(sq > ZERO_REL * sq.max())
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
    info = {"inactive_tasks": float(T - n), "residual": rel, "nfev": float(res.nfev)}
    if not (rel <= residual_tol) and (infeasible == "raise" or not np.isfinite(v).all()):
        raise SolverError(
            f"{method}: no positive solution of G x = p·x^(-1/{alpha:g}) (relative residual {rel:.3g} after "
            f"{res.nfev} evaluations). It has none when no direction improves every task (e.g. exactly "
            "opposite gradients). Use a method defined for that case (upgrad, mgda), or pass "
            "infeasible='least_squares' to take the least-squares point as the authors' code does."
        )
    x[idx] = v * s ** (-alpha / (1.0 + alpha))
    if not np.isfinite(x).all():
        raise SolverError(f"{method}: non-finite weights after rescaling (scale {s:.3g})")
    return x, info


def clip_update(w: np.ndarray, G: np.ndarray, max_norm: float) -> tuple[np.ndarray, dict[str, float]]:
    """``w`` rescaled so that ``‖Σ w_t g_t‖ = √(wᵀGw) ≤ max_norm`` (0: no clipping)."""
    norm = math.sqrt(max(float(w @ G @ w), 0.0))
    clipped = max_norm > 0 and norm > max_norm
    if clipped:
        w = w * (max_norm / norm)
    return w, {"update_norm": norm, "clipped": float(clipped)}
