"""CAGrad: conflict-averse gradient descent (maximise the worst task improvement near g0)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy.optimize import minimize, nnls
from torch import Tensor

from ..engine.protocols import SCALE_FREE, SYMMETRIC, GramianWeighting
from ..errors import ConfigurationError, SolverError
from ._registry import register
from ._solvers import check_gramian, gramian_scale, min_norm_simplex, nonzero_tasks, psd_eigh, to_weights
from ._utils import check

RESCALES = (0, 1, 2)
_SMOOTH = 1e-24  # added to ‖g_w‖² (relative to max‖g‖²) so the objective is differentiable at 0
_STATIONARY = 1e-7  # ‖g_w‖ relative to max‖g‖ (or to Σ w_i‖g_i‖, see _cancelled) taken as 0


def _cancelled(Gn: np.ndarray, x: np.ndarray) -> bool:
    """Whether the certified dual point's ``g_w = Σ x_i g_i`` is zero up to rounding, measured
    against the gradients it combines: ``‖g_w‖ ≤ _STATIONARY · Σ x_i ‖g_i‖``.

    Not against ``max‖g‖``: with norms 1e9 apart the optimum can sit on the small gradients,
    where ``‖g_w‖`` is tiny in absolute terms and still exact (e.g. two orthogonal gradients of
    norms 1e9 and 1: ``g_w ≈ g_2``)."""
    scale = float(x @ np.sqrt(np.clip(np.diag(Gn), 0.0, None)))
    return not float(x @ Gn @ x) > (_STATIONARY * scale) ** 2
_GAP_RTOL = 1e-8  # duality gap accepted as optimal, relative to ‖g_w‖‖d‖ (plus its round-off bound)


@register
class CAGrad(GramianWeighting):
    """CAGrad: ``d = g0 + (√φ/‖g_w‖) g_w`` with ``w`` solving the paper's dual on the simplex.

    Reference: Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task
    Learning", NeurIPS 2021, arXiv:2110.14048 (Algorithm 1).

    With ``g0`` the average gradient and ``φ = c²‖g0‖²``, the primal
    ``max_d min_i g_iᵀd  s.t. ‖d − g0‖ ≤ c‖g0‖`` is solved through its dual
    ``min_{w ∈ Δ} g_wᵀg0 + √φ ‖g_w‖`` (``g_w = Σ w_i g_i``), here with
    ``scipy.optimize.minimize`` (SLSQP, analytic gradient, as in the official code) on the
    Gramian scaled to unit max diagonal (the optimal w is scale invariant; the official code's
    ``+1e-8`` terms, which make it scale dependent, are replaced by a relative 1e-24), then
    refined by active-set Newton steps on the KKT system (SLSQP alone stops at ~√ftol) and
    certified by its Frank–Wolfe gap (≤ 1e-8 relative; otherwise the non-smooth case below is
    checked, and failing both raises :class:`SolverError`). Works for any number of tasks (the
    official NYUv2 code hard-codes 3).

    The update ``d = g0 + (√φ/‖g_w‖) g_w`` is returned as weights on the task gradients:
    ``w_t = T (1/T + λ w*_t) / r`` with ``λ = √φ/‖g_w‖``: the factor T is the official code's
    ``overwrite_grad`` "to match the sum loss" (so the scale is comparable to EW = Σ L_t), and
    ``r`` is the rescale divisor. If ``g_w = 0`` is dual optimal (0 in the convex hull of the
    gradients: a Pareto-stationary point) the formula is undefined; the primal optima are then
    the ``d`` of the ball with ``J d ≥ 0``, and the one closest to ``g0`` (the projection of g0
    onto that cone, an NNLS on the Gramian) is returned and logged as ``stationary=1``. If
    ``g0 = 0`` the update is 0. Zero task gradients are left out of the worst case ``min_i``
    (their improvement ``g_i·d`` is 0 for every d, which would make the primal degenerate);
    they still count in ``g0`` (the mean over all T tasks).

    Args:
        c: radius factor c ≥ 0 (c = 0 is plain gradient descent on the mean loss). Default 0.5
            (official code / LibMTL default); c = 0.4 is the value for NYUv2 (paper, project spec).
        rescale: 0 → ``d``; 1 → ``d/(1+c²)`` (default, official code); 2 → ``d/(1+c)``.
    """

    name = "cagrad"
    reference = ("Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021, "
                 "arXiv:2110.14048")
    defaults_source = ("c=0.5, rescale=1 (official code cagrad(alpha=0.5, rescale=1)); "
                       "c=0.4 for NYUv2 in the paper")

    claims = {
        "permutation_invariant": SYMMETRIC,
        "homogeneous": SCALE_FREE,
    }
    solver_rtol = 1e-5  # SLSQP on the dual (its stopping tolerance)

    def __init__(self, c: float = 0.5, rescale: int = 1) -> None:
        check(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0,
              f"cagrad: c must be a finite number ≥ 0, got {c!r}")
        if isinstance(rescale, bool) or rescale not in RESCALES:
            raise ConfigurationError(f"cagrad: rescale={rescale!r}; choose one of {RESCALES} "
                                     "(0: none, 1: divide by 1+c², 2: divide by 1+c)")
        self.c = float(c)
        self.rescale = int(rescale)
        self._log: dict[str, float] = {}

    def _divisor(self) -> float:
        return (1.0, 1.0 + self.c**2, 1.0 + self.c)[self.rescale]

    def solve_dual(
        self, Gn: np.ndarray, a: np.ndarray, sqrt_phi: float, g0_sq: float
    ) -> tuple[np.ndarray | None, dict[str, float]]:
        """``argmin_{w ∈ Δ} wᵀa + √φ·sqrt(wᵀGn w)`` (``a_i = g_i·g0``, ``Gn`` unit-scaled).

        Returns ``(w, info)``; ``w`` is ``None`` when the smooth optimality certificate fails
        (the optimum may be the non-differentiable point ``g_w = 0``)."""
        T = Gn.shape[0]

        def f(x):
            return float(x @ a + sqrt_phi * math.sqrt(max(float(x @ Gn @ x), 0.0) + _SMOOTH))

        def jac(x):
            gx = Gn @ x
            return a + sqrt_phi * gx / math.sqrt(max(float(x @ gx), 0.0) + _SMOOTH)

        x0 = np.full(T, 1.0 / T)
        # Σx = 1 (scipy-stubs type these dicts with a private TypedDict, hence Any)
        simplex: Any = [{"type": "eq", "fun": lambda x: 1.0 - x.sum(), "jac": lambda x: -np.ones_like(x)}]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = minimize(
                f, x0, jac=jac, method="SLSQP", bounds=[(0.0, 1.0)] * T,
                constraints=simplex,
                options={"ftol": 1e-14, "maxiter": 1000},
            )
        x = np.clip(np.asarray(res.x, dtype=np.float64), 0.0, None)
        if not np.all(np.isfinite(x)) or x.sum() <= 0:
            raise SolverError(f"cagrad: SLSQP returned {res.x!r} ({res.message})")
        x = x / x.sum()
        x = self._polish(Gn, a, sqrt_phi, x)
        rel, ok = self.certificate(Gn, a, sqrt_phi, x, g0_sq)
        info = {"solver_iterations": float(res.nit), "dual_gap": rel, "exact_path": 0.0}
        if ok and not _cancelled(Gn, x):
            return x, info
        return None, info

    @staticmethod
    def certificate(Gn: np.ndarray, a: np.ndarray, sqrt_phi: float, x: np.ndarray, g0_sq: float) -> tuple[float, bool]:
        """Relative duality gap of the dual point ``x`` and whether it certifies optimality.

        With ``λ = √φ/‖g_w‖`` and ``d = g0 + λ g_w`` (feasible for the primal: ``‖d − g0‖ = √φ``),
        the gap between the dual value ``g_wᵀd`` and the primal value ``min_i g_iᵀd`` is
        ``Σ_i x_i g_iᵀd − min_i g_iᵀd ≥ 0`` (the Frank–Wolfe gap). It is compared with
        ``_GAP_RTOL · ‖g_w‖‖d‖`` (scale free: task gradients 1e-10 or 1e10, or 1e8 apart, alike) plus
        the round-off bound of computing ``g_iᵀd`` from the Gramian. Returns ``(gap/(‖g_w‖‖d‖), ok)``."""
        T = Gn.shape[0]
        q = float(x @ Gn @ x)
        if not q > 0.0:
            return float("inf"), False
        gw = math.sqrt(q)
        lam = sqrt_phi / gw
        Jd = a + lam * (Gn @ x)  # g_i·d
        gap = max(float(x @ Jd - Jd.min()), 0.0)
        dnorm = math.sqrt(max(g0_sq + 2 * lam * float(x @ a) + lam**2 * q, 0.0))  # ‖d‖
        noise = 64 * T * np.finfo(np.float64).eps * float(np.max(np.abs(a) + lam * (np.abs(Gn) @ x)))
        scale = gw * dnorm
        rel = gap / scale if scale > 0 else float("inf")
        return rel, bool(gap <= _GAP_RTOL * scale + noise)

    @staticmethod
    def solve_dual_exact(Gn: np.ndarray, a: np.ndarray, sqrt_phi: float, g0_sq: float) -> np.ndarray | None:
        """The dual optimum by a one-dimensional root search over exact min-norm problems (ours).

        ``‖g_w‖ = min_{τ>0} ‖g_w‖²/(2τ) + τ/2``, so the dual is ``min_τ min_w aᵀw + (√φ/2τ)‖g_w‖² +
        √φτ/2``; for a fixed τ the inner problem is the min-norm point of the hull of the shifted
        gradients ``g_i + (τ/√φ) g0`` (their Gramian is ``G + s(a1ᵀ + 1aᵀ) + s²‖g0‖²``, s = τ/√φ,
        using ``Σ w = 1``), solved exactly by :func:`min_norm_simplex`; the outer function is convex in
        τ with its minimum where ``τ = ‖g_w(τ)‖``, found by Brent's method on ``log‖g_w(τ)‖ − log τ``
        (decreasing). Returns ``None`` when ``‖g_w(τ)‖ < τ`` down to τ = 1e-100 (``g_w = 0`` optimal).
        ``a_i = g_i·g0`` and ``g0_sq = ‖g0‖²`` (in ``Gn``'s units)."""
        from scipy.optimize import brentq

        rho = sqrt_phi

        def w_of(tau: float, g0sq: float) -> np.ndarray:
            s_ = tau / rho
            Gp = Gn + s_ * (a[:, None] + a[None, :]) + s_ * s_ * g0sq
            return min_norm_simplex(0.5 * (Gp + Gp.T), tol=1e-13, tie_break=False, relative=True,
                                    strict=False).weights

        g0sq = g0_sq
        tiny = 1e-300

        def psi(lt: float) -> float:
            w = w_of(math.exp(lt), g0sq)
            return 0.5 * math.log(max(float(w @ Gn @ w), tiny)) - lt

        hi = 0.5 * math.log(max(float(np.max(np.diag(Gn))), tiny)) + 1e-9  # τ ≥ max‖g_i‖ ≥ ‖g_w‖: ψ ≤ 0
        lo = hi - math.log(10.0)
        while psi(lo) <= 0.0:
            lo -= math.log(10.0) * 2
            if lo < math.log(1e-100):
                return None
        if psi(hi) > 0.0:
            hi += math.log(10.0)
        root = brentq(psi, lo, hi, xtol=1e-14, rtol=8 * np.finfo(np.float64).eps, maxiter=200)
        return w_of(math.exp(root), g0sq)

    @staticmethod
    def _polish(Gn: np.ndarray, a: np.ndarray, rho: float, x: np.ndarray) -> np.ndarray:
        """Active-set Newton refinement of SLSQP's point (SLSQP stops at ~√ftol in x).

        On the support S the KKT system ``∇f_S = ν 1, Σ x_S = 1`` is solved by Newton steps
        (the objective is smooth where ``g_w ≠ 0``); indices leave S when they reach 0 and
        enter S when ``∇f_i < ν``. Returns the input unchanged when it cannot improve it."""
        T = Gn.shape[0]
        if T == 1:
            return x

        def fval(z):
            return float(z @ a + rho * math.sqrt(max(float(z @ Gn @ z), 0.0)))

        best = x.copy()
        S = x > 1e-12
        for _ in range(30):
            q = float(x @ Gn @ x)
            if q <= 1e-24:
                break
            gx = Gn @ x
            grad = a + rho * gx / math.sqrt(q)
            idx = np.flatnonzero(S)
            nu = float(np.mean(grad[idx]))
            out = np.flatnonzero(~S)
            if out.size and float(np.min(grad[out])) < nu - 1e-14:
                S[out[np.argmin(grad[out])]] = True
                idx = np.flatnonzero(S)
            H = rho * (Gn / math.sqrt(q) - np.outer(gx, gx) / q**1.5)
            k = idx.size
            K = np.zeros((k + 1, k + 1))
            K[:k, :k] = H[np.ix_(idx, idx)]
            K[:k, k] = -1.0
            K[k, :k] = 1.0
            rhs = np.append(-grad[idx], 1.0 - x[idx].sum())  # H dx − ν 1 = −∇f_S,  Σ dx = 1 − Σ x
            step = np.linalg.lstsq(K, rhs, rcond=None)[0]
            dx = step[:k]
            xn = x.copy()
            t = 1.0
            neg = dx < 0
            if np.any(neg):
                t = min(1.0, float(np.min(-x[idx][neg] / dx[neg])))
            xn[idx] = np.clip(x[idx] + t * dx, 0.0, None)
            if xn.sum() <= 0:
                break
            xn /= xn.sum()
            S = xn > 1e-15
            if fval(xn) <= fval(best) + 1e-16:
                best = xn.copy()
            if np.max(np.abs(xn - x)) < 1e-16:
                x = xn
                break
            x = xn
        return best

    def _stationary_direction(self, Gn: np.ndarray, idx: np.ndarray, sqrt_phi: float) -> np.ndarray | None:
        """Extra weights μ (on the tasks ``idx``) of a primal optimum when ``g_w = 0`` is dual optimal.

        ``g_w = 0`` is dual optimal (value 0) iff 0 lies in the convex hull and some ``d`` in the
        ball ``‖d − g0‖ ≤ √φ`` has ``g_i·d ≥ 0`` for the tasks ``idx``; such a d attains the
        primal value 0, which certifies both. We take the one closest to ``g0``: the projection
        of ``g0`` onto that cone, ``d = g0 + Σ_i μ_i g_i`` with ``μ = argmin_{μ ≥ 0} ‖R b + R_idx μ‖``
        (NNLS, ``Gn = RᵀR``). Returns ``None`` when this certificate does not hold."""
        T = Gn.shape[0]
        Gs = Gn[np.ix_(idx, idx)]
        if min_norm_simplex(Gs).value > _STATIONARY**2:
            return None
        lam, V = psd_eigh(Gn)
        R = np.sqrt(lam)[:, None] * V.T
        b = np.full(T, 1.0 / T)
        mu = nnls(R[:, idx], -R @ b, maxiter=50 * T + 100)[0]
        v = b.copy()
        v[idx] += mu
        dist2 = float(mu @ Gs @ mu)
        if dist2 > sqrt_phi**2 * (1 + 1e-9) + 1e-14 or float(np.min((Gn @ v)[idx])) < -1e-10:
            return None
        return mu

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        G, _ = check_gramian(gramian, losses, self.name)
        T = G.shape[0]
        s = gramian_scale(G)
        div = self._divisor()
        if s <= 0.0:
            self._log = {"lambda": 0.0, "stationary": 1.0}
            return to_weights(np.full(T, 1.0 / div), gramian)
        Gn = G / s
        g0_sq = max(float(Gn.sum()) / (T * T), 0.0)
        sqrt_phi = self.c * math.sqrt(g0_sq)
        if sqrt_phi <= 0.0:  # c = 0 or g0 = 0: d = g0
            self._log = {"lambda": 0.0, "stationary": float(g0_sq <= 0.0)}
            return to_weights(np.full(T, 1.0 / div), gramian)
        idx = np.flatnonzero(nonzero_tasks(G))  # zero gradients leave the worst case (see docstring)
        a = (Gn @ np.full(T, 1.0 / T))[idx]
        Gs = Gn[np.ix_(idx, idx)]
        x, info = self.solve_dual(Gs, a, sqrt_phi, g0_sq)
        if x is None:  # not certified: the exact (slower) route
            xe = self.solve_dual_exact(Gs, a, sqrt_phi, g0_sq)
            if xe is not None:
                rel, ok = self.certificate(Gs, a, sqrt_phi, xe, g0_sq)
                info = {**info, "dual_gap": rel, "exact_path": 1.0}
                if ok and not _cancelled(Gs, xe):
                    x = xe
        w = np.ones(T)
        if x is not None:
            lam = sqrt_phi / math.sqrt(float(x @ Gs @ x))
            w[idx] += T * lam * x
            self._log = {"lambda": lam, "stationary": 0.0, **info}
            return to_weights(w / div, gramian)
        mu = self._stationary_direction(Gn, idx, sqrt_phi)
        if mu is None:
            gap = info["dual_gap"]
            why = (f"the best dual point has a relative duality gap {gap:.2e} > {_GAP_RTOL:.0e}"
                   if not gap <= _GAP_RTOL else
                   f"the dual point is optimal to a relative gap {gap:.2e}, but its g_w is below the stationarity "
                   f"threshold ({_STATIONARY:.0e} of the largest gradient norm), where the update's direction is "
                   "rounding noise")
            raise SolverError(
                f"cagrad: not converged: {why}, and g_w = 0 (a Pareto-stationary point) could not be certified "
                f"optimal either; task gradient norms {np.sqrt(np.clip(np.diag(G), 0, None)).tolist()} (CAGrad is "
                "certified for norm spreads up to 1e4, docs/reliability.md; rescale the task losses to bring "
                "their gradient norms closer). Please report this Gramian."
            )
        w[idx] += T * mu
        self._log = {"lambda": 0.0, "stationary": 1.0, **info}
        return to_weights(w / div, gramian)

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
