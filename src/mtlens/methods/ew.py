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
        directly: no conversion or device copy in the step."""
        return losses.sum(), torch.ones(losses.shape[0], dtype=torch.float64)
