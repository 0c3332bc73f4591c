"""UPGrad: the average of each task gradient projected onto the dual cone of all of them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..engine.numerics import ZERO_REL
from ..engine.protocols import SCALE_FREE, SYMMETRIC, Claim, GramianWeighting
from ._qp import check_gramian, dual_cone_weights, init_dual_cone, pref_weights, small_route
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
        closed = self._without_conflict(gramian)
        if closed is None:
            closed = self._two_tasks(gramian)
        if closed is not None:
            return closed
        Vr = small_route(self, gramian, lambda T: [[1.0 if i == t else 0.0 for i in range(T)] for t in range(T)])
        if Vr is not None:  # else the general route below (docs/performance.md)
            T = len(Vr)
            p = pref_weights(self.pref_vector, T, self.name).tolist()
            return torch.tensor([sum(p[i] * Vr[i][t] for i in range(T)) for t in range(T)], dtype=torch.float64,
                                device=gramian.device)
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

    def _two_tasks(self, gramian: Tensor) -> Tensor | None:
        """T = 2 with a conflict (``ridge="relative"``, ``solver="nnls"``): the projection in closed form (else None).

        On the unit gradients (cosine ``c < 0``, ridge ``ε``) row 0 solves ``min_{y ≥ (n₀, 0)} yᵀ(C + εI)y``:
        ``y₁ = −c n₀/(1 + ε)`` (the unconstrained minimiser in ``y₁`` given ``y₀``, ≥ 0 since ``c < 0``) and
        ``y₀ = n₀`` at its bound, since the gradient there, ``2n₀((1 + ε)² − c²)/(1 + ε)``, is > 0 for
        ``|c| < 1 + ε``; so ``v⁽⁰⁾ = (1, −c n₀/((1 + ε) n₁))`` and symmetrically ``v⁽¹⁾`` — what the
        eigendecomposition + NNLS of the general route computes, to rounding (tested to 1e-12), without its
        numpy and scipy calls. Cosines within 1e-9 of −1 (opposite gradients: the problem is then only
        semi-definite at ``ε = 0``), a zero gradient, or non-finite entries go through the general route."""
        if (self.ridge != "relative" or self.solver != "nnls" or not isinstance(gramian, Tensor)
                or tuple(gramian.shape) != (2, 2)):
            return None
        if self.pref_vector is not None and len(self.pref_vector) != 2:
            return None
        (a, g01), (g10, b) = gramian.detach().to("cpu", torch.float64).tolist()
        off = 0.5 * g01 + 0.5 * g10
        if not all(math.isfinite(x) for x in (a, b, off)) or not (a > 0.0 and b > 0.0):
            return None
        top = max(a, b)
        if not (a > ZERO_REL * top and b > ZERO_REL * top):
            return None
        n0, n1 = math.sqrt(a), math.sqrt(b)
        c = off / (n0 * n1)
        if not -1.0 + 1e-9 < c < 0.0:
            return None
        k = -c / (1.0 + self.reg_eps)
        p0, p1 = (0.5, 0.5) if self.pref_vector is None else self.pref_vector
        w = [p0 + p1 * k * n1 / n0, p1 + p0 * k * n0 / n1]
        return torch.tensor(w, dtype=torch.float64, device=gramian.device)
