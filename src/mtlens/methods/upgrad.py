"""UPGrad: the average of each task gradient projected onto the dual cone of all of them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..engine.protocols import SCALE_FREE, SYMMETRIC, Claim, GramianWeighting
from ._qp import check_gramian, dual_cone_weights, init_dual_cone, pref_weights
from ._registry import register


@register
class UPGrad(GramianWeighting):
    """UPGrad (Unconflicting Projection of Gradients), Jacobian descent's aggregator.

    Reference: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232 (Eq. 5 and Proposition 1).

    Each task gradient ``g_i`` is projected onto the dual cone ``{d : J d ≥ 0}`` of all of
    them, and the projections are combined with the preference weights ``p``::

        d = Σ_i p_i π_J(g_i) = Jᵀ w,   w = Σ_i p_i v⁽ⁱ⁾,   v⁽ⁱ⁾ = argmin_{v ≥ e_i} vᵀ G v.

    Scale convention: ``p = 1/T`` by default, i.e. ``d`` is the *mean* of the projected
    gradients — the paper's definition and TorchJD's default (``pref_vector=None`` →
    ``MeanWeighting``). For ``J`` without conflict, ``d`` is then the mean gradient (EW / T).
    Pass ``pref_vector=[1, ..., 1]`` for the sum.

    Hyper-parameters (defaults): ``pref_vector=None`` (uniform 1/T; paper and TorchJD);
    ``reg_eps=1e-12`` (ridge; TorchJD uses 1e-4 — see :mod:`mtlens.methods._qp`);
    ``ridge="relative"`` (ours: ridge ``reg_eps·‖g_t‖²`` per task and the projection solved on the
    unit gradients, accurate for gradient norms 1e12 apart; ``"trace"``: ``reg_eps·trace(G)``,
    TorchJD's problem, to reproduce it with ``reg_eps=1e-4``); ``solver="nnls"`` (exact, scipy) or
    ``"quadprog"`` (needs ``pip install 'mtlens[qp]'``). A failed solve raises
    :class:`~mtlens.errors.SolverError`. The update never conflicts with a task:
    ``(J d)_t ≥ −reg_eps ‖g_t‖² w_t`` (``ridge="trace"``: ``J d ≥ −reg_eps · trace(G) · w``).
    """

    name = "upgrad"
    pref_vector: tuple[float, ...] | None  # set by init_dual_cone
    reg_eps: float
    solver: str
    ridge: str
    reference = "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, arXiv:2406.16232"
    defaults_source = "pref_vector = mean as in the paper and TorchJD; reg_eps: ours (TorchJD 1e-4)"

    claims = {
        "permutation_invariant": SYMMETRIC,
        "homogeneous": SCALE_FREE,
        "non_conflicting": Claim("Quinton & Rey, arXiv:2406.16232: a sum of projections onto the dual cone of "
                                 "the rows"),
    }

    def __init__(self, pref_vector: Sequence[float] | None = None, reg_eps: float = 1e-12,
                 solver: str = "nnls", ridge: str = "relative") -> None:
        init_dual_cone(self, pref_vector, reg_eps, solver, ridge)

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        unprojected = self._without_conflict(gramian)
        if unprojected is not None:
            return unprojected
        T = check_gramian(gramian, self.name)
        p = pref_weights(self.pref_vector, T, self.name)
        V = dual_cone_weights(gramian, np.eye(T), reg_eps=self.reg_eps, solver=self.solver, method=self.name,
                               ridge=self.ridge)
        w = p @ V  # Σ_i p_i v⁽ⁱ⁾
        return torch.as_tensor(w, dtype=torch.float64, device=gramian.device)

    def _without_conflict(self, gramian: Tensor) -> Tensor | None:
        """``w = p`` when no two task gradients conflict (every ``G_ij ≥ 0``), else ``None``.

        Then every ``v⁽ⁱ⁾ = e_i`` exactly (its gradient ``(G + ridge) e_i ≥ 0`` at the bound: the KKT
        conditions, for either ridge), so ``w = Σ_i p_i e_i = p`` — what the general route returns, bit for
        bit, without its numpy calls (each costs microseconds inside a step). Read from one ``tolist()``
        of a small finite square Gramian; anything else (a conflict, non-finite entries, a wrong shape, a
        ``pref_vector`` of another length, T > 16) goes through the general route and its errors."""
        if not isinstance(gramian, Tensor) or gramian.ndim != 2 or not 0 < gramian.shape[0] == gramian.shape[1] <= 16:
            return None
        T = gramian.shape[0]
        if self.pref_vector is not None and len(self.pref_vector) != T:
            return None
        g = gramian.detach().to("cpu", torch.float64).tolist()
        for i in range(T):
            if not math.isfinite(g[i][i]):
                return None
            for j in range(i + 1, T):
                a, b = g[i][j], g[j][i]
                if not (math.isfinite(a) and math.isfinite(b)) or 0.5 * a + 0.5 * b < 0.0:
                    return None
        p = [1.0 / T] * T if self.pref_vector is None else list(self.pref_vector)
        return torch.tensor(p, dtype=torch.float64, device=gramian.device)
