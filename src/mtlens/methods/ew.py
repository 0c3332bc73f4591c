"""Equal weighting (EW): ``L = Σ_t L_t``, the baseline every MTL paper compares against."""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.protocols import SYMMETRIC, Claim, LossWeighting
from ._registry import register


@register
class EW(LossWeighting):
    """Equal weighting: every task weight is 1 (the sum of the losses).

    Reference: the standard multi-task baseline (e.g. Caruana 1997; "EW" in LibMTL).
    No hyper-parameters.
    """

    name = "ew"
    constant_weights = True
    weighted_sum_objective = True
    reference = "Equal weighting baseline (Caruana, Machine Learning 1997)"

    claims = {
        "permutation_invariant": SYMMETRIC,
        "weights_total": Claim("unit weights", total="T"),
    }

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        return torch.ones_like(losses)

    def combine(self, losses: Tensor, grad_norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(Σ_t L_t, ones(T))``; the weights as the engine records them (float64, on the CPU), built
        directly: no conversion or device copy in the step. A fresh tensor every call, copied from a
        ones vector kept per ``T`` (a copy costs about half of ``torch.ones`` inside a training loop,
        docs/performance.md); the kept vector itself is never handed out."""
        T = len(losses)
        unit = _UNIT.get(T)
        if unit is None:
            unit = _UNIT[T] = torch.ones(T, dtype=torch.float64)
        return losses.sum(), unit.clone()


_UNIT: dict[int, Tensor] = {}
