"""NTKMTL and NTKMTL-SR: task weights from the tasks' neural-tangent-kernel eigenvalues."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..engine.numerics import ZERO_REL
from ..engine.protocols import SCALE_FREE, SYMMETRIC, GramianWeighting, JacobianAggregator
from ..errors import ConfigurationError, NonFiniteError, ShapeError
from ._fair import check_max_norm, clip_update
from ._registry import register
from ._solvers import check_gramian, to_weights
from ._utils import check, positive


def ntk_weights(lam: np.ndarray, ntk_exp: float) -> tuple[np.ndarray, float]:
    """``w_t = (Σ_s λ_s / λ_t)^{ntk_exp}`` for the tasks' largest NTK eigenvalues ``λ`` (T,).

    A task with ``λ_t ≤ ZERO_REL · max λ`` (a zero gradient, :data:`mtlens.engine.numerics.ZERO_REL`)
    gets weight 0 instead of ∞: its gradient is zero, so the update does not depend on its weight. All zero: weights 1.
    Returns ``(w, number of zero tasks)``.
    """
    lam = np.clip(lam, 0.0, None)
    T = lam.shape[0]
    if not lam.max() > 0.0:
        return np.ones(T), float(T)
    live = lam > ZERO_REL * lam.max()
    w = np.zeros(T)
    w[live] = np.power(lam.sum() / lam[live], ntk_exp)
    return w, float(T - live.sum())


@register
class NTKMTL(GramianWeighting):
    """NTKMTL (n = 1): weights ``w_t = (tr G / G_tt)^{ntk_exp}`` from the Gramian's diagonal and trace.

    Reference: Qin, Wang, Liao & Yan, "NTKMTL: Mitigating Task Imbalance in Multi-Task Learning
    from Neural Tangent Kernel Perspective", NeurIPS 2025, arXiv:2510.18258. The paper balances
    the convergence speed of the tasks by weighting each with ``(Σ_j λ_j / λ_i)^{1/2}``, λ_i the
    largest eigenvalue of task i's NTK over n sub-batches; with n = 1 (the variant the authors
    use to compare with gradient methods, README of github.com/jianke0604/NTKMTL) task i's NTK
    is the scalar ``‖g_i‖² = G_ii``. The update is ``d = Σ_t w_t g_t``.

    As in the authors' code (``NTKMTL.ntkgrad`` and ``overwrite_grad`` in
    ``methods/weight_methods.py``), and followed here: the shared update is multiplied by T "to
    match the sum loss" and then its norm is clipped at ``max_norm`` (their ``--max_norm 1.0``;
    written on the weights, ``‖d‖ = √(wᵀGw)``); the task heads get weight 1 (each task's own
    loss gradient, unclipped). ``max_norm=0`` disables the clipping (then ``d(cJ) = c·d(J)``).

    Hyper-parameters (defaults): ``ntk_exp=0.5`` (the paper's square root; the authors' README
    recommends trying 0.75, used in their NYUv2 script); ``max_norm=1.0`` (authors' code).
    A zero-gradient task gets weight 0 (its NTK eigenvalue is 0: ``tr/G_tt`` is infinite).
    """

    name = "ntkmtl"
    reference = ("Qin et al., NTKMTL: Mitigating Task Imbalance in MTL from Neural Tangent Kernel Perspective, "
                 "NeurIPS 2025, arXiv:2510.18258")
    defaults_source = "ntk_exp = 0.5 (paper, Eq. of the NTK ratio); max_norm = 1.0 and ×T (authors' code)"
    head_rule = ("own gradient, unit weights (authors' code: each task's loss is backpropagated, only the shared "
                 "gradient is overwritten and clipped)")

    claims = {
        "permutation_invariant": SYMMETRIC,
    }
    disclaims = {
        "homogeneous": "max_norm = 1 clips the update (authors' code): absolute; homogeneous with max_norm=0",
    }

    def __init__(self, ntk_exp: float = 0.5, max_norm: float = 1.0) -> None:
        self.ntk_exp = positive("ntk_exp", ntk_exp, self.name)
        self.max_norm = check_max_norm(max_norm, self.name)
        self._log: dict[str, float] = {}

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        G, _ = check_gramian(gramian, losses, self.name)
        T = G.shape[0]
        w, zero = ntk_weights(np.diag(G).copy(), self.ntk_exp)
        w, info = clip_update(T * w, G, self.max_norm)
        self._log = {"ntkmtl/zero_tasks": zero, **{f"ntkmtl/{k}": v for k, v in info.items()}}
        return to_weights(w, gramian)

    def head_weights(self, weights: Tensor) -> Tensor:
        """Every head gets its own loss gradient (weight 1), as in the authors' code."""
        return torch.ones_like(weights)

    def log_values(self) -> dict[str, float]:
        return dict(self._log)


@register
class NTKMTLSR(JacobianAggregator):
    """NTKMTL-SR: NTKMTL with n sub-batches, on the shared representation (feature level).

    Reference: Qin et al., NTKMTL, NeurIPS 2025, arXiv:2510.18258 (the "SR" variant: the NTK is
    taken with respect to the shared representation Z over ``n`` sub-batches; the commented
    NTKMTL-SR branch of ``NTKMTL.get_weighted_loss`` in github.com/jianke0604/NTKMTL splits the
    batch with ``torch.chunk(losses, n, dim=0)`` and takes ``δ_ij = ∂L_i^{(j)}/∂Z``).

    Task i's NTK is ``K_i[j, k] = ⟨∂L_i^{(j)}/∂Z, ∂L_i^{(k)}/∂Z⟩`` for the sub-batch losses
    ``L_i^{(j)}``. When the task loss is the mean of per-sample losses, ``∂L_i^{(j)}/∂Z`` is
    ``n_j``-scaled rows j of the saliency ``S_i = ∂L_i/∂Z`` the engine passes, and the sub-batches'
    rows are disjoint, so ``K_i`` is diagonal and ``λ_i = max_j (B/B_j)² ‖S_i[chunk j]‖²`` —
    computed here from the one saliency block, without n extra backward passes. (For losses
    that average over a varying number of valid pixels per sample the per-chunk scale differs
    slightly from ``B/B_j``; that is the only approximation.) The weights are
    ``w_i = (Σ_s λ_s / λ_i)^{ntk_exp}`` and, as in the authors' SR code (a loss weighting
    ``Σ_i w_i L_i``), they apply to the representation and to the heads alike.

    Hyper-parameters (defaults): ``n_sub=4`` (authors' README: "For NTKMTL-SR, n is set to 4
    by default"), ``ntk_exp=0.5`` (paper). The batch dimension of Z (dim 0) must have at least
    ``n_sub`` rows.
    """

    name = "ntkmtl_sr"
    levels = ("feature",)
    reference = "Qin et al., NTKMTL (SR variant), NeurIPS 2025, arXiv:2510.18258"
    defaults_source = "n_sub = 4 (authors' README); ntk_exp = 0.5 (paper)"
    head_rule = "the NTK weights w_t (authors' SR code is the loss weighting Σ_t w_t L_t)"

    claims = {
        "permutation_invariant": SYMMETRIC,
        "homogeneous": SCALE_FREE,
    }

    def __init__(self, n_sub: int = 4, ntk_exp: float = 0.5) -> None:
        check(isinstance(n_sub, int) and not isinstance(n_sub, bool) and n_sub >= 1,
              f"{self.name}: n_sub must be an integer >= 1, got {n_sub!r}")
        self.n_sub = n_sub
        self.ntk_exp = positive("ntk_exp", ntk_exp, self.name)
        self._log: dict[str, float] = {}

    def aggregate(self, jacobian: Sequence[Tensor], losses: Tensor) -> tuple[list[Tensor], Tensor]:
        blocks = list(jacobian)
        if len(blocks) != 1:
            raise ConfigurationError(
                f"{self.name} is defined on the shared representation: it needs one block (T, *Z.shape) "
                f"(level='feature'), got {len(blocks)} blocks (parameter level?)"
            )
        S = blocks[0]
        if S.ndim < 2:
            raise ShapeError(f"{self.name}: expected a block (T, B, ...), got {tuple(S.shape)}")
        T, B = S.shape[0], S.shape[1]
        if self.n_sub > B:
            raise ShapeError(f"{self.name}: the batch has {B} rows, fewer than n_sub={self.n_sub} sub-batches; "
                             "lower n_sub or use a larger batch")
        S64 = S.detach().to(torch.float64).reshape(T, B, -1)
        if not bool(torch.isfinite(S64).all()):
            raise NonFiniteError(f"{self.name}: non-finite saliencies")
        lam = np.zeros(T)
        for chunk in torch.chunk(torch.arange(B), self.n_sub):
            sq = S64[:, chunk].pow(2).sum(dim=(1, 2)) * (B / len(chunk)) ** 2
            lam = np.maximum(lam, sq.cpu().numpy())
        w, zero = ntk_weights(lam, self.ntk_exp)
        self._log = {"ntkmtl_sr/zero_tasks": zero}
        wt = torch.as_tensor(w, dtype=S.dtype, device=S.device)
        combined = torch.tensordot(wt, S, dims=1)
        return [combined], torch.as_tensor(w, dtype=torch.float64, device=S.device)

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
