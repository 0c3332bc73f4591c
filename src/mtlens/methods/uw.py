"""Uncertainty weighting (UW): learnable homoscedastic log-variances, ``Σ ½e^{-s_t} L_t + ½ s_t``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.protocols import Claim, LossWeighting
from ._loss_common import learnable_scalars
from ._registry import register


@register
class UW(LossWeighting):
    """Uncertainty weighting: ``Σ_t ½·exp(-s_t)·L_t + ½·s_t`` with learnable ``s_t = log σ_t²``.

    Reference: Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses
    for Scene Geometry and Semantics", CVPR 2018, arXiv:1705.07115. The regression form of the
    paper's objective (factor ½ on both terms) is used for every task, as LibMTL and the
    Nash-MTL/FAMO codes do.

    The log-variances are learnable tensors returned by :meth:`parameters`: add them to your
    optimiser (``torch.optim.Adam(list(model.parameters()) + method.parameters())``). Pass
    ``num_tasks`` (and ``device``) to create them before building the optimiser; otherwise they
    are created on the first call, on the losses' device, with a warning. An optimiser that
    keeps stepping without them raises :class:`~mtlens.errors.ConfigurationError` (two steps in
    a row). Not defined for log-transformed losses (``loss_transforms = ("none",)``).

    Defaults: ``init = 0.0`` (σ² = 1, the paper's implicit start; LibMTL starts at -0.5).
    The logged weights are ``∂objective/∂L_t = ½·exp(-s_t)``.
    """

    name = "uw"
    reference = "Kendall et al., CVPR 2018, arXiv:1705.07115"
    defaults_source = "init 0 (σ²=1); ½-form of the objective as in LibMTL"
    stateful = True
    user_calls = ("parameters",)
    loss_transforms = ("none",)
    loss_transform_conflict = (
        "its objective Σ_t ½·exp(-s_t)·L_t + ½·s_t has no minimum over s_t when L_t < 0, and log-transformed "
        "losses log(L_t + 1e-8) are negative whenever L_t < 1, so the weights ½·exp(-s_t) grow without bound"
    )

    claims = {
        "permutation_invariant": Claim("equal initial log-variances; the objective treats the tasks alike"),
    }

    def __init__(self, init: float = 0.0, num_tasks: int | None = None, device: str | None = None):
        self._s = learnable_scalars(self, "log_vars", "log-variance", init, num_tasks, device)  # parameter log_vars

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        s = self._s.get(losses)
        return (0.5 * torch.exp(-s.detach())).to(losses.dtype)

    def combine(self, losses: Tensor, grad_norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._s.check()
        s = self._s.get(losses)
        w = 0.5 * torch.exp(-s)
        objective = (w * losses).sum() + 0.5 * s.sum()
        return objective, w.detach().to(losses.dtype)

    def log_values(self) -> dict[str, float]:
        return self._s.log_values("log_var")
