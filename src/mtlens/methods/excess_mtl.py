"""ExcessMTL: task weights from excess-risk estimates (diagonal AdaGrad Hessian), exponentiated updates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..engine.decision import Decision
from ..engine.protocols import SYMMETRIC, JacobianAggregator
from ..errors import NonFiniteError, ShapeError
from ._loss_common import check_int
from ._registry import register
from ._utils import positive

if TYPE_CHECKING:
    from ..engine.gradients import TaskGradients


@register
class ExcessMTL(JacobianAggregator):
    """ExcessMTL: ``w ∝ w·exp(η·ER_t/ER_t(0))`` with ``ER_t = g_tᵀ diag(√(Σ_τ g_{t,τ}² + ε))⁻¹ g_t``.

    Reference: He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024,
    arXiv:2402.02009. The excess risk of task t is estimated by a second-order Taylor expansion
    whose Hessian is approximated by the diagonal AdaGrad accumulator of the task's own
    gradients on the shared parameters (Eq. 6-7); the weights follow an exponentiated-gradient
    ascent step on the excess risks (Eq. 9), normalised by their baseline value ``ER_t(0)`` (the paper's scale
    normalisation) and renormalised to sum to T (the official code; the paper's
    simplex weights times T). The update is ``Σ_t w_t g_t`` with the weights of this step.

    It needs the elementwise squares of each task's gradient, accumulated over steps, so it is a
    Jacobian aggregator at parameter level only (the Taylor expansion lives in parameter space;
    a feature-level Jacobian changes with every batch). Memory: one accumulator of the size of
    the shared parameters per task.

    Defaults: ``robust_step_size = 1e-2`` (η, the official code's default), ``baseline_steps = 1``
    (the first step's excess risks are the baseline and its weights are 1, as in the official
    code; the paper's Appendix C.1 suggests averaging over about three epochs), ``eps = 1e-7``
    (official code).
    """

    name = "excess_mtl"
    task_weights: Tensor | None  # buffers
    baseline_sum: Tensor | None
    baseline: Tensor | None
    levels = ("param",)
    reference = "He et al., Robust Multi-Task Learning with Excess Risks, ICML 2024, arXiv:2402.02009"
    defaults_source = "robust_step_size 1e-2, eps 1e-7, baseline = first step (official code)"
    stateful = True
    state_attrs = ("_grad_sq", "_steps")
    head_rule = "own gradient, unit weights (default rule: the weighting concerns the shared parameters)"

    claims = {
        "permutation_invariant": SYMMETRIC,
    }
    disclaims = {
        "homogeneous": "eps = 1e-7 in the AdaGrad denominator (official code) is absolute",
    }
    failures = {
        "zero_gradient": (NonFiniteError, "ER_t / ER_t(0) is undefined when a task's baseline gradient is zero"),
    }

    def __init__(self, robust_step_size: float = 1e-2, baseline_steps: int = 1, eps: float = 1e-7):
        self.robust_step_size = positive("robust_step_size", robust_step_size, "excess_mtl")
        self.baseline_steps = check_int("baseline_steps", baseline_steps, 1, "excess_mtl")
        self.eps = positive("eps", eps, "excess_mtl")
        self._grad_sq: list[Tensor] | None = None
        self.register_buffer("task_weights", None)  # float64, sums to T
        self.register_buffer("baseline_sum", None)
        self.register_buffer("baseline", None)
        self._steps = 0
        self.last_weights: Tensor | None = None
        self._last_er: Tensor | None = None

    def excess_risks(self, jacobian: Sequence[Tensor]) -> Tensor:
        """Accumulate the squared gradients and return the excess-risk estimates (T,) of this step."""
        blocks = [b.detach() for b in jacobian]
        if not blocks:
            raise ShapeError("excess_mtl: got an empty Jacobian (no shared parameters)")
        T = blocks[0].shape[0]
        if self._grad_sq is None:
            # float64 whatever the parameters' dtype: squared gradients summed over steps overflow
            # float16 (and float32 for large gradients) and would store an inf/NaN baseline
            self._grad_sq = [torch.zeros_like(b, dtype=torch.float64) for b in blocks]
        acc_shapes = [a.shape for a in self._grad_sq]
        if acc_shapes != [b.shape for b in blocks]:
            raise ShapeError(
                "excess_mtl: the Jacobian blocks changed shape between steps "
                f"({[tuple(a.shape) for a in self._grad_sq]} → {[tuple(b.shape) for b in blocks]}); its "
                "accumulators are per shared parameter and per task"
            )
        er = torch.zeros(T, dtype=torch.float64, device=blocks[0].device)
        for acc, b in zip(self._grad_sq, blocks):
            b2 = b.to(torch.float64).pow(2)
            acc.add_(b2)
            er += (b2 / torch.sqrt(acc + self.eps)).reshape(T, -1).sum(1)
        if not bool(torch.isfinite(er).all()):
            raise NonFiniteError(
                f"excess_mtl: non-finite excess-risk estimate {er.tolist()} (per-task gradients beyond float64 "
                "range?); the step was not taken and the accumulators were left as before"
            )
        return er

    def decide(self, grads: TaskGradients) -> Decision:
        combined, head_w = self.aggregate(grads.jacobian_blocks(), grads.objective_losses)
        assert self.task_weights is not None  # aggregate() sets them
        return Decision(combined=combined, head_weights=head_w, weights=self.task_weights.clone(),
                        values=self.log_values())

    def aggregate(self, jacobian: Sequence[Tensor], losses: Tensor) -> tuple[list[Tensor], Tensor]:
        blocks = [b.detach() for b in jacobian]
        er = self.excess_risks(blocks)
        T = er.shape[0]
        if self.task_weights is None:
            self.task_weights = torch.ones(T, dtype=torch.float64, device=er.device)
        self._steps += 1
        if self.baseline is None:
            self.baseline_sum = er.clone() if self.baseline_sum is None else self.baseline_sum + er
            if self._steps >= self.baseline_steps:
                base = self.baseline_sum / self.baseline_steps
                if bool((base <= 0).any()):
                    raise NonFiniteError(
                        f"excess_mtl: baseline excess risk {base.tolist()} has a zero entry (that task's "
                        "gradient on the shared parameters was zero during the baseline steps), so "
                        "ER_t/ER_t(0) is undefined; raise baseline_steps or check that every task reaches "
                        "the shared parameters"
                    )
                self.baseline = base
        else:
            logits = torch.log(self.task_weights) + self.robust_step_size * er / self.baseline.to(er.device)
            self.task_weights = T * torch.softmax(logits, dim=0)
        self._last_er = er
        w = self.task_weights
        self.last_weights = w.clone()
        combined = [torch.tensordot(w.to(b.dtype), b, dims=1) for b in blocks]
        return combined, torch.ones(T, dtype=torch.float64)

    def log_values(self) -> dict[str, float]:
        if self._last_er is None:
            return {}
        return {f"excess_risk/{i}": float(v) for i, v in enumerate(self._last_er.cpu())}
