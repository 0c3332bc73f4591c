"""PCGrad: project each task gradient onto the normal planes of the gradients it conflicts with."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..engine.protocols import SCALE_FREE, Claim, GramianWeighting
from ._registry import register
from ._solvers import check_gramian, to_weights
from ._utils import Seeded


@register
class PCGrad(Seeded, GramianWeighting):
    """PCGrad ("gradient surgery"): sum of the task gradients after conflict projections.

    Reference: Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020,
    arXiv:2001.06782 (Algorithm 1).

    For each task i, ``g_i^PC`` starts at ``g_i``; the other tasks j ≠ i are visited in a
    random order drawn independently for every i, and whenever ``g_i^PC · g_j < 0`` (with the
    ORIGINAL ``g_j``) the projection ``g_i^PC ← g_i^PC − (g_i^PC·g_j / ‖g_j‖²) g_j`` is applied.
    The update is the SUM ``Σ_i g_i^PC`` (Algorithm 1; some ports use the mean).

    On the Gramian: every ``g_i^PC = Σ_k C_ik g_k`` is a combination of the original
    gradients; ``g_i^PC · g_j = (C G)_ij`` so the coefficient matrix C is tracked exactly and
    the returned weights are ``w = 1ᵀC``. For T = 2 the result never conflicts with either task.
    A zero gradient ``g_j`` is never projected on (its inner product is 0).

    Args:
        seed: seed of the method's own ``torch.Generator`` for the visiting orders. ``None``
            (default) draws the seed from torch's global RNG at construction, so
            ``torch.manual_seed`` makes runs reproducible. The generator state is in
            ``state_dict()`` (:class:`~mtlens.methods._utils.Seeded`).

    Defaults and source: no hyper-parameters in the paper; random order per i, sum reduction
    as in Algorithm 1.
    """

    name = "pcgrad"
    reference = "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020, arXiv:2001.06782"
    defaults_source = "Algorithm 1 of the paper (random order per task, sum of projected gradients)"
    stateful = True

    claims = {
        "homogeneous": SCALE_FREE,
        "non_conflicting": Claim("Yu et al., NeurIPS 2020: for two tasks each projected gradient is orthogonal to "
                                 "the other task's, so their sum conflicts with neither", when="two_tasks"),
    }

    def __init__(self, seed: int | None = None) -> None:
        self._seed(seed)
        self._log: dict[str, float] = {}
        self.last_orders: list[list[int]] = []

    def _order(self, i: int, T: int) -> list[int]:
        others = [j for j in range(T) if j != i]
        perm = torch.randperm(len(others), generator=self.generator).tolist()
        return [others[k] for k in perm]

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        G, _ = check_gramian(gramian, losses, self.name)
        T = G.shape[0]
        C = np.eye(T)
        n_proj = 0
        self.last_orders = []
        for i in range(T):
            order = self._order(i, T)
            self.last_orders.append(order)
            for j in order:
                gjj = G[j, j]
                if gjj <= 0.0:
                    continue
                dot = float(C[i] @ G[:, j])
                if dot < 0.0:
                    C[i, j] -= dot / gjj
                    n_proj += 1
        w = C.sum(axis=0)
        self._log = {"projections": float(n_proj)}
        return to_weights(w, gramian)

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
