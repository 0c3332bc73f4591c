"""Base of the weightings updated from a cross-Gramian of two independent batches (SDMGrad, MoDo)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..engine.protocols import LossWeighting
from ..errors import ConfigurationError, NonFiniteError, ShapeError
from ._calls import MISSES_TO_RAISE


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``v`` onto the probability simplex (Duchi et al., ICML 2008, Fig. 1).

    Finite and exact up to rounding: ``v`` is first shifted by its maximum (the projection is
    invariant to adding a constant to every entry), so the cumulative sums are taken over
    ``v_i − max v ≤ 0`` and the largest entry always passes the threshold test; entries of any size
    (1e17 next to 1, where the unshifted sums lose the 1 and no index passed) give weights within
    ``4 T eps`` of the exact projection (tests/methods/test_solver_certificates.py).
    Raises :class:`~mtlens.errors.NonFiniteError` on a non-finite ``v``."""
    v = np.asarray(v, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise NonFiniteError(f"simplex projection of a non-finite vector {v.tolist()}")
    n = v.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):  # −inf differences (entries ±1e308) count as far below
        z = v - v.max()
        u = np.sort(z)[::-1]
        css = np.cumsum(u) - 1.0
        ind = np.arange(1, n + 1)
        # index 0 always passes: u_0 = 0, css_0 = −1. A cumulative sum that overflowed to −inf (entries ±1e308)
        # made u − css/ind = +inf pass wrongly (weights inf/NaN); exactly, the test fails there (u_0 − u_k > 1)
        rho = int(np.nonzero((u - css / ind > 0) & np.isfinite(css))[0][-1])
    theta = css[rho] / (rho + 1)
    return np.maximum(z - theta, 0.0)


class CrossGramianWeighting(LossWeighting):
    """Loss weighting whose weights move with the cross-Gramian ``A = J_ξ J_ξ'ᵀ`` of two batches.

    Before every step the caller passes ``A`` to :meth:`observe_cross_gramian` (the mtlens
    trainer does it when ``needs_second_batch`` is set; in your own loop use
    :func:`mtlens.engine.cross_gramian`); :meth:`weights` then returns the current weights and the
    engine differentiates ``Σ_t w_t L_t`` on the step's own batch (ζ, a third independent batch).
    """

    needs_second_batch = True
    lam: Tensor | None  # buffers
    out: Tensor | None
    stateful = True
    user_calls = ("observe_cross_gramian",)

    def __init__(self) -> None:
        self._since_observed = 0  # weighting calls since the last cross-Gramian (a miss detector)
        self.register_buffer("lam", None)  # the method's iterate λ (T,), float64
        self.register_buffer("out", None)  # the weights it returns until the next cross-Gramian
        self._log: dict[str, float] = {}

    def _check(self, A: Tensor) -> np.ndarray:
        self._since_observed = 0
        M = torch.as_tensor(A).detach().to("cpu", torch.float64)
        if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
            raise ShapeError(f"{self.name}: the cross-Gramian must be a square T×T matrix, got {tuple(M.shape)}")
        if not bool(torch.isfinite(M).all()):
            raise NonFiniteError(f"{self.name}: the cross-Gramian has non-finite entries")
        T = M.shape[0]
        if self.lam is None:
            self.lam = torch.full((T,), 1.0 / T, dtype=torch.float64)
        elif self.lam.shape[0] != T:
            raise ShapeError(f"{self.name}: its weights are for {self.lam.shape[0]} tasks, got a {T}×{T} "
                             "cross-Gramian; create a new method object for a different task set")
        return M.numpy()

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        if self.out is None:
            raise ConfigurationError(
                f"'{self.name}' needs the cross-Gramian of two independent mini-batches before each step "
                "(needs_second_batch): the mtlens trainer supplies it; in your own loop call "
                "method.observe_cross_gramian(mtlens.engine.cross_gramian(losses_a, losses_b, shared_params))"
            )
        self._since_observed += 1
        if self._since_observed > MISSES_TO_RAISE:
            raise ConfigurationError(
                f"'{self.name}': observe_cross_gramian was not called before the last {MISSES_TO_RAISE} steps, so its "
                "weights stopped moving. Before every step call method.observe_cross_gramian("
                "mtlens.engine.cross_gramian(losses_a, losses_b, shared_params)) on two further independent batches"
            )
        if self.out.shape[0] != losses.shape[0]:
            raise ShapeError(f"{self.name}: weights for {self.out.shape[0]} tasks, got {losses.shape[0]} losses")
        return self.out.to(dtype=losses.dtype, device=losses.device).clone()

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
