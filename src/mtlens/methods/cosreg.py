"""CosReg: penalise squared cosines between task gradients (orthogonal-gradient regulariser)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.numerics import ZERO_REL
from ..engine.protocols import Regularizer
from ..errors import ShapeError
from ._registry import register
from ._utils import check, in_range

LEVELS = ("param", "feature")


@register
class CosReg(Regularizer):
    """CosReg: the penalty ``λ Σ_{i<j} cos²(g_i, g_j)`` added to the objective.

    Reference: Suteu & Guo, "Regularizing Deep Multi-Task Networks using Orthogonal
    Gradients", arXiv:1912.06844: pushing task gradients on the shared parameters towards
    orthogonality reduces task interference. The penalty is differentiated through the
    gradients (the engine builds them with ``create_graph=True``), so it trains the encoder.

    ``level="param"`` (default, the paper's setting): ``g_t`` are the per-task gradients of the
    shared parameters (instance attribute ``uses = "param"``). ``level="feature"``: ``g_t`` are
    the task saliencies ``S_t = ∂L_t/∂Z`` flattened over the batch (``uses = "saliency"``), a
    cheaper surrogate.

    Cosines are computed in float64 from ``G = Σ_blocks J Jᵀ``; a task whose gradient is zero
    (relative to the largest) has no direction and is left out (its cosines count as 0, and no
    gradient flows through them — dividing by a vanishing norm would explode).

    Hyper-parameters (defaults): ``lam=1.0`` — our default: we could not access the paper's
    per-benchmark values to cite one (another implementation, Pylon, uses 10 on the *mean* over
    task pairs, which is ``10 / (T(T−1)/2)`` per pair in this sum's scale); tune it.
    ``level="param"``. Logged: ``cos2_mean`` (mean over pairs of cos²) and ``cos_mean``.
    """

    name = "cosreg"
    reference = ("Suteu & Guo, Regularizing Deep Multi-Task Networks using Orthogonal Gradients, "
                 "arXiv:1912.06844")
    defaults_source = "lam = 1.0 is ours (see docstring); squared cosines of shared-parameter gradients"

    def __init__(self, lam: float = 1.0, level: str = "param") -> None:
        self.lam = in_range("lam", lam, 0.0, float("inf"), self.name)
        check(level in LEVELS, f"{self.name}: level={level!r}; choose one of {LEVELS}")
        self.level = level
        self.uses = "param" if level == "param" else "saliency"

    def loss(self, grads: Sequence[Tensor], losses: Tensor) -> tuple[Tensor, dict[str, float]]:
        blocks = list(grads)
        if not blocks:
            raise ShapeError(f"{self.name}: got no gradient blocks")
        T = blocks[0].shape[0]
        if any(b.shape[0] != T for b in blocks):
            shapes = [tuple(b.shape) for b in blocks]
            raise ShapeError(f"{self.name}: blocks with different task dimensions {shapes}")
        out_dtype = blocks[0].dtype
        mats = [b.reshape(T, -1).to(torch.float64) for b in blocks]
        G = mats[0] @ mats[0].T
        for m in mats[1:]:
            G = G + m @ m.T
        if T < 2:
            zero = (G.sum() * 0.0).to(out_dtype)
            return zero, {"cos2_mean": 0.0, "cos_mean": 0.0}
        sq = G.diagonal()
        big = float(sq.detach().max())
        live = sq.detach() > ZERO_REL * big if big > 0 else torch.zeros(T, dtype=torch.bool, device=G.device)
        safe = torch.where(live, sq, torch.ones_like(sq))
        inv = torch.where(live, safe.rsqrt(), torch.zeros_like(sq))
        C = inv[:, None] * G * inv[None, :]
        iu = torch.triu_indices(T, T, offset=1, device=G.device)
        cos = C[iu[0], iu[1]]
        penalty = (cos**2).sum()
        logged = {"cos2_mean": float((cos.detach() ** 2).mean()), "cos_mean": float(cos.detach().mean())}
        return (self.lam * penalty).to(out_dtype), logged
