"""CAGrad: conflict-averse gradient descent (maximise the worst task improvement near g0)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq, nnls
from torch import Tensor

from ..engine.protocols import SCALE_FREE, SYMMETRIC, GramianWeighting
from ..errors import ConfigurationError, SolverError
from ._registry import register
from ._solvers import (
    INFEASIBLE_MIN_NORM,
    check_gramian,
    cosine_matrix,
    gramian_scale,
    min_norm_simplex,
    nonzero_tasks,
    to_weights,
)
from ._utils import check

RESCALES = (0, 1, 2)
_STATIONARY = 1e-7  # ‖g_w‖ relative to Σ w_i‖g_i‖ taken as 0 (see _cancelled)
_GAP_RTOL = 1e-8  # duality gap accepted as optimal, relative to ‖g_w‖‖d‖ (plus its round-off bound)
_EPS = float(np.finfo(np.float64).eps)
C_MIN = 64 * _EPS
"""Radii ``c ≤ C_MIN`` (1.4e-14) give ``d = g0``: the ball is at the rounding of g0."""
C_MAX = 1e150
"""Largest ``c`` accepted: ``1 + c²`` (the default rescale divisor) overflows float64 above ~1.3e154."""


def _cancelled(Gn: np.ndarray, x: np.ndarray) -> bool:
    """Whether the certified dual point's ``g_w = Σ x_i g_i`` is zero up to rounding, measured
    against the gradients it combines: ``‖g_w‖ ≤ _STATIONARY · Σ x_i ‖g_i‖`` (there ``‖g_w‖²``,
    computed from the Gramian, carries a relative round-off above 1e-2 and the update's length
    ``√φ/‖g_w‖`` is noise).

    Not against ``max‖g‖``: with norms 1e9 apart the optimum can sit on the small gradients,
    where ``‖g_w‖`` is tiny in absolute terms and still exact (e.g. two orthogonal gradients of
    norms 1e9 and 1: ``g_w ≈ g_2``)."""
    scale = float(x @ np.sqrt(np.clip(np.diag(Gn), 0.0, None)))
    return not float(x @ Gn @ x) > (_STATIONARY * scale) ** 2


@dataclass
class _ScaledPrimal:
    """CAGrad's primal on unit gradients, in units of ``unit = max(‖g0‖, √φ)`` (ours).

    With ``d = g0 + unit · Σ_i μ_i ĝ_i`` (``ĝ_i = g_i/n_i``, ``n_i = ‖g_i‖``) the constraint
    ``g_i·d ≥ t`` reads ``ĝ_i·z ≥ τ/n_i − b_i`` with ``z = Σ μ_i ĝ_i``, ``τ = t/unit`` and
    ``b_i = ĝ_i·g0/unit``; the ball is ``‖z‖ ≤ r = √φ/unit``. Every coefficient is O(1) whatever
    the spread of the norms ``n`` (only ``τ/n_i`` spans it, and only where it matters)."""

    n: np.ndarray  # gradient norms (Gramian units)
    C: np.ndarray  # cosine matrix, unit diagonal
    R: np.ndarray  # k×k factor, RᵀR = C (eigenvalues clamped at 0)
    b: np.ndarray
    r: float
    unit: float
    evaluations: int = 0

    @classmethod
    def build(cls, Gs: np.ndarray, a: np.ndarray, sqrt_phi: float, g0_sq: float) -> _ScaledPrimal:
        C, n = cosine_matrix(Gs)
        lam, V = np.linalg.eigh(C)
        R = np.sqrt(np.clip(lam, 0.0, None))[:, None] * V.T
        unit = max(math.sqrt(g0_sq), sqrt_phi)
        return cls(n=n, C=C, R=R, b=a / n / unit, r=sqrt_phi / unit, unit=unit)

    def project(self, tau: float) -> np.ndarray | None:
        """Multipliers μ ≥ 0 of the projection of g0 onto ``{d : g_i·d ≥ τ·unit ∀i}`` (z = Σ μ_i ĝ_i),
        or ``None`` when that polyhedron is empty (or farther than ~10(1 + r) from g0).

        Least-distance programming by NNLS (Lawson & Hanson, Solving Least Squares Problems, 1974,
        ch. 23): ``min ‖z‖ s.t. Rᵀz ≥ f`` has ``z = R u/(1 − fᵀu)`` with ``u`` the NNLS solution of
        ``[R; fᵀ] u ≈ e_{k+1}``; ``1 − fᵀu = ‖[R; fᵀ]u − e‖² = 1/(1 + ‖z‖²)`` is 0 iff infeasible.
        Finite and exact up to rounding."""
        self.evaluations += 1
        k = self.n.shape[0]
        f = tau / self.n - self.b
        A = np.vstack([self.R, f[None, :]])
        e = np.zeros(k + 1)
        e[k] = 1.0
        try:
            u, _ = nnls(A, e, maxiter=50 * k + 100)
        except RuntimeError as exc:  # iteration limit
            raise SolverError(f"cagrad: not converged: the NNLS of a least-distance sub-problem stopped ({exc}); "
                              f"task gradient norms {self.n.tolist()}. Please report this Gramian.") from exc
        den = 1.0 - float(f @ u)
        if not den > 0.01 / (1.0 + 100.0 * (1.0 + self.r) ** 2):  # ‖z‖ > 10(1 + r) or infeasible
            return None
        return u / den

    def excess(self, tau: float) -> float:
        """``dist(g0, {d : J d ≥ τ·unit}) − r`` in units (increasing in τ); 1 + r when farther or empty."""
        mu = self.project(tau)
        if mu is None:
            return 1.0 + self.r
        return math.sqrt(max(float(mu @ self.C @ mu), 0.0)) - self.r

    def weights(self, mu: np.ndarray) -> np.ndarray:
        """``v`` with ``d − g0 = Σ v_i g_i`` (Gramian units)."""
        return self.unit * mu / self.n

    def on_support(self, mu: np.ndarray) -> np.ndarray | None:
        """The optimum on the support S of ``mu`` in closed form, or ``None`` (singular, or not ≥ 0).

        On S every constraint is tight, ``C_SS μ_S = τ/n_S − b_S``, so ``μ_S = τ p − q`` with
        ``p = C_SS⁻¹(1/n_S)``, ``q = C_SS⁻¹ b_S``, and ``μᵀCμ = r²`` is a quadratic in τ whose larger
        root is the primal value (a refinement: the root search leaves μ at NNLS accuracy)."""
        S = np.flatnonzero(mu > 0)
        C = self.C[np.ix_(S, S)]
        inv_n, b = 1.0 / self.n[S], self.b[S]
        try:
            p, q = np.linalg.solve(C, np.stack([inv_n, b], axis=1)).T
        except np.linalg.LinAlgError:
            return None
        A, B, c0 = float(inv_n @ p), float(inv_n @ q), float(b @ q) - self.r**2
        disc = B * B - A * c0
        if not (A > 0 and disc >= 0):
            return None
        tau = (B + math.sqrt(disc)) / A if B >= 0 else c0 / (B - math.sqrt(disc))  # larger root, stably
        out = np.zeros_like(mu)
        out[S] = tau * p - q
        return out if np.all(np.isfinite(out)) and np.all(out[S] > 0) else None


@register
class CAGrad(GramianWeighting):
    """CAGrad: ``d = g0 + (√φ/‖g_w‖) g_w`` with ``w`` solving the paper's dual on the simplex.

    Reference: Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task
    Learning", NeurIPS 2021, arXiv:2110.14048 (Algorithm 1).

    With ``g0`` the average gradient and ``φ = c²‖g0‖²``, the primal
    ``max_d min_i g_iᵀd  s.t. ‖d − g0‖ ≤ c‖g0‖`` has the dual
    ``min_{w ∈ Δ} g_wᵀg0 + √φ ‖g_w‖`` (``g_w = Σ w_i g_i``) and the update
    ``d = g0 + (√φ/‖g_w‖) g_w``. The official code solves the dual with scipy's SLSQP on the raw
    Gramian (with ``+1e-8`` terms that make it scale dependent); SLSQP stops at ~√ftol and, with
    gradient norms 1e6 apart, far from the optimum. We solve the same problem exactly (ours): at
    the optimum ``d`` is the projection of ``g0`` onto the polyhedron ``{d : g_iᵀd ≥ t ∀i}`` at
    distance exactly ``√φ``, for the largest such ``t`` (the primal value), and the projection's
    multipliers are ``λ w`` (``λ = √φ/‖g_w‖``). Each projection is a least-distance problem solved
    exactly by NNLS on unit gradients (:class:`_ScaledPrimal`: every coefficient O(1) whatever the
    spread of the norms); the distance is continuous and increasing in ``t``, and the root
    ``dist(t) = √φ`` is found by Brent's method to machine precision (then, if the gap is above
    1e-8, refined in closed form on the support found, keeping the better point). The dual point ``w`` is then
    certified by its duality gap (≤ 1e-8 relative to ``‖g_w‖(‖g0‖ + √φ)``, plus the round-off bound of
    evaluating it, :meth:`certificate`); otherwise :class:`SolverError` ("not converged"). Works for
    any number of tasks (the official NYUv2 code hard-codes 3).

    The update ``d = g0 + (√φ/‖g_w‖) g_w`` is returned as weights on the task gradients:
    ``w_t = T (1/T + λ w*_t) / r`` with ``λ = √φ/‖g_w‖``: the factor T is the official code's
    ``overwrite_grad`` "to match the sum loss" (so the scale is comparable to EW = Σ L_t), and
    ``r`` is the rescale divisor. If ``g_w = 0`` is dual optimal (0 in the convex hull of the
    gradients: a Pareto-stationary point) the formula is undefined; the primal optima are then
    the ``d`` of the ball with ``J d ≥ 0``, and the one closest to ``g0`` (the projection of g0
    onto that cone, the same least-distance problem at ``t = 0``) is returned and logged as
    ``stationary=1``. If ``g0 = 0`` the update is 0. Zero task gradients are left out of the
    worst case ``min_i`` (their improvement ``g_i·d`` is 0 for every d, which would make the
    primal degenerate); they still count in ``g0`` (the mean over all T tasks).

    Args:
        c: radius factor 0 ≤ c ≤ :data:`C_MAX` (c = 0 is plain gradient descent on the mean loss; so
            is c ≤ :data:`C_MIN` = 64 eps(float64), where ``‖d − g0‖ = c‖g0‖`` is at the rounding of
            g0). Default 0.5 (official code / LibMTL default); c = 0.4 is the value for NYUv2 (paper,
            project spec).
        rescale: 0 → ``d``; 1 → ``d/(1+c²)`` (default, official code); 2 → ``d/(1+c)``.

    Raises:
        SolverError: "not converged" with the duality gap reached and the gradient norms when the
            dual point cannot be certified (none known within the tested range, docs/reliability.md).
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
    # the dual is certified to a relative duality gap of 1e-8; d, whose error can grow like the
    # square root of the gap where the optimum is flat, is compared to 1e-5
    solver_rtol = 1e-5

    def __init__(self, c: float = 0.5, rescale: int = 1) -> None:
        check(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and 0 <= c <= C_MAX,
              f"cagrad: c must be a finite number in [0, {C_MAX:.0e}] (1 + c² must be a float64), got {c!r}")
        if isinstance(rescale, bool) or rescale not in RESCALES:
            raise ConfigurationError(f"cagrad: rescale={rescale!r}; choose one of {RESCALES} "
                                     "(0: none, 1: divide by 1+c², 2: divide by 1+c)")
        self.c = float(c)
        self.rescale = int(rescale)
        self._log: dict[str, float] = {}

    def _divisor(self) -> float:
        return (1.0, 1.0 + self.c**2, 1.0 + self.c)[self.rescale]

    def solve_dual(
        self, Gn: np.ndarray, a: np.ndarray, sqrt_phi: float, g0_sq: float, a_scale: float | None = None
    ) -> tuple[np.ndarray | None, dict[str, float]]:
        """``argmin_{w ∈ Δ} wᵀa + √φ·sqrt(wᵀGn w)`` (``a_i = g_i·g0``; ``Gn`` in any units).

        Returns ``(w, info)``; ``w`` is ``None`` when the root search ends on the empty side of
        ``t = 0`` or the certificate fails with ``g_w`` cancelled (then ``g_w = 0`` may be optimal:
        the caller checks the Pareto-stationary case). ``info`` holds ``dual_gap`` (relative),
        ``dual_gap_allowed`` (1e-8 plus the round-off bound, :meth:`certificate`),
        ``solver_iterations`` (least-distance solves) and ``primal_value`` (``min_i g_i·d`` in
        ``Gn``'s units)."""
        sp = _ScaledPrimal.build(Gn, a, sqrt_phi, g0_sq)
        lo = float(np.min(sp.n * sp.b))  # d = g0 attains it: distance 0
        hi = float(np.min(sp.n * (sp.b + sp.r)))  # g_i·d ≤ n_i(ĝ_i·g0 + √φ) for every d of the ball
        if sp.excess(hi) <= 0.0:
            tau = hi
        else:
            span = max(abs(lo), abs(hi))
            try:
                tau = brentq(sp.excess, lo, hi, xtol=1e-30 * span, rtol=4 * _EPS, maxiter=500)
            except (RuntimeError, ValueError) as exc:  # out of iterations, or a bracket lost to rounding
                raise SolverError(f"cagrad: not converged: the root search on the primal value stopped ({exc}); "
                                  f"task gradient norms {sp.n.tolist()} (Gramian units). Please report this "
                                  "Gramian.") from exc
        mu = sp.project(tau)
        info = {"solver_iterations": float(sp.evaluations), "dual_gap": float("inf"),
                "primal_value": tau * sp.unit}
        if mu is None or not np.any(mu > 0):
            return None, info
        v = sp.weights(mu)
        x = v / v.sum()
        rel, ok, allowance = self.certificate(Gn, a, sqrt_phi, x, g0_sq, a_scale)
        if rel > _GAP_RTOL and (mu2 := sp.on_support(mu)) is not None:  # refine; keep the better point
            v2 = sp.weights(mu2)
            x2 = v2 / v2.sum()
            rel2, ok2, allowance2 = self.certificate(Gn, a, sqrt_phi, x2, g0_sq, a_scale)
            if rel2 < rel:
                x, rel, ok, allowance = x2, rel2, ok2, allowance2
        info["dual_gap"] = rel
        info["dual_gap_allowed"] = _GAP_RTOL + allowance
        if ok and not _cancelled(Gn, x):
            return x, info
        return None, info

    @staticmethod
    def certificate(Gn: np.ndarray, a: np.ndarray, sqrt_phi: float, x: np.ndarray, g0_sq: float,
                    a_scale: float | None = None) -> tuple[float, bool, float]:
        """Relative duality gap of the dual point ``x`` and whether it certifies optimality.

        With ``λ = √φ/‖g_w‖`` and ``d = g0 + λ g_w`` (feasible for the primal: ``‖d − g0‖ = √φ``),
        the gap between the dual value ``g_wᵀd`` and the primal value ``min_i g_iᵀd`` is
        ``Σ_i x_i g_iᵀd − min_i g_iᵀd ≥ 0`` (the Frank–Wolfe gap). It is compared with
        ``_GAP_RTOL · ‖g_w‖(‖g0‖ + √φ)`` (scale free: task gradients 1e-10 or 1e10, or 1e12 apart,
        alike; ``‖g0‖ + √φ`` bounds ‖d‖ and, unlike ‖d‖, does not vanish when ``c ≥ 1`` makes
        ``d = 0`` optimal)
        plus the round-off bound of computing it from the Gramian: ``g_iᵀd = a_i + λ(Gx)_i`` is
        a sum of terms of size at most ``E_i = n_i(a_scale + λ Σ_j x_j n_j)`` (``n_i = ‖g_i‖``,
        ``a_scale = Σ_j n_j / T`` over all tasks, the terms of ``a_i``; default ``|a_i|/n_i``); with
        ``err_i = 2 (T + 2) eps E_i`` (twice the worst-case round-off of these sums) the bound is
        ``Σ_i x_i err_i + (min_i g_i·d − min_i (g_i·d − err_i))`` — the tasks in the gap and those
        that could be the exact minimiser, never the largest gradient's scale as such. The exact
        gap of ``x`` (and of the weights built from it, whose rounding is of the same size) is then
        at most the computed gap plus this bound. Returns
        ``(gap/scale, ok, bound/scale)``; ok iff the first ≤ ``_GAP_RTOL`` + the last.

        The bound is not slack: where a task i of the support is far larger than ‖g_w‖, ``g_i·d``
        is a difference of terms ``n_i/‖g_w‖`` times larger than the gap's scale, and even the
        float64 rounding of the exact dual optimum has an exact-arithmetic gap of that order
        (e.g. 6e-6 relative with norms 1e11 apart, ``test_cagrad_norms_1e6_to_1e11_apart_are_certified``)."""
        T = Gn.shape[0]
        q = float(x @ Gn @ x)
        if not q > 0.0:
            return float("inf"), False, 0.0
        gw = math.sqrt(q)
        lam = sqrt_phi / gw
        Jd = a + lam * (Gn @ x)  # g_i·d
        i_min = int(np.argmin(Jd))
        gap = max(float(x @ Jd - Jd[i_min]), 0.0)
        n = np.sqrt(np.clip(np.diag(Gn), 0.0, None))
        terms = (np.full(T, a_scale) * n if a_scale is not None else np.abs(a)) + lam * n * float(x @ n)
        err = 2 * (T + 2) * _EPS * terms  # twice the worst-case round-off of each computed g_i·d
        # the exact gap is at most the computed one + Σ x_i err_i + (computed min − min_i(g_i·d − err_i)):
        # a task whose g_i·d is a large cancellation may be the exact minimiser without being the computed one
        noise = float(x @ err) + float(Jd[i_min] - np.min(Jd - err))
        scale = gw * (math.sqrt(g0_sq) + sqrt_phi)  # ≥ ‖g_w‖‖d‖, and never 0 where d = 0 is optimal
        if not scale > 0:
            return float("inf"), False, 0.0
        return gap / scale, bool(gap <= _GAP_RTOL * scale + noise), noise / scale

    def _stationary_direction(self, Gs: np.ndarray, a: np.ndarray, sqrt_phi: float,
                              g0_sq: float) -> np.ndarray | None:
        """Extra weights μ (on the non-zero tasks) of a primal optimum when ``g_w = 0`` is dual optimal.

        ``g_w = 0`` is dual optimal (value 0) iff 0 lies in the convex hull of the gradients and
        some ``d`` in the ball ``‖d − g0‖ ≤ √φ`` has ``g_i·d ≥ 0`` for every task; such a d attains
        the primal value 0, which certifies both. We take the one closest to ``g0``: its projection
        onto the cone ``{d : J d ≥ 0}``, ``d = g0 + Σ_i μ_i g_i`` (the least-distance problem at
        ``t = 0``, on unit gradients). 0 in the hull is decided on the unit gradients as for
        FairGrad (squared distance ≤ :data:`~mtlens.methods._solvers.INFEASIBLE_MIN_NORM`).
        Returns ``None`` when this certificate does not hold."""
        sp = _ScaledPrimal.build(Gs, a, sqrt_phi, g0_sq)
        if sp.n.shape[0] > 1 and min_norm_simplex(sp.C).value > INFEASIBLE_MIN_NORM:
            return None
        if sp.n.shape[0] == 1:
            return None
        mu = sp.project(0.0)
        if mu is None or math.sqrt(max(float(mu @ sp.C @ mu), 0.0)) > sp.r * (1 + 1e-9):
            return None
        z = sp.C @ mu + sp.b  # ĝ_i·d / unit ≥ 0
        if float(np.min(z)) < -1e-9 * (1.0 + sp.r):
            return None
        return sp.weights(mu)

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
        # c = 0 or g0 = 0: d = g0. So too for c ≤ 64 eps: ‖d − g0‖ = c‖g0‖ is at g0's own rounding (and the
        # root search's interval [lo, hi], of relative width ~c, is at lo's round-off: c = 1e-18 and
        # c = 3.1e-16 raised "gap inf"; from 1e-15 on the solver resolves it)
        if sqrt_phi <= 0.0 or self.c <= C_MIN:
            self._log = {"lambda": 0.0, "stationary": float(g0_sq <= 0.0)}
            return to_weights(np.full(T, 1.0 / div), gramian)
        idx = np.flatnonzero(nonzero_tasks(G))  # zero gradients leave the worst case (see docstring)
        a = (Gn @ np.full(T, 1.0 / T))[idx]
        a_scale = float(np.sum(np.sqrt(np.clip(np.diag(Gn), 0.0, None)))) / T
        Gs = Gn[np.ix_(idx, idx)]
        x, info = self.solve_dual(Gs, a, sqrt_phi, g0_sq, a_scale)
        w = np.ones(T)
        if x is not None:
            lam = sqrt_phi / math.sqrt(float(x @ Gs @ x))
            w[idx] += T * lam * x
            self._log = {"lambda": lam, "stationary": 0.0, **info}
            return to_weights(w / div, gramian)
        mu = self._stationary_direction(Gs, a, sqrt_phi, g0_sq)
        if mu is None:
            gap = info["dual_gap"]
            allowed = info.get("dual_gap_allowed", _GAP_RTOL)
            why = (f"the best dual point has a relative duality gap {gap:.2e} > {allowed:.2e} (1e-8 plus the "
                   "round-off bound of evaluating it)"
                   if not gap <= allowed else
                   f"the dual point is optimal to a relative gap {gap:.2e}, but its g_w is below the stationarity "
                   f"threshold ({_STATIONARY:.0e} of the gradients it combines), where the update's length is "
                   "rounding noise")
            raise SolverError(
                f"cagrad: not converged: {why}, and g_w = 0 (a Pareto-stationary point) could not be certified "
                f"optimal either; task gradient norms {np.sqrt(np.clip(np.diag(G), 0, None)).tolist()}. "
                "Please report this Gramian (docs/reliability.md lists the tested range); rescaling the task "
                "losses to bring their gradient norms closer may avoid it."
            )
        w[idx] += T * mu
        # the dual point's gap is logged when one was evaluated (a projection that found no support leaves it
        # infinite, "not computed", which a logger would show as a failure: left out)
        self._log = {"lambda": 0.0, "stationary": 1.0, **{k: v for k, v in info.items() if math.isfinite(v)}}
        return to_weights(w / div, gramian)

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
