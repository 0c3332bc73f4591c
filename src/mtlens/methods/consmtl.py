"""ConsMTL: FairGrad-type aggregation on the shared parameters and a consistency term on the heads."""

from __future__ import annotations

import functools
import math
import operator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..engine.decision import Decision
from ..engine.protocols import SYMMETRIC, Claim, GramianWeighting
from ..errors import ConfigurationError, SolverError
from ._fair import check_infeasible, check_max_norm, clip_update, solve_power_system
from ._registry import register
from ._solvers import check_gramian, to_weights
from ._utils import check

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.gradients import TaskGradients


def _nonneg(name: str, value: float, method: str) -> float:
    check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0,
          f"{method}: {name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


@register
class ConsMTL(GramianWeighting):
    """ConsMTL: shared update ``T Σ_t x_t g_t`` with ``G x = x^{-1/2}``; heads add ``−λ ∇_{θ_t}⟨S_t, δ⟩``.

    Reference: Qin, Wang & Yan, "Towards Consistent Multi-Task Learning: Unlocking the Potential
    of Task-Specific Parameters", CVPR 2025, pp. 10067–10076 (doi:10.1109/CVPR52734.2025.00941).
    The paper states a bi-level problem: the upper level aggregates the shared parameters'
    gradients into a joint update that minimises conflict; the lower level adds a loss on the
    task-specific parameters that steers each task's gradient towards that joint update. We follow
    the authors' code for both levels (``ConsMTL`` in ``methods/weight_methods.py`` of
    github.com/jianke0604/MTLlib; the same file in github.com/jianke0604/NTKMTL), as the paper's
    text was not available to us:

    * **shared parameters**: ``x > 0`` solving ``G x = x^{-1/2}`` (the FairGrad system with
      α = 2; the authors call ``scipy.optimize.least_squares`` from ``x = 1/T``, we solve it and
      certify it as PIVRG and FairGrad do, :func:`~mtlens.methods._fair.solve_power_system`), the
      update ``d = T Σ_t x_t g_t`` (their ``overwrite_grad``: "to match the sum loss"), its norm
      clipped at ``max_norm``;
    * **heads**: with ``δ = Σ_t x_t S_t`` (detached; ``S_t = ∂L_t/∂Z`` the saliency of task t on
      the representation the heads read, ``x`` before the ×T scaling and the clipping, as in their
      code), task t's head ``θ_t`` receives ``g1_t + c_t g2_t`` where ``g1_t = ∇_{θ_t} L_t`` (its own
      gradient, unit weight), ``g2_t = ∇_{θ_t}(−λ ⟨S_t, δ⟩)`` (second order through the head: the
      engine keeps the saliencies' graph, ``needs_saliency_graph``) and
      ``c_t = min(1, head_clip · ‖g1_t‖ / ‖g2_t‖)`` (their ``clip_grad_norm_(θ_t, 0.1 ‖g1_t‖)``;
      torch adds 1e-6 to ‖g2_t‖ there, an absolute constant we leave out so that the rule is scale
      free). ``θ_t`` are the task-specific parameters task t's loss reaches (the authors slice the
      head parameter list into T equal parts).

    Several shared maps ``features=[Z_1, Z_2]``: ``⟨S_t, δ⟩`` sums over the maps. Multi-input
    (``features={task: Z_task}``): each task's representation is its own coordinate block (as for
    the engine's block-diagonal Gramian), so ``⟨S_t, δ⟩ = x_t ‖S_t‖²``. Data parallelism: exact —
    ``g1``, ``g2`` are reduced to the global batch's (``g2`` of the global mean loss is the mean of
    the ranks' ``g2`` divided by the number of ranks) before the clipping; with the log transform it
    raises (the derivative of ``log L̄`` couples the ranks). Gradient accumulation: exact
    (:meth:`TaskGradients.accumulate` concatenates the attached saliencies). With
    ``loss_transform="log"`` the saliencies and ``g1`` are those of the log losses (the heads'
    objective). Cost over PIVRG's: the heads' backward with ``create_graph`` and one more head
    backward per task. Needs ``features`` (the representation the heads read).

    Hyper-parameters (defaults, the authors' ``experiments/utils.py`` and ``weight_methods.py``):
    ``lambda_=1.0`` (``--lambda_``), ``max_norm=1.0`` (``--max_norm``), ``head_clip=0.1`` (the
    constant in their ``clip_grad_norm_`` call); ``infeasible="raise"`` as our FairGrad and PIVRG (no
    positive solution exists when no direction improves every task; ``"least_squares"`` takes the
    authors' silent least-squares point).
    """

    name = "consmtl"
    reference = ("Qin, Wang & Yan, Towards Consistent Multi-Task Learning: Unlocking the Potential of Task-Specific "
                 "Parameters (ConsMTL), CVPR 2025")
    defaults_source = "lambda_ = 1.0, max_norm = 1.0, head_clip = 0.1, ×T (authors' code, MTLlib/NTKMTL repositories)"
    needs_saliency_graph = True
    adds_gradients = True
    head_rule = ("own gradient (unit weight) plus the consistency term −λ∇_θt⟨S_t, δ⟩, δ = Σ x_s S_s, its norm "
                 "clipped at head_clip·‖own gradient‖ (authors' code)")

    claims = {
        "permutation_invariant": SYMMETRIC,
        "non_conflicting": Claim("solves G x = x^(-1/2) > 0 (as PIVRG), so g_t·d > 0", when="common_descent"),
    }
    disclaims = {
        "homogeneous": "max_norm = 1 clips the update (authors' code): absolute; with λ = 0 it equals PIVRG",
    }
    failures = {
        "no_common_descent": (SolverError, "G x = x^(-1/2) has no positive solution when no direction improves every "
                                           "task"),
    }

    def __init__(self, lambda_: float = 1.0, max_norm: float = 1.0, head_clip: float = 0.1,
                 infeasible: str = "raise") -> None:
        self.lambda_ = _nonneg("lambda_", lambda_, self.name)
        self.max_norm = check_max_norm(max_norm, self.name)
        self.head_clip = _nonneg("head_clip", head_clip, self.name)
        self.infeasible = check_infeasible(infeasible, self.name)
        self._x: np.ndarray | None = None
        self._log: dict[str, float] = {}

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """The shared weights ``T x`` (clipped at ``max_norm``), ``G x = x^{-1/2}``; (T,) float64."""
        G, _ = check_gramian(gramian, losses, self.name)
        T = G.shape[0]
        x, info = solve_power_system(G, np.ones(T), 2.0, method=self.name, infeasible=self.infeasible)
        self._x = x
        w, clip = clip_update(T * x, G, self.max_norm)
        self._log = {f"consmtl/{k}": v for k, v in {**info, **clip}.items()}
        return to_weights(w, gramian)

    def head_weights(self, weights: Tensor) -> Tensor:
        """Every head gets its own loss gradient at weight 1; the consistency term comes on top."""
        return torch.ones_like(weights)

    def decide(self, grads: TaskGradients) -> Decision:
        """Shared weights from the Gramian; the heads' consistency gradients as ``extra_grads``."""
        sal = grads.attached_saliencies()  # raises, naming features=Z, before any solve
        w = self.weights(grads.gramian(), grads.objective_losses)
        w = torch.as_tensor(w).detach().to(torch.float64).reshape(-1)
        extra = self._head_terms(grads, sal) if self.lambda_ > 0 else []
        return Decision(weights=w, head_weights=self.head_weights(w), extra_grads=extra, values=self.log_values())

    def _head_terms(self, grads: TaskGradients, sal: list[list[Tensor]]) -> list[tuple[Tensor, Tensor]]:
        assert self._x is not None
        x = [float(v) for v in self._x]
        T, heads, W = grads.T, grads.task_params, grads.world
        if W > 1 and grads.loss_transform == "log":
            raise ConfigurationError(
                "consmtl: with loss_transform='log' under data parallelism its head term would not be the global "
                "batch's (the derivative of log L̄ couples the ranks' saliencies); use loss_transform='none' or "
                "train in one process"
            )
        multi = grads.multi_input
        if not multi:
            n_maps = len(sal[0])
            delta = [sum(x[t] * sal[t][m].detach() for t in range(T)) for m in range(n_maps)]
        total: dict[int, Tensor] = {}
        clipped = 0
        consistency = 0.0
        for i in range(T):
            idx = [j for j, r in enumerate(grads.head_rows[i]) if r is not None]
            if not idx:
                continue
            if multi:  # task i's own block of the joint representation: ⟨S_i, x_i S_i⟩
                inner = x[i] * (sal[i][0] * sal[i][0].detach()).sum()
            else:
                inner = functools.reduce(operator.add, ((s * d).sum() for s, d in zip(sal[i], delta)))
            consistency += float(inner.detach())
            params = [heads[j] for j in idx]
            g2: list[Tensor]
            if inner.requires_grad:
                raw = torch.autograd.grad(-self.lambda_ * inner, params, retain_graph=True, allow_unused=True)
                g2 = [torch.zeros_like(p) if g is None else g for g, p in zip(raw, params)]
            else:  # the saliency does not depend on this head (a head and loss linear in it)
                g2 = [torch.zeros_like(p) for p in params]
            g1 = [r for j in idx if (r := grads.head_rows[i][j]) is not None]  # idx: the non-None rows
            if W > 1:  # the global batch's: g2 of the mean loss is the ranks' mean / W (its saliency is S_r / W)
                g2 = [g / W for g in grads.reduce_mean(g2) if g is not None]  # no None in, none out
                g1 = [g for g in grads.reduce_mean(g1) if g is not None]
            n1 = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g1))
            n2 = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g2))
            coef = 1.0
            if n2 > self.head_clip * n1:
                coef = self.head_clip * n1 / n2
                clipped += 1
            for j, g in zip(idx, g2):
                g = g.detach() * coef
                total[j] = g if j not in total else total[j] + g
        self._log.update({"consmtl/heads_clipped": float(clipped), "consmtl/consistency": consistency / max(W, 1)})
        return [(heads[j], g) for j, g in total.items()]

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
