"""Random gradient weighting (RGW): a random convex combination of the task gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.protocols import SCALE_FREE, GramianWeighting
from ._qp import check_gramian
from ._registry import register
from ._utils import Seeded


@register
class RGW(Seeded, GramianWeighting):
    """Random gradient weighting: ``w = softmax(ε)``, ``ε ~ N(0, I_T)`` drawn at every step.

    Reference: Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus
    Test for Multi-Task Learning", arXiv:2111.10603 (TMLR 2022), the gradient variant of RLW
    (Algorithm 2; TorchJD's ``Random``, LibMTL's ``RGW``). The update is ``Σ_t w_t g_t``; the
    weights ignore the Gramian.

    Hyper-parameters (defaults): ``seed=None`` (a fresh seed from torch's global generator;
    pass an int for reproducible draws). The generator state round-trips through
    ``state_dict()``. Weights sum to 1 (softmax), as in the paper.
    """

    name = "rgw"
    reference = "Lin et al., Reasonable Effectiveness of Random Weighting, arXiv:2111.10603"
    defaults_source = "standard-normal logits and softmax as in the paper (Algorithm 2)"
    stateful = True

    claims = {
        "homogeneous": SCALE_FREE,
    }

    def __init__(self, seed: int | None = None) -> None:
        self._seed(seed)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        T = check_gramian(gramian, self.name)
        eps = torch.randn(T, generator=self.generator, dtype=torch.float64)
        return torch.softmax(eps, dim=0).to(gramian.device)
