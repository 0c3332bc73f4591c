"""Geometric loss strategy (GLS): minimise the geometric mean of the task losses."""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.protocols import SYMMETRIC, Claim, LossWeighting
from ..errors import ConfigurationError, NonFiniteError
from ._registry import register


def _check_positive(losses: Tensor) -> None:
    v = losses.detach()
    if bool((v < 0).any()):
        raise ConfigurationError(
            f"gls: the geometric mean needs non-negative losses, got {v.tolist()}; GLS does not apply to "
            "losses that can be negative (e.g. negative log-likelihoods of continuous densities)"
        )
    if bool((v == 0).any()):
        raise NonFiniteError(
            f"gls: a task loss is exactly 0 ({v.tolist()}): the geometric mean's gradient "
            "∂(Π L)^{1/T}/∂L_t = G/(T·L_t) is undefined there; nothing was computed"
        )


@register
class GLS(LossWeighting):
    """Geometric loss strategy: objective ``(Π_t L_t)^{1/T}``, computed as ``exp(mean_t log L_t)``.

    Reference: Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and Geometric
    Loss Strategy for Multi-Task Learning", CVPR Workshops 2019, arXiv:1904.08492.
    No hyper-parameters. The logged weights are ``∂objective/∂L_t = G / (T·L_t)`` where ``G`` is
    the geometric mean; losses must be strictly positive.
    """

    name = "gls"
    reference = "Chennupati et al., MultiNet++, CVPRW 2019, arXiv:1904.08492"
    defaults_source = "no hyper-parameters"
    loss_transforms = ("none",)
    loss_transform_conflict = (
        "its geometric mean (Π_t L_t)^{1/T} needs positive losses, and log-transformed losses log(L_t + 1e-8) "
        "are negative whenever L_t < 1 (GLS already equals a sum of log losses in its gradient direction)"
    )

    claims = {
        "permutation_invariant": SYMMETRIC,
        "rescaling_invariant": Claim("the gradient of the geometric mean, Σ_t GM/(T L_t) ∇L_t: rescaling a loss "
                                     "rescales GM only"),
    }

    @staticmethod
    def objective(losses: Tensor) -> Tensor:
        _check_positive(losses)
        return torch.exp(torch.log(losses).mean())

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        _check_positive(losses)
        g = torch.exp(torch.log(losses.detach()).mean())
        return g / (losses.shape[0] * losses.detach())

    def combine(self, losses: Tensor, grad_norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.objective(losses), self.weights(losses)
