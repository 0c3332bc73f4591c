"""Maths on representation-level task saliencies ``S_t = ∂L_t/∂Z`` shared by methods and diagnostics.

The engine computes the saliencies (:attr:`mtlens.engine.StepRecord.saliencies`, the block a
:class:`~mtlens.engine.Regularizer` receives); this module holds what both Rep-MTL
(:mod:`mtlens.methods.rep_mtl`) and the diagnostics (:mod:`mtlens.diagnose`) compute from them, so
that neither imports the other:

* :func:`saliency_stack` — one ``(T, ...)`` tensor from the stacked block or a list of T tensors;
* :func:`normalise_over_tasks` / :func:`task_entropy` — the L1 distribution over tasks at every
  location and its entropy, exact at any scale;
* :func:`tsr_loss` — Rep-MTL's Task-specific Saliency Regulation (Eqs. 4–6, Wang et al., ICCV 2025,
  arXiv:2507.21049), also the TSR-entropy identifier of :func:`mtlens.diagnose.tsr_entropy`.

Every quantity is homogeneous of degree 0 in the scale it is normalised by, so each is rescaled by a
detached maximum before normalising, which changes neither the value nor the gradient (saliencies of
1e-10 give the value of saliencies of 1; no ``eps`` enters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ShapeError

__all__ = [
    "channels_by_locations",
    "normalise_over_tasks",
    "safe_divisor",
    "saliency_stack",
    "task_entropy",
    "tsr_from_channel_means",
    "tsr_loss",
]


def saliency_stack(
    saliencies: Tensor | Sequence[Tensor], min_ndim: int = 2, what: str = "saliencies"
) -> Tensor:
    """Return the saliencies as one tensor with a leading task dimension ``(T, ...)``.

    Accepts the engine's stacked block (``StepRecord.saliencies`` / the block a regulariser
    receives) or a sequence of ``T`` per-task tensors of equal shape. ``min_ndim`` counts the
    task dimension. Half-precision inputs are promoted to float32 (the penalties take fourth
    powers of normalised values, which float16 cannot hold)."""
    if isinstance(saliencies, Tensor):
        S = saliencies
    elif (
        isinstance(saliencies, Sequence)
        and len(saliencies) > 0
        and all(isinstance(s, Tensor) for s in saliencies)
    ):
        shapes = [tuple(s.shape) for s in saliencies]
        if len(set(shapes)) != 1:
            raise ShapeError(
                f"{what}: the per-task tensors must share one shape (location b of every task is "
                f"compared position by position); got shapes {shapes}"
            )
        S = torch.stack(list(saliencies))
    else:
        raise ShapeError(
            f"{what} must be a tensor (T, B, ...) or a non-empty sequence of T tensors, "
            f"got {type(saliencies).__name__}"
        )
    if S.ndim < min_ndim:
        raise ShapeError(
            f"{what} must have at least {min_ndim} dimensions (task first: (T, B, C, H, W) or (T, B, C)); "
            f"got shape {tuple(S.shape)}"
        )
    if S.numel() == 0:
        raise ShapeError(f"{what} are empty: shape {tuple(S.shape)}")
    if not S.is_floating_point():
        raise ShapeError(f"{what} must be floating point, got {S.dtype}")
    if S.dtype in (torch.float16, torch.bfloat16):
        S = S.float()
    return S


def safe_divisor(x: Tensor) -> Tensor:
    """``x`` where it is positive, 1 elsewhere (a divisor that never produces inf or NaN)."""
    return torch.where(x > 0, x, 1.0)


def normalise_over_tasks(a: Tensor, dim: int = 0) -> Tensor:
    """L1 distribution over tasks ``p = a / Σ_t a`` of non-negative ``a``, exact at any scale.

    Each location is first divided by its (detached) maximum over tasks, so magnitudes of 1e-10
    give exactly the distribution of magnitudes of 1 and no ``eps`` enters. Locations where every
    task is zero get ``p = 0`` for every task (zero entropy), with finite gradients."""
    m = a.detach().amax(dim=dim, keepdim=True)
    r = a / safe_divisor(m)
    return r / safe_divisor(r.sum(dim=dim, keepdim=True))


def task_entropy(p: Tensor, dim: int = 0) -> Tensor:
    """``-Σ_t p_t log p_t`` over ``dim`` with ``0 log 0 = 0`` and finite gradients at ``p = 0``."""
    return -(p * torch.log(safe_divisor(p))).sum(dim=dim)


def channels_by_locations(S: Tensor) -> Tensor:
    """``(T, B, C, *spatial)`` → ``(T, B, C, L)`` with ``L = Π spatial`` (``L = 1`` for vectors)."""
    T, B, C = S.shape[:3]
    return S.reshape(T, B, C, -1)


# --------------------------------------------------------------------------------------------
def tsr_loss(saliencies: Tensor | Sequence[Tensor]) -> Tensor:
    """Task-specific Saliency Regulation ``L_tsr`` (Rep-MTL Eqs. 4–6, arXiv:2507.21049).

    ``Ŝ_t[b, l] = mean_c S_t[b, c, l]`` (signed), ``P[i, t] = |Ŝ_t[i]| / Σ_k |Ŝ_k[i]|`` at every
    location ``i = (b, l)``, ``L_tsr = mean_i (−Σ_t P[i, t] log P[i, t])``. Locations where every
    task's channel mean is zero contribute zero entropy and still count in the mean. Exact at any
    saliency scale; differentiable (twice) with finite gradients at zeros.

    Args:
        saliencies: ``(T, B, C, *spatial)`` or ``(T, B, C)``, or a list of ``T`` tensors
            ``(B, C, ...)``.

    Returns:
        a scalar tensor in ``[0, log T]``.
    """
    S = saliency_stack(saliencies, min_ndim=3, what="tsr_loss saliencies")
    return tsr_from_channel_means(channels_by_locations(S).mean(dim=2))


def tsr_from_channel_means(s_hat: Tensor) -> Tensor:
    """``L_tsr`` from the signed channel means ``Ŝ`` of shape ``(T, B, L)`` (Eq. 4 already applied): the L1
    distribution over tasks at every location (Eq. 5) and its mean entropy (Eq. 6). :func:`tsr_loss` is
    ``tsr_from_channel_means(S.mean over channels)``; Rep-MTL's penalty takes the means from the pass it shares
    with CSA (:func:`mtlens.methods.rep_mtl.penalty_terms`)."""
    p = normalise_over_tasks(s_hat.abs(), dim=0)  # Eq. 5
    return task_entropy(p, dim=0).mean()  # Eq. 6
