"""Nash-MTL: the Nash bargaining solution ``Gα = 1/α`` by the paper's convex-concave procedure."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..engine.decision import Decision
from ..engine.protocols import SYMMETRIC, Claim, GramianWeighting
from ..errors import MissingDependencyError, ShapeError, SolverError, require
from ._registry import register
from ._solvers import (
    FAIR_RTOL,
    INFEASIBLE_MIN_NORM,
    _fair_residual,
    check_gramian,
    cosine_matrix,
    min_norm_simplex,
    nonzero_tasks,
    solve_fair_system,
    to_weights,
)
from ._utils import check

if TYPE_CHECKING:
    from ..engine.gradients import TaskGradients

_STATIONARY = INFEASIBLE_MIN_NORM  # squared min-norm of the hull of the UNIT gradients: no solution below
_RESIDUAL_TOL = 1e-3  # official stopping rule ‖Gα − 1/α‖ < 1e-3 (here on the cosine matrix)
_STEP_TOL = 1e-6  # official stopping rule ‖α_new − α‖ < 1e-6


@register
class NashMTL(GramianWeighting):
    """Nash-MTL: weights α > 0 with ``Gα = 1/α`` (the Nash bargaining solution), update ``Σ α_t g_t``.

    Reference: Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task
    Learning as a Bargaining Game", ICML 2022, arXiv:2202.01017 (Sec. 3.3, Algorithm 1).

    Solver: the paper's sequence of convex problems (a convex-concave procedure): with
    ``β(α) = Gα`` and the concave ``φ(α) = Σ_i log α_i + log β_i(α)``, each iteration solves
    ``min_α Σ_i β_i(α) + φ̃(α)  s.t. log α_i + log β_i(α) ≥ 0, α ≥ 0`` where φ̃ is φ linearised
    at the previous α, with cvxpy + ECOS (``max_iters=100``) as the official code, for at most
    ``optim_niter`` iterations, stopping early when the residual (here ``‖Cβ − 1/β‖``, see below)
    is < 1e-3 or the step is below 1e-6 (the official rules). Differences from the official code, on purpose:

    * the official code divides G by its Frobenius norm; here the CCP runs on the cosine matrix
      ``C = D⁻¹ G D⁻¹`` (``D = diag‖g_t‖``) for β with ``C β = 1/β``, and ``α_t = β_t/‖g_t‖``
      solves ``Gα = 1/α`` exactly (``Gα = D C β = D/β = 1/α``): the same fixed point (the Nash
      solution is equivariant to per-task rescaling), with iterates and tolerances that do not
      depend on the gradient scales (1e-10, 1e10, or tasks 1e6 apart solve alike).
    * the CCP starts from the previous step's β (warm start, as the official code) when it is
      a valid linearisation point (``Cβ > 0``), else from a strictly feasible point built from
      the min-norm element (the official start, all-ones, can make the first problem unbounded);
    * the latest solution is returned (the official loop returns the point before the last
      solve when it stops on the residual rule);
    * a solver failure (exception, status other than optimal/optimal_inaccurate, no value)
      raises :class:`~mtlens.errors.SolverError`. The official code catches every exception and
      keeps the previous α (initially all ones: silent equal weighting), and other ports with
      cvxpy ≥ 1.6 and no ECOS silently return weights of 1.
    * the CCP stops after ``optim_niter`` iterations whatever its residual (the official code returns
      that iterate silently; on ill-conditioned problems its relative residual reaches 0.4). Here
      the result is certified: when the CCP's last iterate does not satisfy ``Cβ = 1/β`` to a
      componentwise backward error of 1e-9, it is finished by Newton's method on the convex
      function ``½βᵀCβ − Σ log β`` whose stationary point is the Nash solution
      (:func:`~mtlens.methods._solvers.solve_fair_system`), logged as ``newton=1`` with the CCP's
      residual as ``ccp_residual``. ``exact=False`` keeps the official behaviour (the last CCP
      iterate) but warns (once per instance) when its residual exceeds 1e-3. With ``exact`` an ECOS
      failure on a CCP sub-problem (the problem itself is solvable: checked first) also hands over
      to Newton's method (logged as ``ccp_failed``) instead of raising;
    * zero gradients cannot bargain (their utility ``g_t·d`` is 0 for every d): they get α_t = 0
      and the others are solved among themselves (logged as ``zero_tasks``). If 0 lies in the
      convex hull of the remaining gradients (e.g. two opposite gradients) no α > 0 satisfies
      ``Gα = 1/α`` and :class:`SolverError` says so (use mgda/upgrad there).

    ``max_norm`` clips the update norm ``‖Σ α_t g_t‖ = √(αᵀGα)`` by rescaling α (the official
    code clips the shared parameters' gradient norm after backward: the same on the shared
    parameters; here the heads' weights are rescaled too, since the engine uses one weight
    vector). With ``update_weights_every = k`` the solve runs on steps 0, k, 2k, ... and the
    last α is reused in between (the clip uses the current G).

    Args:
        max_norm: maximum update norm (> 0), or 0 to disable. Default 1.0 (official code).
        update_weights_every: k ≥ 1. Default 1 (official code).
        optim_niter: maximum CCP iterations ≥ 1. Default 20 (official code).
        exact: certify (and if needed finish) the solution, see above. Default True (ours: the
            paper's α is the solution of ``Gα = 1/α``).

    Needs the optional extra ``mtlens[nash]`` (cvxpy, ecos): a missing package raises
    :class:`~mtlens.errors.MissingDependencyError` at construction.
    """

    name = "nash_mtl"
    last_alpha: Tensor | None  # buffers
    warm: Tensor | None
    warm_mask: Tensor | None
    reference = "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022, arXiv:2202.01017"
    defaults_source = ("max_norm=1.0, update_weights_every=1, optim_niter=20 "
                       "(official code AvivNavon/nash-mtl)")
    stateful = True
    state_attrs = ("step",)
    head_rule = "α before the max-norm clipping (official code: backward of Σ_t α_t L_t, clips the shared part only)"

    claims = {
        "permutation_invariant": SYMMETRIC,
        "homogeneous": Claim("Navon et al., ICML 2022: G α = 1/α fixes ‖d‖² = T", degree=0),
        "non_conflicting": Claim("Navon et al., ICML 2022: G α = 1/α > 0 gives g_t·d = 1/α_t > 0",
                                 when="common_descent"),
    }
    failures = {
        "no_common_descent": (SolverError, "G α = 1/α has no positive solution when 0 is in the convex hull of the "
                                           "gradients"),
    }
    solver_rtol = 1e-4  # the cvxpy CCP's stopping criterion

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20,
                 exact: bool = True) -> None:
        check(isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool)
              and math.isfinite(max_norm) and max_norm >= 0,
              f"nash_mtl: max_norm must be a finite number ≥ 0 (0 disables), got {max_norm!r}")
        for nm, v in (("update_weights_every", update_weights_every), ("optim_niter", optim_niter)):
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                  f"nash_mtl: {nm} must be an int ≥ 1, got {v!r}")
        self.max_norm = float(max_norm)
        self.update_weights_every = int(update_weights_every)
        self.optim_niter = int(optim_niter)
        check(isinstance(exact, bool), f"nash_mtl: exact must be true or false, got {exact!r}")
        self.exact = exact
        self._warned = False
        purpose = "Nash-MTL (its convex-concave procedure is solved with cvxpy + ECOS)"
        self._cp = require("cvxpy", "nash", purpose)
        require("ecos", "nash", purpose)
        if "ECOS" not in self._cp.installed_solvers():
            raise MissingDependencyError(
                f"{purpose}: cvxpy does not list ECOS among its installed solvers "
                f"({self._cp.installed_solvers()}). Install it with: pip install 'mtlens[nash]'"
            )
        self.step = 0
        self.register_buffer("last_alpha", None)  # original scale, for reuse between solves (T,), float64
        self.register_buffer("warm", None)  # normalised-space α of the last solve, float64
        self.register_buffer("warm_mask", None)  # the tasks it was solved for (T,), bool
        self._problems: dict[int, tuple[Any, Any, Any, Any]] = {}
        self._log: dict[str, float] = {}

    # ---- convex sub-problem ------------------------------------------------------------------
    def _problem(self, k: int) -> tuple[Any, Any, Any, Any]:  # cvxpy (problem, α, G, linear term)
        if k not in self._problems:
            cp = self._cp
            a = cp.Variable(k, nonneg=True)
            Gp = cp.Parameter((k, k))
            lin = cp.Parameter(k)
            Ga = Gp @ a
            prob = cp.Problem(cp.Minimize(cp.sum(Ga) + lin @ a), [cp.log(a) + cp.log(Ga) >= 0])
            self._problems[k] = (prob, a, Gp, lin)
        return self._problems[k]

    def _solve_once(self, Gn: np.ndarray, a_prev: np.ndarray) -> np.ndarray:
        """One CCP iteration: the convex problem linearised at ``a_prev`` (ECOS)."""
        cp = self._cp
        prob, a, Gp, lin = self._problem(Gn.shape[0])
        Gp.value = Gn
        lin.value = 1.0 / a_prev + Gn.T @ (1.0 / (Gn @ a_prev))
        a.value = a_prev
        try:
            prob.solve(solver=cp.ECOS, warm_start=True, max_iters=100)
        except Exception as exc:  # cvxpy.error.SolverError, ValueError, ArithmeticError, ...
            raise SolverError(
                f"nash_mtl: ECOS failed on the CCP sub-problem ({type(exc).__name__}: {exc}); "
                f"normalised Gramian {Gn.tolist()}. No weights were produced for this step."
            ) from exc
        if prob.status not in ("optimal", "optimal_inaccurate") or a.value is None:
            raise SolverError(
                f"nash_mtl: the CCP sub-problem ended with status '{prob.status}'; normalised Gramian "
                f"{Gn.tolist()}. No weights were produced for this step."
            )
        out = np.asarray(a.value, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(out)) or np.any(out <= 0):
            raise SolverError(f"nash_mtl: ECOS returned α = {out.tolist()} (needs finite, > 0)")
        return out

    @staticmethod
    def _feasible_start(Gn: np.ndarray) -> np.ndarray:
        """A strictly positive β with ``C β > 0`` and ``β_i (C β)_i ≥ 1`` (C = ``Gn``)."""
        k = Gn.shape[0]
        lam = min_norm_simplex(Gn).weights
        m = float(np.min(Gn @ lam))  # ≥ ‖min-norm point‖² > 0
        spread = float(np.max(np.abs(Gn @ np.ones(k))))
        delta = 0.5 * m / max(spread, 1e-300)
        a = lam + min(delta, 1.0 / k)
        prod = a * (Gn @ a)
        return a / math.sqrt(float(np.min(prod)))

    def _solve(self, G: np.ndarray) -> np.ndarray:
        T = G.shape[0]
        mask = nonzero_tasks(G)
        k = int(mask.sum())
        alpha = np.zeros(T)
        info: dict[str, float] = {"zero_tasks": float(T - k), "ccp_iterations": 0.0}
        if k == 0:
            self._log = {**info, "residual": 0.0}
            return alpha
        C, norms = cosine_matrix(G, mask)
        if k == 1:
            a = np.ones(1)
            res = 0.0
        else:
            if min_norm_simplex(C).value <= _STATIONARY:
                raise SolverError(
                    "nash_mtl: infeasible: no bargaining solution exists: 0 is in the convex hull of the task "
                    "gradients (e.g. opposite gradients), so no direction improves every task and Gα = 1/α has no "
                    "positive solution. This is a Pareto-stationary point; use mgda or upgrad if you need an "
                    "update here."
                )
            start: np.ndarray | None = None
            same = self.warm_mask is not None and np.array_equal(self.warm_mask.numpy(), mask)
            if self.warm is not None and same:
                start = self.warm.numpy()
                if np.any(C @ start <= 0) or np.any(start <= 0):
                    start = None
            a = start if start is not None else self._feasible_start(C)
            it = 0
            for it in range(1, self.optim_niter + 1):  # noqa: B007 - reported
                if np.linalg.norm(C @ a - 1.0 / a) < _RESIDUAL_TOL:
                    it -= 1
                    break
                try:
                    a_new = self._solve_once(C, a)
                except SolverError:
                    if not self.exact:
                        raise
                    info["ccp_failed"] = 1.0  # the problem is solvable (checked above): Newton finishes it
                    break
                moved = float(np.linalg.norm(a_new - a))
                a = a_new
                if moved < _STEP_TOL:
                    break
            info["ccp_iterations"] = float(it)
            res = _fair_residual(C, a, np.ones(k), 1.0)
            info["ccp_residual"] = res
            info["newton"] = 0.0
            if self.exact and not res <= FAIR_RTOL:
                r = solve_fair_system(C, 1.0, method=self.name)
                a, res = r.weights, r.residual
                info["newton"] = 1.0
            elif not self.exact and res > 1e-3 and not self._warned:
                import warnings

                warnings.warn(
                    f"nash_mtl: the CCP stopped after {it} iterations with relative residual {res:.2e} of "
                    "Gα = 1/α (exact=False keeps that iterate, as the official code); pass exact=True for the "
                    "certified solution",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned = True
        self.warm, self.warm_mask = torch.from_numpy(a.copy()), torch.from_numpy(mask.copy())
        alpha[mask] = a / norms
        self._log = {**info, "residual": res}
        return alpha

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return self._weights(gramian, losses)[0]

    def decide(self, grads: TaskGradients) -> Decision:
        w, head_w = self._weights(grads.gramian(), grads.objective_losses)
        return Decision(weights=w, head_weights=head_w, values=self.log_values())

    def _weights(self, gramian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        G, _ = check_gramian(gramian, losses, self.name)
        T = G.shape[0]
        if self.step % self.update_weights_every == 0:
            alpha = self._solve(G)
            self.last_alpha = torch.from_numpy(alpha.copy())
            solved = 1.0
        else:
            if self.last_alpha is None or self.last_alpha.shape[0] != T:
                raise ShapeError(f"nash_mtl: no stored weights for {T} tasks to reuse (step {self.step})")
            alpha = self.last_alpha.numpy().copy()
            solved = 0.0
            self._log = {k: v for k, v in self._log.items() if k in ("zero_tasks",)}
        self.step += 1
        norm = math.sqrt(max(float(alpha @ G @ alpha), 0.0))
        clipped = self.max_norm > 0 and norm > self.max_norm
        head_alpha = to_weights(alpha, gramian)  # heads: unclipped α (official code clips shared only)
        if clipped:
            alpha = alpha * (self.max_norm / norm)
        self._log.update({"solved": solved, "update_norm": norm, "clipped": float(clipped)})
        return to_weights(alpha, gramian), head_alpha

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
