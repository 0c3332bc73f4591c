"""IMTL-G: closed-form weights whose update has equal projections on every task's unit gradient."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ..engine.protocols import SCALE_FREE, SYMMETRIC, Claim, GramianWeighting
from ..errors import SolverError
from ._registry import register
from ._solvers import check_gramian, cosine_matrix, nonzero_tasks, psd_eigh, to_weights

PINV_RTOL = 1e-10
"""Eigenvalues of the cosine matrix below ``PINV_RTOL · λ_max`` are treated as 0 (pseudo-inverse)."""
RANGE_RTOL = 1e-6
"""``1`` is taken to be in the range of the cosine matrix when the least-squares residual is below this."""


def imtl_g_weights(G: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """IMTL-G weights α (Σα = 1) for the Gramian ``G`` (numpy, T×T). Returns ``(α, info)``.

    The paper's closed form ``α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σα_{2:T}`` (D: rows
    ``g_1 − g_t``, U: rows ``u_1 − u_t``, ``u_t = g_t/‖g_t‖``) is the solution of
    ``Σα = 1`` and ``d·u_t`` equal for all t, where ``d = Σ α_t g_t``. Writing
    ``α_t = β_t/‖g_t‖``, the condition is ``C β = k 1`` with C the cosine matrix, so
    ``α ∝ D⁻¹ C⁻¹ 1`` — identical to the closed form when the gradients are linearly
    independent, and computed in the scale-free cosine space (robust to 1e-10/1e10 scales and
    to very different task scales). Degenerate inputs:

    * rank-deficient C: pseudo-inverse (eigenvalues below ``PINV_RTOL·λ_max`` dropped);
    * ``1`` not in the range of C (e.g. opposite gradients): the only equal projection is 0,
      ``d = 0``, and α is the minimum-norm vector of the null space of C (in β) normalised to
      ``Σα = 1``;
    * zero gradients get α_t = 0 and the rest are solved among themselves (all zero: uniform);
    * ``Σα`` numerically 0 (no normalisation possible): :class:`SolverError`.
    """
    T = G.shape[0]
    mask = nonzero_tasks(G)
    alpha = np.zeros(T)
    k = int(mask.sum())
    if k == 0:
        return np.full(T, 1.0 / T), {"zero_tasks": float(T), "common_projection_zero": 1.0}
    if k == 1:
        alpha[mask] = 1.0
        return alpha, {"zero_tasks": float(T - 1), "common_projection_zero": 0.0}
    C, n = cosine_matrix(G, mask)
    lam, V = psd_eigh(C, rtol=PINV_RTOL)
    ones = np.ones(k)
    proj = V.T @ ones
    beta = V @ (proj / lam)
    resid = float(np.linalg.norm(ones - V @ proj)) / np.sqrt(k)
    zero_proj = resid > RANGE_RTOL
    if zero_proj:
        beta = ones - V @ proj  # projection of 1 onto the null space of C
    a = beta / n
    total = float(a.sum())
    if not np.isfinite(total) or abs(total) <= 1e-12 * float(np.abs(a).sum()):
        raise SolverError(
            "imtl_g: the weights cannot be normalised to sum to 1 (Σα ≈ 0): the gradients admit no "
            f"impartial combination; cosine matrix eigenvalues {np.linalg.eigvalsh(C).tolist()}"
        )
    alpha[mask] = a / total
    return alpha, {"zero_tasks": float(T - k), "common_projection_zero": float(zero_proj)}


@register
class IMTLG(GramianWeighting):
    """IMTL-G: gradient balance so the update projects equally onto every task's unit gradient.

    Reference: Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task
    Learning", ICLR 2021 (OpenReview IMPnRXEWpvr; no arXiv version). Closed form of Sec. 3.1:
    ``α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹``, ``α_1 = 1 − Σ α_{2:T}``; the update ``Σ α_t g_t`` (Σα = 1).
    Computed from the Gramian in cosine space (see :func:`imtl_g_weights`), so the update
    direction is exactly invariant to a positive rescaling of any task's gradient.

    No hyper-parameters (the paper has none). ``log_values``: number of zero-gradient tasks and
    whether the common projection is 0 (conflicting gradients that cancel).
    """

    name = "imtl_g"
    reference = ("Liu et al., Towards Impartial Multi-task Learning, ICLR 2021 "
                 "(openreview.net/forum?id=IMPnRXEWpvr)")
    defaults_source = "no hyper-parameters (closed form of the paper)"

    claims = {
        "permutation_invariant": SYMMETRIC,
        "homogeneous": SCALE_FREE,
        "rescaling_invariant": Claim("Liu et al., ICLR 2021, IMTL-G: equal projections on the unit gradients"),
    }

    def __init__(self) -> None:
        self._log: dict[str, float] = {}

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        G, _ = check_gramian(gramian, losses, self.name)
        alpha, self._log = imtl_g_weights(G)
        return to_weights(alpha, gramian)

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
