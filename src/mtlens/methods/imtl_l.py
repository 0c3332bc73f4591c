"""IMTL-L: the loss-balancing half of IMTL, ``Σ e^{s_t} L_t − s_t`` with learnable scales ``s``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.protocols import Claim, LossWeighting
from ._loss_common import learnable_scalars
from ._registry import register


@register
class IMTLL(LossWeighting):
    """IMTL-L: learnable loss scales, objective ``Σ_t e^{s_t}·L_t − s_t``.

    Reference: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021
    (openreview.net/forum?id=IMPnRXEWpvr; no arXiv version). Minimising over ``s_t`` drives
    ``e^{s_t}·L_t`` towards 1 for every task, so the scaled losses stay balanced. The scales are
    learnable tensors returned by :meth:`parameters` (add them to your optimiser); pass
    ``num_tasks`` (and ``device``) to create them before building the optimiser; an optimiser
    that keeps stepping without them raises :class:`~mtlens.errors.ConfigurationError`. Not
    defined for log-transformed losses (``loss_transforms = ("none",)``).

    Defaults: ``init = 0.0`` (all scales 1), as in the paper's Algorithm 1 and LibMTL.
    The logged weights are ``∂objective/∂L_t = e^{s_t}``.
    """

    name = "imtl_l"
    reference = "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021 (IMTL-L)"
    defaults_source = "s initialised to 0 (paper Alg. 1, LibMTL)"
    stateful = True
    user_calls = ("parameters",)
    loss_transforms = ("none",)
    loss_transform_conflict = (
        "its objective Σ_t e^{s_t}·L_t − s_t has no minimum over s_t when L_t ≤ 0, and log-transformed losses "
        "log(L_t + 1e-8) are negative whenever L_t < 1, so the scales e^{s_t} grow without bound"
    )

    claims = {
        "permutation_invariant": Claim("equal initial scales; the objective treats the tasks alike"),
    }

    def __init__(self, init: float = 0.0, num_tasks: int | None = None, device: str | None = None):
        self._s = learnable_scalars(self, "log_scales", "log-scale", init, num_tasks, device)  # parameter log_scales

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        return torch.exp(self._s.get(losses).detach()).to(losses.dtype)

    def combine(self, losses: Tensor, grad_norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._s.check()
        s = self._s.get(losses)
        w = torch.exp(s)
        return (w * losses).sum() - s.sum(), w.detach().to(losses.dtype)

    def log_values(self) -> dict[str, float]:
        return self._s.log_values("log_scale")
