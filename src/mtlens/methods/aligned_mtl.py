"""Aligned-MTL: align the principal components of the gradient system (equal singular values)."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from ..engine.protocols import SCALE_FREE, SYMMETRIC, GramianWeighting
from ..errors import ConfigurationError, ShapeError
from ._registry import register
from ._solvers import check_gramian, psd_eigh, to_weights
from ._utils import check

SCALE_MODES = ("min", "median", "mean")


@register
class AlignedMTL(GramianWeighting):
    """Aligned-MTL: rescale the gradient system so all its singular values equal the smallest one.

    Reference: Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for
    Multi-Task Learning", CVPR 2023, arXiv:2305.19000 (Algorithm 1).

    With the eigen-decomposition ``G = V Λ Vᵀ`` (``torch.linalg.eigh``; the removed
    ``torch.symeig`` of the original code is not used), ``B = σ V Λ^{-1/2} Vᵀ`` makes the
    aligned system ``Jᵀ B`` have every non-zero singular value equal to σ, and the update is
    ``Jᵀ B ω`` for the pre-defined task weights ω, i.e. weights ``w = B ω``.

    Rank deficiency: eigenvalues ``λ ≤ rank_rtol · λ_max`` are dropped (their components of J
    are zero up to round-off, so they carry no direction), as the official/LibMTL code does with
    ``rtol = T·eps``; σ is then the smallest singular value of the retained (non-zero) part. An
    all-zero G gives ``w = ω`` (the update is 0 anyway). "Aligned-MTL-UB" of the paper is this
    method at ``level="feature"`` (saliencies w.r.t. the shared representation).

    Args:
        task_weights: ω, one positive number per task, or ``None`` (default) for all ones — the
            paper's equal pre-defined weights with LibMTL's scale (``B.sum(0)``), matching EW's
            sum of losses. (TorchJD uses 1/T: divide by T to compare.)
        scale_mode: σ² = the smallest retained eigenvalue (``"min"``, default: paper, Alg. 1,
            and LibMTL), their median (``"median"``) or mean (``"mean"``, TorchJD's "rmse",
            which TorchJD attributes to the official code).
        rank_rtol: relative eigenvalue cut-off; default ``None`` = ``T · eps(float64)``.
    """

    name = "aligned_mtl"
    reference = ("Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023, "
                 "arXiv:2305.19000")
    defaults_source = "scale by the smallest singular value, equal task weights 1 (paper Alg. 1; LibMTL)"

    claims = {
        "permutation_invariant": SYMMETRIC,
        "homogeneous": SCALE_FREE,
    }

    def __init__(self, task_weights: list[float] | None = None, scale_mode: str = "min",
                 rank_rtol: float | None = None) -> None:
        if scale_mode not in SCALE_MODES:
            raise ConfigurationError(f"aligned_mtl: scale_mode={scale_mode!r}; choose one of {SCALE_MODES}")
        if task_weights is not None:
            tw = np.asarray(task_weights, dtype=np.float64).reshape(-1)
            check(tw.size > 0 and bool(np.all(np.isfinite(tw))) and bool(np.all(tw > 0)),
                  f"aligned_mtl: task_weights must be positive finite numbers, got {task_weights!r}")
            self._omega: np.ndarray | None = tw
        else:
            self._omega = None
        if rank_rtol is not None:
            check(isinstance(rank_rtol, (int, float)) and 0 <= rank_rtol < 1,
                  f"aligned_mtl: rank_rtol must be in [0, 1), got {rank_rtol!r}")
        self.scale_mode = scale_mode
        self.rank_rtol = rank_rtol
        self._log: dict[str, float] = {}

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        G, _ = check_gramian(gramian, losses, self.name)
        T = G.shape[0]
        omega = np.ones(T) if self._omega is None else self._omega
        if omega.shape[0] != T:
            raise ShapeError(f"aligned_mtl: {omega.shape[0]} task_weights for {T} tasks")
        lam, V = psd_eigh(G, rtol=self.rank_rtol)
        rank = lam.shape[0]
        if rank == 0:
            self._log = {"rank": 0.0}
            return to_weights(omega.copy(), gramian)
        if self.scale_mode == "min":
            s2 = float(lam[-1])
        elif self.scale_mode == "median":
            s2 = float(np.median(lam))
        else:
            s2 = float(np.mean(lam))
        B = math.sqrt(s2) * (V / np.sqrt(lam)) @ V.T
        w = B @ omega
        self._log = {"rank": float(rank), "condition_number": float(math.sqrt(lam[0] / lam[-1]))}
        return to_weights(w, gramian)

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
