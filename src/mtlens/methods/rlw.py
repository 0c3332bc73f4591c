"""Random loss weighting (RLW): fresh weights ``softmax(z)``, ``z ~ N(0, I)``, at every step."""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.protocols import Claim, LossWeighting
from ._registry import register
from ._utils import Seeded


@register
class RLW(Seeded, LossWeighting):
    """Random loss weighting: ``w = softmax(z)`` with ``z ~ N(0, I_T)`` drawn anew at every call.

    Reference: Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning", TMLR 2022, arXiv:2111.10603 (the normal-distribution variant the paper
    and LibMTL use by default). The weights sum to 1 (not T, as EW's do), as in the paper.

    Defaults: ``seed = None`` (a seed drawn from torch's global RNG). The draws come from the
    method's own ``torch.Generator`` (:class:`~mtlens.methods._utils.Seeded`), whose state is in
    :meth:`state_dict`, so a resumed run draws the same weights as an uninterrupted one.
    """

    name = "rlw"
    reference = "Lin et al., Reasonable Effectiveness of Random Weighting, TMLR 2022, arXiv:2111.10603"
    defaults_source = "z ~ N(0, I), weights softmax(z) (paper, LibMTL)"
    stateful = True

    claims = {
        "weights_total": Claim("Lin et al., TMLR 2022: softmax of normal draws", total="1"),
    }

    def __init__(self, seed: int | None = None):
        self._seed(seed)

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        z = torch.randn(losses.shape[0], generator=self.generator, dtype=torch.float64)
        return torch.softmax(z, dim=0).to(device=losses.device, dtype=losses.dtype)
