"""FORUM: a first-order multi-gradient method for the bilevel task-weighting problem (owns its step)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..engine.decision import Decision
from ..engine.protocols import LossWeighting
from ..errors import ConfigurationError, NonFiniteError, SolverError, require
from ._calls import EpochCalls
from ._loss_common import InternalOptimizer, TaskCount, check_int, check_num_tasks, float_dtype
from ._registry import register
from ._utils import positive

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.gradients import TaskGradients

EPS = 1e-8
"""The authors' constant: added to the outer gradients' norms and to ``‖∇q‖²`` (``train_FORUM``)."""
DIVERGED = 1e5
"""The inner loop stops when ``f(α, ω^i)`` exceeds this ("caused by too large inner_lr and inner_step")."""


@dataclass
class _Pending:
    """What :meth:`FORUM.meta_step` computed for the next step (consumed by :meth:`FORUM.decide`)."""

    s: Tensor  # softmax(α_k) (T,), float64
    nu: float
    lam: Tensor  # λ_k after the moving average (T,), float64
    alpha_grad: Tensor  # ν ∇_α q (T,), float64
    params: list[Tensor]
    extra: list[Tensor]  # Σ_t λ_t ĝ_F,t per parameter
    values: dict[str, float]
    world: int  # data-parallel ranks of the look-ahead (1: none)


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


@register
class FORUM(LossWeighting):
    """FORUM: the step ``z ← z − (Σ_t λ_t ∇F̂_t(ω) + ν ∇q(z))`` on ``z = (α, ω)``, weights ``softmax(α)``.

    Reference: Ye, Lin, Cao, Zhang & Tsang, "A First-Order Multi-Gradient Algorithm for
    Multi-Objective Bi-Level Optimization", ECAI 2024 (doi:10.3233/FAIA240793), arXiv:2401.09257.
    The task-weighting problem is bilevel: the lower level trains the model ``ω`` on
    ``f(α, ω) = Σ_t softmax(α)_t L_t(ω)`` (training batch), the upper level minimises every task's
    loss ``F_t(ω)`` on other data. FORUM rewrites it with the value function as the constrained
    multi-objective problem ``min F(ω)`` s.t. ``q(α, ω) = f(α, ω) − f(α, ω^K) ≤ 0`` (``ω^K``: K SGD
    steps on ``f(α, ·)`` from ``ω``) and takes first-order steps only (no Hessian). We follow the
    authors' code (``train_FORUM`` in ``LibMTL/trainer.py`` of github.com/Baijiong-Lin/FORUM; the
    same in LibMTL's ``bacth_forward_FORUM``). Before each step (``meta_step``), on the step's batch
    (lower level) and one independent batch (upper level):

    1. ``∇q = (∇_α f(α, ω) − ∇_α f(α, ω^K), ∇_ω f(α, ω))`` with ``ω^K`` from ``inner_steps`` plain
       SGD steps of size ``inner_lr`` on ``f(α, ·)`` (stopping early when ``f`` exceeds 1e5, as the
       authors); ``∇_α f = J_softmaxᵀ L`` in closed form;
    2. ``ĝ_t = ∇_ω F_t / (‖∇_ω F_t‖ + 1e-8)`` on the independent batch (all parameters);
    3. ``π_t = ρ − ⟨∇q, ĝ_t⟩ / (‖∇q‖² + 1e-8)``; ``w`` solves the paper's problem (14):
       ``min wᵀAAᵀw − w_{T+1} ρ(‖∇q‖² + 1e-8)`` over ``w ≥ 0``, ``Σ_{t≤T} w_t = 1``,
       ``w_{T+1} ≥ Σ_t w_t π_t``, with ``A`` the rows ``(0, ĝ_t)`` and ``∇q`` (solved with cvxpy, as
       the authors, with its Clarabel interior-point solver named explicitly and tolerances relative
       to the objective (1e-10; absolute gap 1e-14): cvxpy's default for this QP, OSQP, reported
       'unbounded' or 'user_limit' on 4 of 150 random solvable problems, and Clarabel's default
       absolute tolerance left it 1e-4 off when ``∇q`` is small; docs/reliability.md, section 3);
    4. ``λ ← λ + β (w_{1..T} − λ)``, ``β = (e + 1)^{-3/4}`` with ``e`` the number of finished epochs
       (the authors' code indexes the decay by the epoch; ``λ`` starts at 0);
       ``ν = max(Σ_t λ_t π_t, 0)``.

    The step (``decide``) then writes ``Σ_t λ_t ĝ_t + ν ∇_ω f(α, ω)``: the objective ``ν Σ_t
    softmax(α)_t L_t`` on the step's batch plus ``Σ_t λ_t ĝ_t`` as extra gradients
    (``adds_gradients``; the logged weights are ``ν softmax(α)``), and one Adam step on ``α`` with
    ``ν ∇_α q`` — both with the ``α`` of the look-ahead, as the authors update ``α`` and ``ω``
    together. FORUM owns its step: without ``meta_step`` before it, ``mtl_backward`` raises.

    Differences from the authors' set-up: they draw two batches per iteration and run half as
    many iterations per epoch; the mtlens trainer uses the step's batch as the lower-level batch
    and one independent batch as the upper-level batch at every step. Extra cost per step:
    ``inner_steps + 3`` forward and ``inner_steps + T + 1`` backward passes, and a small QP.
    Data parallelism: exact when the :class:`~mtlens.engine.LookAhead` reduces over the same ranks as
    the step (every loss value and gradient of the look-ahead is then the global batch's).

    Hyper-parameters (defaults, the authors' ``LibMTL/config.py`` and README command): ``rho=0.1``
    (``--rho``; LibMTL's ``--FORUM_phi``), ``inner_lr=0.1`` (``--eta``), ``inner_steps=5``
    (``--inner_step``), ``outer_lr=1e-3`` (their Adam on α), α starts at ``1/T`` (uniform weights).
    ``num_tasks`` and ``steps_per_epoch`` are set-up facts (the latter lets a missed
    ``on_epoch_end`` raise). Needs ``cvxpy`` (``pip install 'mtlens[bilevel]'``).
    """

    name = "forum"
    lam: Tensor | None  # buffer
    reference = ("Ye, Lin, Cao, Zhang & Tsang, A First-Order Multi-Gradient Algorithm for Multi-Objective Bi-Level "
                 "Optimization (FORUM), ECAI 2024, arXiv:2401.09257")
    defaults_source = ("rho = 0.1, inner_lr = 0.1, inner_steps = 5, outer_lr = 1e-3 (Adam), α = 1/T "
                       "(authors' code, github.com/Baijiong-Lin/FORUM; LibMTL)")
    stateful = True
    state_attrs = ("_alpha", "_tasks", "_epochs", "_calls")
    needs_lookahead = True
    adds_gradients = True
    user_calls = ("on_epoch_end",)
    loss_transforms = ("none",)
    loss_transform_conflict = ("its look-ahead (meta_step) differentiates the raw task losses and its step must "
                               "write the gradient of the same lower-level objective f = Σ softmax(α)_t L_t")
    head_rule = "the objective's gradient ν softmax(α)_t plus the upper-level term Σ λ_t ĝ_t (all parameters)"

    def __init__(self, rho: float = 0.1, inner_lr: float = 0.1, inner_steps: int = 5, outer_lr: float = 1e-3,
                 num_tasks: int | None = None, steps_per_epoch: int | None = None) -> None:
        self.rho = positive("rho", rho, self.name)
        self.inner_lr = positive("inner_lr", inner_lr, self.name)
        self.inner_steps = check_int("inner_steps", inner_steps, 1, self.name)
        self.outer_lr = positive("outer_lr", outer_lr, self.name)
        if steps_per_epoch is not None:
            check_int("steps_per_epoch", steps_per_epoch, 1, self.name)
        self._cp = require("cvxpy", "bilevel", "forum")
        self._tasks = TaskCount(self.name, check_num_tasks(num_tasks, self.name))
        self._alpha = InternalOptimizer(self, "alpha", self.outer_lr, 0.0, 0.0)  # buffer alpha
        self.register_buffer("lam", None)  # the upper-level multipliers λ (T,), float64
        self._epochs = 0
        self._calls = EpochCalls(self.name, steps_per_epoch,
                                 "decays the moving average of its upper-level weights by the epoch")
        self._pending: _Pending | None = None
        self._log: dict[str, float] = {}

    # -- state -------------------------------------------------------------------------------------
    def _a(self, T: int, like: Tensor) -> Tensor:
        self._tasks.bind(T)
        return self._alpha.ensure(T, like.device, float_dtype(like.dtype), init=1.0 / T)

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        """``softmax(α)`` (T,): the lower-level weights (the step itself also needs :meth:`meta_step`)."""
        return torch.softmax(self._a(losses.shape[0], losses).detach(), dim=0).to(losses.dtype)

    def on_epoch_end(self, mean_losses: Tensor) -> None:
        """Count a finished epoch (the decay ``β = (e + 1)^{-3/4}`` of the moving average of λ)."""
        self._epochs += 1
        self._calls.epoch_ended()

    # -- the look-ahead ------------------------------------------------------------------------------
    def meta_step(self, lookahead: Any) -> None:
        """Compute the step's upper-level gradient, ν and the α gradient (state unchanged until :meth:`decide`)."""
        la = lookahead
        L0 = la.train_losses()
        T = L0.shape[0]
        s = torch.softmax(self._a(T, L0).detach().to(torch.float64), dim=0)
        g_f = la.grads((s.to(L0.dtype) * L0).sum())  # ∇_ω f(α, ω), the lower-level gradient
        L_now = L0.detach().to(torch.float64)
        theta = [p.detach().clone() for p in la.params]
        steps = 0
        for _ in range(self.inner_steps):  # ω^K: plain SGD on f(α, ·) (authors: SGD, weight_decay=0)
            with la.at(theta):
                L = la.train_losses()
                f = (s.to(L.dtype) * L).sum()
                if float(f.detach()) > DIVERGED:
                    break
                g = la.grads(f)
            theta = [(v - self.inner_lr * gg).detach() for v, gg in zip(theta, g)]
            steps += 1
        with la.at(theta):
            L_K = la.train_losses().detach().to(torch.float64)
        J = torch.diag(s) - torch.outer(s, s)  # ∂softmax/∂α (symmetric)
        gq_alpha = J @ (L_now - L_K)  # ∇_α f(α, ω) − ∇_α f(α, ω^K)
        L_val = la.val_losses()
        g_F = [la.grads(L_val[t], retain_graph=t < T - 1) for t in range(T)]
        g_hat = []
        for g in g_F:
            n = math.sqrt(_dot(g, g))
            g_hat.append([x / (n + EPS) for x in g])
        q2 = float(gq_alpha @ gq_alpha) + _dot(g_f, g_f)
        pi = np.array([self.rho - _dot(g_f, g_hat[t]) / (q2 + EPS) for t in range(T)])
        M = np.zeros((T + 1, T + 1))
        for a in range(T):
            for b in range(a, T):
                M[a, b] = M[b, a] = _dot(g_hat[a], g_hat[b])
            M[a, T] = M[T, a] = _dot(g_hat[a], g_f)
        M[T, T] = q2
        w = self._solve(M, pi, self.rho * (q2 + EPS))
        lam_old = (torch.zeros(T, dtype=torch.float64) if self.lam is None  # λ is computed on the CPU in float64
                   else self.lam.detach().to(device="cpu", dtype=torch.float64))
        beta = 1.0 / (self._epochs + 1) ** 0.75
        lam = lam_old + beta * (torch.as_tensor(w[:T]) - lam_old)
        nu = max(float(lam @ torch.as_tensor(pi)), 0.0)
        with torch.no_grad():
            extra = [sum(float(lam[t]) * g_hat[t][k] for t in range(T)) for k in range(len(la.params))]
        values = {"forum/nu": nu, "forum/inner_steps_taken": float(steps), "forum/q_grad_norm": math.sqrt(q2),
                  "forum/beta": beta, **{f"forum/lambda/{t}": float(v) for t, v in enumerate(lam)},
                  **{f"forum/pi/{t}": float(v) for t, v in enumerate(pi)}}
        self._pending = _Pending(s=s, nu=nu, lam=lam, alpha_grad=nu * gq_alpha, params=list(la.params),
                                 extra=extra, values=values, world=int(getattr(la, "world", 1)))

    def _solve(self, M: np.ndarray, pi: np.ndarray, c: float) -> np.ndarray:
        """Problem (14): ``min wᵀMw − c w_{T+1}`` over ``w ≥ 0``, ``Σ_{t≤T} w_t = 1``, ``w_{T+1} ≥ πᵀw_{1..T}``."""
        cp = self._cp
        T = pi.shape[0]
        if not (np.isfinite(M).all() and np.isfinite(pi).all() and math.isfinite(c)):  # a NaN look-ahead loss/grad
            raise NonFiniteError(f"forum: non-finite QP data (Gram diagonal {np.diag(M).tolist()}, π = {pi.tolist()}, "
                                 f"c = {c}): a look-ahead loss or gradient is not finite")
        evals, evecs = np.linalg.eigh(0.5 * (M + M.T))
        R = (evecs * np.sqrt(np.maximum(evals, 0.0))) @ evecs.T  # M^{1/2} (the authors' matrix square root)
        w = cp.Variable(T + 1, nonneg=True)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(R @ w) - c * w[T]),
                          [cp.sum(w[:T]) == 1, w[T] >= pi @ w[:T]])
        try:
            prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-14, tol_gap_rel=1e-10, tol_feas=1e-10)
        except cp.error.SolverError as exc:
            raise SolverError(f"forum: the QP of the upper-level weights failed ({exc}); Gram diagonal "
                              f"{np.diag(M).tolist()}") from exc
        if prob.status not in ("optimal", "optimal_inaccurate") or w.value is None:
            raise SolverError(f"forum: the QP of the upper-level weights ended with status '{prob.status}'; Gram "
                              f"diagonal {np.diag(M).tolist()}, π = {pi.tolist()}")
        out = np.maximum(np.asarray(w.value, dtype=np.float64).reshape(-1), 0.0)
        if not np.isfinite(out).all():
            raise SolverError(f"forum: non-finite QP solution {out.tolist()}")
        # the solver's status is not enough: with ‖g_f‖² ≥ 1e16 Clarabel returned 'optimal' points off the simplex
        # (Σw = 0.69); the constraints are checked here (1e-6, relative to their terms)
        sum_err = abs(float(out[:T].sum()) - 1.0)
        pi_err = float(pi @ out[:T]) - float(out[T])
        if not (sum_err <= 1e-6 and pi_err <= 1e-6 * (1.0 + float(np.abs(pi) @ out[:T]) + abs(float(out[T])))):
            raise SolverError(
                f"forum: not converged: the QP of the upper-level weights returned (status '{prob.status}') a point "
                f"violating its constraints (|Σw − 1| = {sum_err:.1e}, πᵀw − w_(T+1) = {pi_err:.1e}); Gram diagonal "
                f"{np.diag(M).tolist()}, π = {pi.tolist()}, c = {c:.3e}"
            )
        return out

    # -- the step ----------------------------------------------------------------------------------
    def decide(self, grads: TaskGradients) -> Decision:
        """``ν Σ_t softmax(α)_t L_t`` on the step's losses + the look-ahead's ``Σ_t λ_t ĝ_t``; commits α and λ."""
        p = self._pending
        if p is None:
            raise ConfigurationError(
                "forum: meta_step(lookahead) was not called before this step, and FORUM's step is computed there "
                "(its upper-level gradient on an independent batch). Before every mtl_backward call "
                "method.meta_step(mtlens.engine.LookAhead(params, train_losses, val_losses, lr=...)) with the "
                "step's batch and an independent one (the mtlens trainer does it; see docs/methods.md, bilevel)"
            )
        if grads.world != p.world:
            raise ConfigurationError(
                f"forum: the step reduces over {grads.world} data-parallel rank(s) but its look-ahead over {p.world}: "
                "its extra gradient would not be the global batch's. Build the LookAhead with the same process "
                "group as mtl_backward (distributed=...)"
            )
        L = grads.attached_losses()
        T = L.shape[0]
        if p.s.shape[0] != T:
            raise ConfigurationError(f"forum: meta_step saw {p.s.shape[0]} tasks, this step has {T}")
        self._pending = None
        self._calls.weighting_call()
        w = p.nu * p.s
        objective = (w.to(device=L.device, dtype=L.dtype) * L).sum()
        self._a(T, L)
        self._alpha.step(p.alpha_grad)
        self.lam = p.lam.clone()
        self._log = dict(p.values)
        return Decision(weights=w.detach().to(torch.float64), objective=objective,
                        extra_grads=list(zip(p.params, p.extra)), values=self.log_values())

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
