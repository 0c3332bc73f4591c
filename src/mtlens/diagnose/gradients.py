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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..engine.record import StepRecord
from ..errors import ConfigurationError
from ._inputs import gramian_of, gramian_rows_of


def gradient_norms(gramian: StepRecord | Tensor) -> Tensor:
    """Per-task gradient norms ``‖g_t‖ = sqrt(G_tt)`` (float64, T)."""
    G = gramian_of(gramian)
    return G.diagonal().clamp_min(0).sqrt()


def gramian_condition_number(gramian: StepRecord | Tensor) -> float:
    """Condition number ``λ_max / λ_min`` of the (PSD) Gramian.

    ``inf`` when G is singular to float64 precision (``λ_min ≤ T·ε·λ_max``: linearly dependent
    task gradients, e.g. parallel ones, or a zero gradient) and when G = 0; 1.0 for a non-zero
    1×1 Gramian. Never NaN. (The condition number of J itself is its square root.)"""
    return _condition(gramian_of(gramian).cpu().numpy())


def _condition(A: np.ndarray | list[list[float]]) -> float:
    ev = np.linalg.eigvalsh(np.asarray(A, dtype=np.float64))
    lmax, lmin = float(ev[-1]), float(ev[0])
    T = len(A)
    if lmax <= 0 or lmin <= T * np.finfo(np.float64).eps * lmax:
        return float("inf")
    return lmax / lmin


@dataclass(frozen=True)
class _PairwiseSimilarity:
    mean: float
    min: float
    matrix: Tensor
    grad_norms: Tensor
    n_pairs: int
    level: str | None = field(default=None)
    gramian: list[list[float]] | None = field(default=None, repr=False, compare=False)  # the validated G: cond(G)

    @cached_property
    def condition_number(self) -> float:
        """``cond(G)`` (:func:`gramian_condition_number`), computed when first read: an eigendecomposition that
        a monitor not logging ``cond`` does not need (≈ 0.1 ms right after a step's backward)."""
        if self.gramian is None:
            raise ConfigurationError(
                f"{type(self).__name__} was built without its Gramian: build it with gradient_direction_similarity / "
                "gradient_magnitude_similarity, or call gramian_condition_number(G)"
            )
        return _condition(self.gramian)

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
    return _direction(gramian_rows_of(gramian), gramian.level if isinstance(gramian, StepRecord) else None,
                      _device(gramian))


def _device(gramian: Any) -> torch.device:
    """Where the identifiers' matrices go: the Gramian's device, as the tensor formulas left them."""
    G = gramian.gramian if isinstance(gramian, StepRecord) else gramian
    return G.device if isinstance(G, Tensor) else torch.device("cpu")


def _direction(A: list[list[float]], level: str | None, device: torch.device | None = None) -> DirectionSimilarity:
    """GDS on the validated Gramian's entries, in plain Python: a handful of float operations per pair, where
    each numpy or torch op would cost ≈ 5–10 µs right after a step's backward (a monitored step paid
    ≈ 0.4 ms at T = 3 for GDS and GMS in numpy, ≈ 0.9 ms in torch; docs/performance.md, "Monitoring")."""
    T = len(A)
    n = [math.sqrt(max(A[i][i], 0.0)) for i in range(T)]
    cos = [[0.0] * T for _ in range(T)]
    pairs = []
    for i in range(T):
        cos[i][i] = 1.0 if n[i] > 0 else 0.0  # cos(g, g) = 1; a zero gradient has no direction
        for j in range(i + 1, T):
            c = min(1.0, max(-1.0, A[i][j] / n[i] / n[j])) if n[i] > 0 and n[j] > 0 else 0.0
            cos[i][j] = cos[j][i] = c
            pairs.append(c)
    matrix, norms = torch.tensor(cos, dtype=torch.float64, device=device), torch.tensor(n, dtype=torch.float64,
                                                                                       device=device)
    if T == 1:
        return DirectionSimilarity(1.0, 1.0, matrix, norms, 0, level, A, 0.0)
    return DirectionSimilarity(math.fsum(pairs) / len(pairs), min(pairs), matrix, norms, len(pairs), level, A,
                               sum(1 for c in pairs if c < 0) / len(pairs))


def gradient_magnitude_similarity(gramian: StepRecord | Tensor) -> MagnitudeSimilarity:
    """GMS: mean over pairs ``i < j`` of ``2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²)`` ∈ [0, 1] (PCGrad Def. 3).

    Computed as ``2r / (1 + r²)`` with ``r = min/max`` of the two norms (no under- or overflow).

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 9.0]])  # ‖g_1‖ = 1, ‖g_2‖ = 3
        >>> round(gradient_magnitude_similarity(G).mean, 6)  # 2·3 / (1 + 9)
        0.6
    """
    return _magnitude(gramian_rows_of(gramian), gramian.level if isinstance(gramian, StepRecord) else None,
                      _device(gramian))


def _magnitude(A: list[list[float]], level: str | None, device: torch.device | None = None) -> MagnitudeSimilarity:
    """GMS on the validated Gramian's entries, in plain Python (see :func:`_direction`)."""
    T = len(A)
    n = [math.sqrt(max(A[i][i], 0.0)) for i in range(T)]
    gms = [[1.0] * T for _ in range(T)]
    pairs = []
    for i in range(T):
        for j in range(i + 1, T):
            hi, lo = max(n[i], n[j]), min(n[i], n[j])
            r = lo / hi if hi > 0 else 1.0
            gms[i][j] = gms[j][i] = v = 2 * r / (1 + r * r)
            pairs.append(v)
    matrix, norms = torch.tensor(gms, dtype=torch.float64, device=device), torch.tensor(n, dtype=torch.float64,
                                                                                       device=device)
    if T == 1:
        return MagnitudeSimilarity(1.0, 1.0, matrix, norms, 0, level, A)
    return MagnitudeSimilarity(math.fsum(pairs) / len(pairs), min(pairs), matrix, norms, len(pairs), level, A)


__all__ = [
    "DirectionSimilarity",
    "MagnitudeSimilarity",
    "gradient_direction_similarity",
    "gradient_magnitude_similarity",
    "gradient_norms",
    "gramian_condition_number",
]
