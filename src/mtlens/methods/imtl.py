"""IMTL (hybrid): IMTL-L learnable loss scales + IMTL-G gradient balance."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..engine.decision import Decision
from ..engine.protocols import SCALE_FREE, SYMMETRIC, GramianWeighting
from ..errors import ConfigurationError, ShapeError
from ._loss_common import InternalOptimizer
from ._registry import register
from ._solvers import check_gramian, to_weights
from ._utils import positive

if TYPE_CHECKING:
    from ..engine.gradients import TaskGradients
from .imtl_g import imtl_g_weights

OPTIMIZERS = ("adam", "sgd")


@register
class IMTL(GramianWeighting):
    """IMTL: loss scales ``e^{s_t}`` learnt by IMTL-L, shared update balanced by IMTL-G.

    Reference: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (OpenReview
    IMPnRXEWpvr; no arXiv version), the hybrid "IMTL" of Sec. 3.3 / Algorithm 1.

    Each step, with the current log-scales s (start at 0):

    1. the scaled losses ``e^{s_t} L_t`` have gradients ``e^{s_t} g_t``, i.e. the Gramian
       ``D G D`` with ``D = diag(e^{s})``; IMTL-G on it gives α (Σα = 1);
    2. the returned weights are ``w_t = α_t e^{s_t}`` (the update ``Σ_t α_t e^{s_t} g_t``);
    3. s takes one step of the method's own optimiser on the IMTL-L objective
       ``Σ_t e^{s_t} L_t − s_t`` (gradient ``e^{s_t} L_t − 1``; its minimiser is
       ``s_t = −log L_t``, i.e. scaled losses equal to 1).

    In the paper s is trained jointly with the network by the model's optimiser. Here the
    engine owns no method parameters for gradient methods, so s has an internal optimiser:
    default Adam with lr 1e-4, the optimiser and rate of the common NYUv2/Cityscapes protocol
    (LibMTL, which puts s in the model's Adam at lr 1e-4). Set ``lr`` (and ``optimizer``) to
    match your model's optimiser to reproduce the paper's joint training.

    Heads: the paper updates head t with the gradient of ``e^{s_t}L_t − s_t``, i.e. weight
    ``e^{s_t}`` (``head_rule``); :meth:`decide` returns these head weights with the shared ones.
    Since IMTL-G is scale invariant, the shared update direction equals IMTL-G's; s changes its
    magnitude and the heads' weights.

    Args:
        lr: learning rate of the internal optimiser of s (> 0). Default 1e-4 (see above).
        optimizer: ``"adam"`` (default; ``torch.optim.Adam``, betas (0.9, 0.999), eps 1e-8) or
            ``"sgd"`` (plain ``torch.optim.SGD``).

    Losses must be non-negative (``e^{s}L − s`` has no minimiser for L < 0, e.g. after a log
    transform): a ConfigurationError otherwise. State: s (buffer ``log_scales``, float64) and the
    internal optimiser's state.
    """

    name = "imtl"
    log_scales: Tensor | None  # buffer
    reference = ("Liu et al., Towards Impartial Multi-task Learning, ICLR 2021 "
                 "(openreview.net/forum?id=IMPnRXEWpvr)")
    defaults_source = "s0 = 0; internal Adam(lr=1e-4) as the NYUv2 protocol's optimiser (LibMTL)"
    stateful = True
    state_attrs = ("_s",)
    head_rule = "the IMTL-L loss scales e^{s_t} (paper, Sec. 3.3: heads train on e^{s_t} L_t)"
    loss_transforms = ("none",)
    loss_transform_conflict = (
        "its IMTL-L half minimises Σ_t e^{s_t}·L_t − s_t, which has no minimum when L_t ≤ 0, and "
        "log-transformed losses log(L_t + 1e-8) are negative whenever L_t < 1"
    )

    claims = {
        "permutation_invariant": SYMMETRIC,
        "homogeneous": SCALE_FREE,
    }

    def __init__(self, lr: float = 1e-4, optimizer: str = "adam") -> None:
        self.lr = positive("lr", lr, self.name)
        if optimizer not in OPTIMIZERS:
            raise ConfigurationError(f"imtl: optimizer={optimizer!r}; choose one of {OPTIMIZERS}")
        self.optimizer_name = optimizer
        self._s = InternalOptimizer(self, "log_scales", self.lr, 0.0, 0.0, kind=optimizer)  # buffer log_scales
        self._log: dict[str, float] = {}

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return self._weights(gramian, losses)[0]

    def decide(self, grads: TaskGradients) -> Decision:
        w, head_w = self._weights(grads.gramian(), grads.objective_losses)
        return Decision(weights=w, head_weights=head_w, values=self.log_values())

    def _weights(self, gramian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        G, L = check_gramian(gramian, losses, self.name)
        T = G.shape[0]
        if np.any(L < 0):
            raise ConfigurationError(
                f"imtl: IMTL-L needs non-negative losses (e^s·L − s has no minimum for L < 0), "
                f"got {L.tolist()}; "
                "do not combine it with loss_transform='log'"
            )
        if self.log_scales is not None and self.log_scales.shape[0] != T:
            raise ShapeError(f"imtl: its loss scales are for {self.log_scales.shape[0]} tasks but the "
                             f"Gramian has {T}")
        log_scales = self._s.ensure(T, torch.device("cpu"), torch.float64)
        s = log_scales.detach().numpy().copy()
        e = np.exp(s)
        alpha, info = imtl_g_weights(G * np.outer(e, e))
        w = alpha * e
        head_w = to_weights(e, gramian)  # heads are trained on the scaled losses e^{s_t} L_t
        self._s.step(torch.from_numpy(e * L - 1.0))  # d/ds (e^s L − s)
        if not bool(torch.isfinite(log_scales).all()):
            raise ConfigurationError(
                f"imtl: the loss scales became non-finite ({log_scales.tolist()}); lower lr")
        self._log = {**info, **{f"scale_{t}": float(math.exp(v)) for t, v in enumerate(s)}}
        return to_weights(w, gramian), head_w

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
