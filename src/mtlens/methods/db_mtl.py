"""DB-MTL: log-transformed losses and EMA task gradients rescaled to the largest norm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..engine.decision import Decision
from ..engine.gramian import combine_blocks
from ..engine.numerics import ZERO_REL
from ..engine.protocols import SCALE_FREE, SYMMETRIC, Claim, JacobianAggregator
from ..errors import ShapeError
from ._registry import register
from ._utils import check, check_block_shapes, in_range, nonzero_rows

if TYPE_CHECKING:
    from ..engine.gradients import TaskGradients


def task_sq_norms(blocks: Sequence[Tensor]) -> Tensor:
    """‖row t‖² summed over all blocks (T,), accumulated in float64."""
    T = blocks[0].shape[0]
    out = torch.zeros(T, dtype=torch.float64, device=blocks[0].device)
    for b in blocks:
        out += b.reshape(T, -1).to(torch.float64).pow(2).sum(1)
    return out


def check_blocks(blocks: Sequence[Tensor], method: str) -> list[Tensor]:
    blocks = list(blocks)
    if not blocks:
        raise ShapeError(f"{method}: got no Jacobian blocks")
    T = blocks[0].shape[0] if blocks[0].ndim >= 1 else 0
    if T < 1 or any(b.ndim < 1 or b.shape[0] != T for b in blocks):
        raise ShapeError(f"{method}: every block needs the same leading task dimension T ≥ 1, got "
                         f"{[tuple(b.shape) for b in blocks]}")
    return blocks


@register
class DBMTL(JacobianAggregator):
    """DB-MTL (Dual-Balancing Multi-Task Learning).

    Reference: Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, "Dual-Balancing for Multi-Task
    Learning", arXiv:2308.12029.

    * Loss-scale balancing: the engine differentiates ``log(L_t + 1e-8)`` (``loss_transform =
      "log"``), so the per-task gradients it passes are ``∇ log L_t``.
    * Gradient-magnitude balancing: an exponential moving average of each task's gradient,
      ``ĝ_t ← β_k ĝ_t + (1 − β_k) g_t`` with ``β_k = β / k^{β_σ}`` at step ``k = 1, 2, ...``
      (``ĝ`` starts at 0, as in LibMTL), and the shared update
      ``d = Σ_t (max_s ‖ĝ_s‖ / ‖ĝ_t‖) ĝ_t`` — every task's EMA gradient rescaled to the
      largest norm. Task-specific (head) parameters get ``∇ log L_t`` with weight 1 (as in
      LibMTL); the decision's ``weights`` are the ratios ``max_s ‖ĝ_s‖ / ‖ĝ_t‖`` (logged).

    Hyper-parameters (defaults): ``beta=0.9``, ``beta_sigma=0.9`` (the project spec's values;
    note LibMTL's command-line default is ``DB_beta_sigma = 0``, a constant ``β_k = 0.9``).
    The ratio uses no additive epsilon (LibMTL adds 1e-8 to the norm, which breaks the ratio
    for gradients of norm ≲ 1e-8); a zero EMA gradient gets ratio 0.

    Parameter level only (``levels = ("param",)``, as LibMTL, which refuses representation
    gradients for DB-MTL): an EMA of representation gradients would average the saliencies of
    unrelated samples that happen to share a batch position.

    Stateful: the EMA blocks and the step count are in ``state_dict()``. The EMA is tied to the
    shapes of the Jacobian blocks: a call with different shapes raises :class:`ShapeError`
    (call :meth:`reset` to start a new EMA deliberately).
    """

    name = "db_mtl"
    levels = ("param",)
    reference = "Lin et al., Dual-Balancing for Multi-Task Learning, arXiv:2308.12029"
    defaults_source = "beta = beta_sigma = 0.9 (project spec); beta_k = beta / k^beta_sigma as in LibMTL"
    loss_transform = "log"
    loss_transforms = ("log",)
    loss_transform_conflict = "DB-MTL's loss-scale balancing is its log transform (Sec. 3.1 of the paper)"
    stateful = True
    state_attrs = ("_step", "_ema")
    head_rule = "own gradient of log L_t, unit weights (LibMTL)"

    claims = {
        "permutation_invariant": SYMMETRIC,
        "homogeneous": SCALE_FREE,
        "rescaling_invariant": Claim("Lin et al., arXiv:2308.12029: every (EMA) gradient is rescaled to the "
                                     "largest norm"),
    }

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.9) -> None:
        self.beta = in_range("beta", beta, 0.0, 1.0, self.name)
        check(self.beta < 1.0, f"{self.name}: beta must be < 1 (beta = 1 never updates the EMA)")
        self.beta_sigma = in_range("beta_sigma", beta_sigma, 0.0, 100.0, self.name)
        self.reset()

    def reset(self) -> None:
        """Forget the EMA gradients and restart the step count."""
        self._step = 0
        self._ema: list[Tensor] | None = None
        self.last_weights: Tensor | None = None

    def decide(self, grads: TaskGradients) -> Decision:
        combined, head_w = self.aggregate(grads.jacobian_blocks(), grads.objective_losses)
        assert self.last_weights is not None  # aggregate() sets them
        return Decision(combined=combined, head_weights=head_w, weights=self.last_weights.to(torch.float64).cpu(),
                        values=self.log_values())

    def aggregate(self, jacobian: Sequence[Tensor], losses: Tensor) -> tuple[list[Tensor], Tensor]:
        blocks = check_blocks(jacobian, self.name)
        T = blocks[0].shape[0]
        if self._ema is not None:
            check_block_shapes(self._ema, blocks, self.name,
                               "the EMA gradients no longer match the parameters. Use one instance per model and "
                               "gradient level, or call reset() to start a new EMA.")
        else:
            self._ema = [torch.zeros_like(b) for b in blocks]
        self._step += 1
        beta_k = self.beta / self._step ** self.beta_sigma
        self._ema = [g + beta_k * (e.to(g.device, g.dtype) - g) for e, g in zip(self._ema, blocks)]
        sq = task_sq_norms(self._ema)
        big, live = nonzero_rows(sq, ZERO_REL)
        ratio = torch.where(live, (big / sq.clamp_min(1e-300)).sqrt(), torch.zeros_like(sq))
        self.last_weights = ratio
        combined = combine_blocks(ratio, self._ema)
        return combined, torch.ones(T, dtype=torch.float64)

    def log_values(self) -> dict[str, float]:
        return {"db_mtl/beta_k": self.beta / max(self._step, 1) ** self.beta_sigma}
