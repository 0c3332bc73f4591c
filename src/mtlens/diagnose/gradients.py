"""Gradient-based identifiers from the Gramian ``G = J Jᵀ``: GDS, GMS, norms, condition number.

Everything here reads only the T×T Gramian the engine already computed (``StepRecord.gramian``,
at parameter level — ``g_t = ∂L_t/∂θ_s`` — or feature level — ``s_t = ∂L_t/∂Z``), so no extra
backward is ever needed.

* GDS (gradient direction similarity): mean over task pairs ``i < j`` of ``cos(g_i, g_j)``
  [our choice: mean of the off-diagonal], as benchmarked in arXiv:2402.03557.
* GMS (gradient magnitude similarity): mean over pairs of
  ``2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²)`` (Yu et al. 2020, PCGrad, arXiv:2001.06782, Def. 3)
  [our choice: arXiv:2402.03557's exact formula is not available].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..engine.record import StepRecord
from ._inputs import gramian_of


def gradient_norms(gramian: StepRecord | Tensor) -> Tensor:
    """Per-task gradient norms ``‖g_t‖ = sqrt(G_tt)`` (float64, T)."""
    G = gramian_of(gramian)
    return G.diagonal().clamp_min(0).sqrt()


def gramian_condition_number(gramian: StepRecord | Tensor) -> float:
    """Condition number ``λ_max / λ_min`` of the (PSD) Gramian.

    ``inf`` when G is singular to float64 precision (``λ_min ≤ T·ε·λ_max``: linearly dependent
    task gradients, e.g. parallel ones, or a zero gradient) and when G = 0; 1.0 for a non-zero
    1×1 Gramian. Never NaN. (The condition number of J itself is its square root.)"""
    return _condition(_array(gramian_of(gramian)))


def _array(G: Tensor) -> np.ndarray:
    """The T×T Gramian (validated by :func:`gramian_of`) as a float64 numpy array: the identifiers below are a
    few dozen operations on T² numbers, which numpy does in microseconds where as many torch ops cost ≈ 10 µs
    each (GDS and GMS of a monitored step took ≈ 0.9 ms at T = 3 before; docs/performance.md, "Monitoring")."""
    return G.detach().to(device="cpu", dtype=torch.float64).numpy()


def _condition(A: np.ndarray) -> float:
    ev = np.linalg.eigvalsh(A)
    lmax, lmin = float(ev[-1]), float(ev[0])
    T = A.shape[0]
    if lmax <= 0 or lmin <= T * np.finfo(np.float64).eps * lmax:
        return float("inf")
    return lmax / lmin


@dataclass(frozen=True)
class _PairwiseSimilarity:
    mean: float
    min: float
    matrix: Tensor
    grad_norms: Tensor
    condition_number: float
    n_pairs: int
    level: str | None = field(default=None)

    def norms_dict(self, prefix: str = "", task_names: Sequence[str] | None = None) -> dict[str, float]:
        names = task_names or [f"task{i}" for i in range(self.grad_norms.numel())]
        return {f"{prefix}grad_norm/{n}": float(v) for n, v in zip(names, self.grad_norms)}


@dataclass(frozen=True)
class DirectionSimilarity(_PairwiseSimilarity):
    """GDS result: ``mean`` (the identifier), ``min``, ``conflict_fraction`` (pairs with cos < 0),
    the full ``matrix`` of cosines (T×T), per-task ``grad_norms``, ``condition_number`` of G.

    Zero-norm gradients have no direction: their cosines are 0 (neither aligned nor conflicting).
    T = 1: no pairs; ``mean = min = 1.0`` and ``conflict_fraction = 0.0`` by definition."""

    conflict_fraction: float = 0.0

    def to_dict(self, prefix: str = "", task_names: Sequence[str] | None = None) -> dict[str, float]:
        out = {
            f"{prefix}gds_mean": self.mean,
            f"{prefix}gds_min": self.min,
            f"{prefix}gds_conflict_fraction": self.conflict_fraction,
            f"{prefix}cond_G": self.condition_number,
        }
        out.update(self.norms_dict(prefix, task_names))
        return out


@dataclass(frozen=True)
class MagnitudeSimilarity(_PairwiseSimilarity):
    """GMS result: ``mean`` (the identifier), ``min``, the full ``matrix`` (T×T, diagonal 1),
    per-task ``grad_norms``, ``condition_number`` of G.

    Two zero gradients have equal magnitudes (GMS 1); one zero and one non-zero give 0.
    T = 1: no pairs; ``mean = min = 1.0`` by definition."""

    def to_dict(self, prefix: str = "", task_names: Sequence[str] | None = None) -> dict[str, float]:
        out = {
            f"{prefix}gms_mean": self.mean,
            f"{prefix}gms_min": self.min,
            f"{prefix}cond_G": self.condition_number,
        }
        out.update(self.norms_dict(prefix, task_names))
        return out


def gradient_direction_similarity(gramian: StepRecord | Tensor) -> DirectionSimilarity:
    """GDS: mean over pairs ``i < j`` of ``cos(g_i, g_j) = G_ij / (‖g_i‖‖g_j‖)`` (arXiv:2402.03557).

    Args:
        gramian: ``G = J Jᵀ`` (T×T) — ``StepRecord.gramian`` — or the StepRecord itself.

    Example:
        >>> G = torch.tensor([[1.0, -2.0], [-2.0, 4.0]])  # g_2 = -2 g_1
        >>> gradient_direction_similarity(G).mean
        -1.0
    """
    A = _array(gramian_of(gramian))
    T = A.shape[0]
    n = np.sqrt(np.clip(np.diag(A), 0.0, None))
    nz = n > 0
    denom = np.where(nz, n, 1.0)
    cos = np.where(nz[:, None] & nz[None, :], np.clip(A / denom[:, None] / denom[None, :], -1.0, 1.0), 0.0)
    np.fill_diagonal(cos, nz.astype(np.float64))  # cos(g, g) = 1; a zero gradient has no direction
    level = gramian.level if isinstance(gramian, StepRecord) else None
    cond = _condition(A)
    if T == 1:
        return DirectionSimilarity(1.0, 1.0, torch.from_numpy(cos), torch.from_numpy(n), cond, 0, level, 0.0)
    v = cos[np.triu_indices(T, 1)]
    return DirectionSimilarity(float(v.mean()), float(v.min()), torch.from_numpy(cos), torch.from_numpy(n), cond,
                               int(v.size), level, float((v < 0).mean()))


def gradient_magnitude_similarity(gramian: StepRecord | Tensor) -> MagnitudeSimilarity:
    """GMS: mean over pairs ``i < j`` of ``2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²)`` ∈ [0, 1] (PCGrad Def. 3).

    Computed as ``2r / (1 + r²)`` with ``r = min/max`` of the two norms (no under- or overflow).

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 9.0]])  # ‖g_1‖ = 1, ‖g_2‖ = 3
        >>> round(gradient_magnitude_similarity(G).mean, 6)  # 2·3 / (1 + 9)
        0.6
    """
    A = _array(gramian_of(gramian))
    T = A.shape[0]
    n = np.sqrt(np.clip(np.diag(A), 0.0, None))
    hi = np.maximum(n[:, None], n[None, :])
    lo = np.minimum(n[:, None], n[None, :])
    r = np.where(hi > 0, lo / np.where(hi > 0, hi, 1.0), 1.0)
    gms = 2 * r / (1 + r * r)
    level = gramian.level if isinstance(gramian, StepRecord) else None
    cond = _condition(A)
    if T == 1:
        return MagnitudeSimilarity(1.0, 1.0, torch.from_numpy(gms), torch.from_numpy(n), cond, 0, level)
    v = gms[np.triu_indices(T, 1)]
    return MagnitudeSimilarity(float(v.mean()), float(v.min()), torch.from_numpy(gms), torch.from_numpy(n), cond,
                               int(v.size), level)


__all__ = [
    "DirectionSimilarity",
    "MagnitudeSimilarity",
    "gradient_direction_similarity",
    "gradient_magnitude_similarity",
    "gradient_norms",
    "gramian_condition_number",
]
