"""FairGrad: α-fair resource allocation of the update among tasks (G w = w^{-1/α})."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..engine.protocols import SYMMETRIC, Claim, GramianWeighting
from ..errors import SolverError
from ._qp import check_gramian
from ._registry import register
from ._solvers import FAIR_RTOL, nonzero_tasks, solve_fair_system
from ._utils import check, positive

INFEASIBLE = ("raise", "least_squares")


@register
class FairGrad(GramianWeighting):
    """FairGrad: the update maximising the α-fair utility ``Σ_t u_α(g_tᵀ d)`` on a ball.

    Reference: Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", arXiv:2402.15638
    (ICML 2024), Eq. (4) / Algorithm 1. The optimality condition of the α-fair problem gives
    ``d = Jᵀ w`` with ``w > 0`` solving ``G w = w^{-1/α}`` (element-wise power).

    Solver (ours; the authors' code, LibMTL and TorchJD call ``scipy.optimize.least_squares`` with
    ``w ≥ 0`` from ``w = 1/T``, which stops short on solvable but badly scaled problems — two tasks
    at 150° with gradient norms 1 and 1e4 have the solution (2.732, 2.732e-4), which it does not
    reach): :func:`~mtlens.methods._solvers.solve_fair_system`, damped Newton's method on the
    strictly convex function whose stationary point is the condition, on the problem scaled by the
    gradient norms. The returned ``w`` is certified: componentwise backward error of
    ``G w = w^{-1/α}`` at most ``residual_tol``. When 0 lies in the convex hull of the gradients no
    direction improves every task and no solution exists ("infeasible"); a solvable problem the
    solver does not certify is reported as "not converged" — the two are told apart in the error.

    Degenerate input (documented choices, never silent):

    * A task with a zero gradient has ``g_tᵀ d = 0`` for every ``d``: its equation
      ``0 = w_t^{-1/α}`` has no solution. It is left out of the system and given weight 0;
      ``log_values()["fairgrad/inactive_tasks"]`` counts them. All-zero J: weights 1.
    * Infeasible problems: ``infeasible="raise"`` (default) raises
      :class:`~mtlens.errors.SolverError`; ``infeasible="least_squares"`` returns the bounded
      least-squares point of the authors' code (``least_squares``, at most ``max_nfev`` evaluations,
      from ``1/T``, on the trace-normalised Gramian) and logs its residual.

    Hyper-parameters (defaults): ``alpha=1.0`` (proportional fairness, the paper's default);
    ``residual_tol=1e-9`` (the certificate); ``max_iter=100`` (Newton iterations; random problems
    with condition numbers to 1e10 and norm spreads to 1e12 need at most ~45);
    ``infeasible="raise"``; ``max_nfev=200`` (the least-squares fallback only).
    """

    name = "fairgrad"
    reference = "Ban & Ji, Fair Resource Allocation in Multi-Task Learning, arXiv:2402.15638"
    defaults_source = "alpha = 1.0 as in the paper; infeasible problems handled as documented (ours)"

    claims = {
        "permutation_invariant": SYMMETRIC,
        "homogeneous": Claim("Ban & Ji, arXiv:2402.15638: G w = 1/w (alpha = 1) fixes ‖d‖² = T", degree=0),
        "non_conflicting": Claim("Ban & Ji, arXiv:2402.15638: G w = w^(-1/alpha) > 0 gives g_t·d = w_t^(-1/alpha) > 0",
                                 when="common_descent"),
    }
    failures = {
        "no_common_descent": (SolverError, "the alpha-fair problem has no solution when no direction improves every "
                                           "task"),
    }

    def __init__(self, alpha: float = 1.0, max_nfev: int = 200, residual_tol: float = FAIR_RTOL,
                 infeasible: str = "raise", max_iter: int = 100) -> None:
        self.alpha = positive("alpha", alpha, self.name)
        for nm, v in (("max_nfev", max_nfev), ("max_iter", max_iter)):
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                  f"{self.name}: {nm} must be a positive int, got {v!r}")
        self.max_nfev = max_nfev
        self.max_iter = max_iter
        self.residual_tol = positive("residual_tol", residual_tol, self.name)
        check(infeasible in INFEASIBLE, f"{self.name}: infeasible={infeasible!r}; choose one of {INFEASIBLE}")
        self.infeasible = infeasible
        self._log: dict[str, float] = {}

    def log_values(self) -> dict[str, float]:
        return dict(self._log)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        T = check_gramian(gramian, self.name)
        G = gramian.detach().to("cpu", torch.float64).numpy()
        if not np.isfinite(G).all():
            raise SolverError(f"{self.name}: the Gramian has non-finite entries")
        G = 0.5 * G + 0.5 * G.T  # the sum G + Gᵀ overflows for entries above ~9e307
        try:
            r = solve_fair_system(G, self.alpha, rtol=self.residual_tol, max_iter=self.max_iter, method=self.name)
        except SolverError as exc:
            if self.infeasible == "raise" or "infeasible" not in str(exc):
                raise
            w, rel, nfev = self._least_squares_point(G)
            self._log = {"fairgrad/inactive_tasks": float(T - int(nonzero_tasks(G).sum())),
                         "fairgrad/residual": rel, "fairgrad/iterations": float(nfev), "fairgrad/infeasible": 1.0}
            return torch.as_tensor(w, dtype=torch.float64, device=gramian.device)
        self._log = {"fairgrad/inactive_tasks": float(r.inactive), "fairgrad/residual": r.residual,
                     "fairgrad/iterations": float(r.iterations), "fairgrad/infeasible": 0.0}
        return torch.as_tensor(r.weights, dtype=torch.float64, device=gramian.device)

    def _least_squares_point(self, G: np.ndarray) -> tuple[np.ndarray, float, int]:
        """The authors' bounded least-squares point (used only for infeasible problems, on request)."""
        from scipy.optimize import least_squares

        T = G.shape[0]
        live = nonzero_tasks(G)
        idx = np.flatnonzero(live)
        Gl = G[np.ix_(idx, idx)]
        n = len(idx)
        s = float(np.trace(Gl)) / n
        Gt = Gl / s
        a = self.alpha
        def residual(x: np.ndarray) -> np.ndarray:
            return Gt @ x - np.power(x, -1.0 / a)

        res = least_squares(residual, np.full(n, 1.0 / n), bounds=(0.0, np.inf),
                            max_nfev=self.max_nfev, ftol=1e-12, xtol=1e-12, gtol=1e-12)
        x = res.x
        target = np.power(x, -1.0 / a) if (x > 0).all() else np.full(n, np.inf)
        rel = float(np.linalg.norm(Gt @ x - target) / np.linalg.norm(target)) if np.isfinite(target).all() \
            else float("inf")
        w = np.zeros(T)
        w[idx] = x * s ** (-a / (1.0 + a))
        if not np.isfinite(w).all():
            raise SolverError(f"{self.name}: the least-squares point is not finite (residual {rel:.3g}); "
                              "the problem is infeasible: use upgrad or mgda")
        return w, rel, int(res.nfev)
