"""DualProj: the mean gradient projected onto the dual cone of the task gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.protocols import SCALE_FREE, SYMMETRIC, Claim, GramianWeighting
from ._qp import check_gramian, dual_cone_weights, init_dual_cone, pref_weights, small_route
from ._registry import register


@register
class DualProj(GramianWeighting):
    """DualProj: project the (preference-weighted) mean gradient onto the dual cone of J's rows.

    Reference: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232 (the A_DualProj baseline; the projection of GEM, Lopez-Paz & Ranzato 2017)::

        d = π_J(Jᵀ p) = Jᵀ w,   w = argmin_{v ≥ p} vᵀ G v.

    Scale convention: ``p = 1/T`` by default (the *mean* gradient is projected), as in the paper
    and TorchJD (``pref_vector=None`` → ``MeanWeighting``); pass ``pref_vector=[1]*T`` for the sum.

    Hyper-parameters (defaults): ``pref_vector=None`` (uniform 1/T); ``reg_eps=1e-12`` (ridge;
    TorchJD uses 1e-4); ``ridge="relative"`` (``reg_eps·‖g_t‖²`` per task, solved on the unit
    gradients; ``"trace"``: ``reg_eps·trace(G)``, TorchJD's problem — see
    :mod:`mtlens.methods._qp`); ``solver="nnls"`` (exact, scipy) or
    ``"quadprog"`` (``pip install 'mtlens[qp]'``). A failed solve raises ``SolverError``.
    """

    name = "dualproj"
    pref_vector: tuple[float, ...] | None  # set by init_dual_cone
    reg_eps: float
    solver: str
    ridge: str
    reference = "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, arXiv:2406.16232"
    defaults_source = "pref_vector = mean as in the paper and TorchJD; reg_eps: ours (TorchJD 1e-4)"

    claims = {
        "permutation_invariant": SYMMETRIC,
        "homogeneous": SCALE_FREE,
        "non_conflicting": Claim("Quinton & Rey, arXiv:2406.16232 (TorchJD DualProj): the projection of the mean onto "
                                 "the dual cone of the rows"),
    }

    def __init__(self, pref_vector: Sequence[float] | None = None, reg_eps: float = 1e-12,
                 solver: str = "nnls", ridge: str = "relative") -> None:
        init_dual_cone(self, pref_vector, reg_eps, solver, ridge)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        Vr = small_route(self, gramian, lambda T: [pref_weights(self.pref_vector, T, self.name).tolist()])
        if Vr is not None:  # else the general route below (docs/performance.md)
            return torch.tensor(Vr[0], dtype=torch.float64, device=gramian.device)
        T = check_gramian(gramian, self.name)
        p = pref_weights(self.pref_vector, T, self.name)
        (w,) = dual_cone_weights(gramian, p[None, :], reg_eps=self.reg_eps, solver=self.solver,
                                 method=self.name, ridge=self.ridge)
        return torch.as_tensor(w, dtype=torch.float64, device=gramian.device)
