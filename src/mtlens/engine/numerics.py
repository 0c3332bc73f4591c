"""Numerical conventions shared by the engine, the methods and the diagnostics: one home each.

* :data:`ZERO_REL` — when a task gradient counts as zero (relative to the largest one);
* :func:`check_gramian` — the one validation of a task Gramian ``G = J Jᵀ`` (T×T): every method
  and diagnostic that takes a Gramian calls it, so the same fault raises the same error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import NonFiniteError, ShapeError

__all__ = ["ZERO_REL", "check_gramian", "check_gramian_numpy", "check_gramian_rows"]

ZERO_REL = 1e-30
"""A task whose squared gradient norm ``‖g_t‖² ≤ ZERO_REL · max_s ‖g_s‖²`` (or exactly 0) counts as a
zero gradient: it is left out of normalisations, cosines, projections and solver constraints.

Relative to the largest task, so it is scale-free; on squared norms in float64, where a sum of squares
keeps its relative precision however small it is, so the only thing to guard against is dividing by
numbers that are zero in all but name. ``1e-30`` (norm ratio ``1e-15``) keeps tasks whose gradient
norms differ by up to 1e12 (what the solver tests cover, tests/methods/test_solver_certificates.py)
as real tasks."""


def check_gramian(gramian: Any, what: str = "gramian") -> Tensor:
    """Validate a Gramian and return it as a symmetric float64 tensor (on its own device).

    ``G`` must be a finite, non-empty square matrix (T×T, T ≥ 1). It is symmetrised
    (``(G + Gᵀ)/2``) so that round-off asymmetry cannot reach eigen-solvers or projections; the
    input is not modified (a detached copy is returned).

    Args:
        gramian: a tensor (or anything :func:`torch.as_tensor` accepts) of shape (T, T).
        what: the name used in error messages (a method name, ``"gds"``, ...).

    Returns:
        a float64 tensor of shape (T, T), symmetric.

    Raises:
        ShapeError: not a non-empty square matrix.
        NonFiniteError: NaN or inf entries (a task gradient was not finite).
    """
    G = gramian if isinstance(gramian, Tensor) else torch.as_tensor(gramian)
    if G.device.type == "cpu":  # the same checks and arithmetic in numpy: a few µs instead of ~50 (T×T is tiny)
        return torch.from_numpy(check_gramian_numpy(G, what))
    _check_shape(G, what)
    G = G.detach().to(torch.float64)
    if not bool(torch.isfinite(G).all()):
        _raise_non_finite(torch.diagonal(G).tolist(), what)
    return 0.5 * G + 0.5 * G.T  # not 0.5 * (G + Gᵀ): the sum overflows for entries above ~9e307


def check_gramian_numpy(gramian: Any, what: str = "gramian") -> np.ndarray:
    """:func:`check_gramian` returning a float64 numpy array (on the CPU): the same checks, errors and values."""
    G = gramian if isinstance(gramian, Tensor) else torch.as_tensor(gramian)
    _check_shape(G, what)
    A = G.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(A).all():
        _raise_non_finite(np.diagonal(A).tolist(), what)
    return 0.5 * A + 0.5 * A.T  # a new array: the input is never modified


def check_gramian_rows(gramian: Any, what: str = "gramian") -> list[list[float]]:
    """:func:`check_gramian` returning the symmetrised Gramian as T lists of T Python floats: the same checks,
    errors and values, with one tensor op (``tolist``). For code that does a few operations per entry of a
    small T×T matrix, where each numpy or torch op (≈ 5–10 µs right after a backward) costs more than the
    arithmetic (the GDS/GMS identifiers of :mod:`mtlens.diagnose.gradients`)."""
    G = gramian if isinstance(gramian, Tensor) else torch.as_tensor(gramian)
    _check_shape(G, what)
    rows: list[list[float]] = G.detach().to(device="cpu", dtype=torch.float64).tolist()
    if not all(math.isfinite(v) for row in rows for v in row):
        _raise_non_finite([rows[i][i] for i in range(len(rows))], what)
    T = len(rows)
    return [[0.5 * rows[i][j] + 0.5 * rows[j][i] for j in range(T)] for i in range(T)]


def _check_shape(G: Tensor, what: str) -> None:
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ShapeError(f"{what}: the Gramian must be a non-empty square T×T matrix, got shape {tuple(G.shape)}")


def _raise_non_finite(diagonal: list[float], what: str) -> None:
    raise NonFiniteError(
        f"{what}: the Gramian has non-finite entries (NaN/inf; diagonal {diagonal}): a task gradient is not finite"
    )
