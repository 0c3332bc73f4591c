"""ConFIG: a conflict-free direction from the pseudo-inverse of the unit task gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.numerics import ZERO_REL
from ..engine.protocols import SCALE_FREE, SYMMETRIC, Claim, GramianWeighting
from ..errors import ShapeError, SolverError
from ._qp import check_gramian, check_pref_vector
from ._registry import register
from ._utils import in_range

PARALLEL_TOL = 1e-10  # p with a relative component below this in range(G_u) has no direction


@register
class ConFIG(GramianWeighting):
    """ConFIG (Conflict-Free Inverse Gradients), written on the Gramian.

    Reference: Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks", arXiv:2408.11104, Eq. (2)::

        d = (Σ_i g_iᵀ u) · u,    u = J_u⁺ p / ‖J_u⁺ p‖,    J_u = D⁻¹ J,  D = diag(‖g_i‖).

    ``J_u⁺ p = J_uᵀ (J_u J_uᵀ)⁺ p = Jᵀ D⁻¹ G_u⁺ p`` with ``G_u = D⁻¹ G D⁻¹`` (the cosine
    matrix), so ``d = Jᵀ w`` with ``c = D⁻¹ G_u⁺ p`` and ``w = c · (1ᵀ G c) / (cᵀ G c)``:
    the unit direction's length is the sum of the task gradients' projections on it.
    Every unit gradient has the same positive projection on ``u`` (for ``p = 1`` and
    linearly independent rows), hence no conflict.

    Hyper-parameters (defaults): ``pref_vector=None`` (all ones, the paper's ``1`` and
    TorchJD's ``SumWeighting``); ``rcond=1e-12``: eigenvalues of ``G_u`` below
    ``rcond · λ_max`` are treated as zero in the pseudo-inverse (on ``G_u`` this is the
    square of a ``√rcond = 1e-6`` relative cut on singular values of ``J_u``; TorchJD's
    ``pinv(J_u)`` cuts at ``max(T, P) · eps``, so the two differ only for nearly rank-deficient
    J). Zero rows get zero unit vectors (as TorchJD's ``nan_to_num``); an all-zero J gives
    weights ``p`` (the update is zero whatever the weights). When ``p`` has no component in the
    range of the cosine matrix (two exactly opposite gradients) no direction exists: the weights
    and the update are zero, as in TorchJD, and ``log_values()`` reports ``config/degenerate = 1``.
    """

    name = "config"
    reference = "Liu, Chu & Thuerey, ConFIG: Towards Conflict-free Training of PINNs, arXiv:2408.11104"
    defaults_source = "pref_vector = ones as in the paper (Eq. 2) and TorchJD; rcond: ours"

    claims = {
        "permutation_invariant": SYMMETRIC,
        "homogeneous": SCALE_FREE,
        "non_conflicting": Claim("Liu et al., arXiv:2408.11104: equal positive projections on the unit "
                                 "gradients, whenever some direction has equal projections on them",
                                 when="equal_projections_solvable"),
        "rescaling_invariant": Claim("Liu et al., arXiv:2408.11104: built from the unit gradients only"),
    }

    def __init__(self, pref_vector: Sequence[float] | None = None, rcond: float = 1e-12) -> None:
        self.pref_vector = check_pref_vector(pref_vector, self.name)
        self.rcond = in_range("rcond", rcond, 0.0, 1.0, self.name)
        self._degenerate = 0.0

    def log_values(self) -> dict[str, float]:
        return {"config/degenerate": self._degenerate}

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        T = check_gramian(gramian, self.name)
        G = gramian.detach().to(torch.float64)
        G = 0.5 * G + 0.5 * G.T  # the sum G + Gᵀ overflows for entries above ~9e307
        if self.pref_vector is None:
            p = torch.ones(T, dtype=torch.float64, device=G.device)
        else:
            if len(self.pref_vector) != T:
                raise ShapeError(f"{self.name}: pref_vector has {len(self.pref_vector)} entries, {T} tasks")
            p = torch.tensor(self.pref_vector, dtype=torch.float64, device=G.device)
        if not bool(torch.isfinite(G).all()):
            raise SolverError(f"{self.name}: the Gramian has non-finite entries")
        sq = G.diagonal().clamp_min(0.0)
        big = float(sq.max())
        if not big > 0.0:
            return p.clone()
        live = sq > ZERO_REL * big
        inv_norm = torch.where(live, 1.0 / sq.clamp_min(1e-300).sqrt(), torch.zeros_like(sq))
        Gu = inv_norm[:, None] * G * inv_norm[None, :]
        lam, Q = torch.linalg.eigh(Gu)
        keep = lam > self.rcond * float(lam.max())
        inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
        coords = Q.T @ p
        c = inv_norm * (Q @ (inv * coords))
        sq_norm = float(c @ G @ c)  # ‖Jᵀc‖²
        if float(coords[keep].norm()) <= PARALLEL_TOL * float(p.norm()) or not sq_norm > 0.0:
            # J_u⁺ p = 0: p is orthogonal to the range of the cosine matrix (e.g. two exactly
            # opposite gradients with equal preference): no direction exists; zero update and
            # zero weights (logged as config/degenerate = 1).
            self._degenerate = 1.0
            return torch.zeros(T, dtype=torch.float64, device=G.device)
        self._degenerate = 0.0
        length_times_norm = float(torch.ones(T, dtype=torch.float64, device=G.device) @ G @ c)
        return c * (length_times_norm / sq_norm)
