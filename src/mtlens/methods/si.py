"""Scale-invariant linear scalarisation (SI): equal weights on the log losses."""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.protocols import SYMMETRIC, LossWeighting
from ._registry import register


@register
class SI(LossWeighting):
    """Scale-invariant loss: ``Σ_t log L_t`` (equal weights on log-transformed losses).

    Reference: the "SI" baseline of Navon et al., "Multi-Task Learning as a Bargaining Game"
    (Nash-MTL), ICML 2022, arXiv:2202.01017, Sec. 6 and their ``ScaleInvariantLinearScalarization``
    (``torch.sum(torch.log(losses) * task_weights)`` with unit weights); also printed by FAMO
    (arXiv:2306.03792) and NTKMTL (arXiv:2510.18258). Multiplying a task's loss by a constant adds
    a constant to its log, so the update does not depend on the scale of any loss:
    ``∇ log L_t = ∇L_t / L_t``.

    The engine applies the log (``loss_transform = "log"``: ``log(L_t + 1e-8)``, the same
    transform as DB-MTL; the ``1e-8`` keeps a zero loss finite and is ours, the Nash-MTL code
    takes ``log(L_t)``). The losses must be non-negative (ConfigurationError otherwise).
    No hyper-parameters; the weights are 1.
    """

    name = "si"
    reference = "Navon et al., Multi-Task Learning as a Bargaining Game (SI baseline), ICML 2022, arXiv:2202.01017"
    defaults_source = "no hyper-parameters (Nash-MTL's ScaleInvariantLinearScalarization)"
    loss_transform = "log"

    claims = {
        "permutation_invariant": SYMMETRIC,
    }

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        return torch.ones_like(losses)

    def combine(self, losses: Tensor, grad_norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return losses.sum(), torch.ones_like(losses.detach())
