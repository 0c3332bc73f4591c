"""The cross-Gramian of two independent mini-batches, for methods with ``needs_second_batch``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigurationError, NonFiniteError, ShapeError
from ._autograd import vjp
from .distributed import resolve
from .gradients import trainable

_CHUNK = 1 << 16


def _rows(losses: Sequence[Tensor], params: list[Tensor]) -> list[list[Tensor]]:
    out = []
    for i, loss in enumerate(losses):
        gs = vjp(loss, params, retain_graph=i < len(losses) - 1)
        out.append([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)])
    return out


def _as_list(losses: Mapping[str, Tensor] | Sequence[Tensor]) -> list[Tensor]:
    items = list(losses.values()) if isinstance(losses, Mapping) else list(losses)
    for v in items:
        if not isinstance(v, Tensor) or v.numel() != 1:
            raise ShapeError("cross_gramian: every task loss must be a scalar tensor")
    return [v.reshape(()) for v in items]


def cross_gramian(losses_a: Mapping[str, Tensor] | Sequence[Tensor], losses_b: Mapping[str, Tensor] | Sequence[Tensor],
                  shared_params: Iterable[Tensor], distributed: Any = None) -> Tensor:
    """``A = J_a J_bᵀ`` (T×T, float64): per-task shared-parameter gradients of two batches.

    Args:
        losses_a, losses_b: the T task losses of two independent mini-batches (same task order;
            a mapping's values are taken in order), each attached to its own graph. Both graphs
            are freed.
        shared_params: the parameters the gradients are taken with respect to (the encoder's).
        distributed: as :func:`mtlens.mtl_backward`: ``None`` (the default group when
            ``torch.distributed`` runs with more than one rank), ``False``, ``True`` or a process
            group. Each rank passes the losses of its share of both global batches; the per-task
            gradients are averaged over ranks *before* the product (the cross-Gramian of the mean
            gradients is not the mean of the ranks' cross-Gramians), so every rank gets the same A.

    Returns:
        ``A[i, j] = ⟨∇L_i(ξ_a), ∇L_j(ξ_b)⟩``, accumulated in float64 per parameter, without
        flattening J. Not symmetric in general. Used by SDMGrad and MoDo, whose weight
        updates need an unbiased estimate of the Gramian (Xiao et al., arXiv:2305.18409;
        Chen et al., arXiv:2305.20057). Cost: 2T backward passes.

    Raises:
        ConfigurationError: no shared parameter requires a gradient; ShapeError: different task
        counts; NonFiniteError: a non-finite loss or gradient.
    """
    la, lb = _as_list(losses_a), _as_list(losses_b)
    if len(la) != len(lb) or not la:
        raise ShapeError(f"cross_gramian: {len(la)} and {len(lb)} task losses; both batches need the same T ≥ 1 tasks")
    params = trainable(shared_params)
    if not params:
        raise ConfigurationError("cross_gramian: no shared parameter requires a gradient")
    for name, ls in (("first", la), ("second", lb)):
        vals = torch.stack([v.detach().float() for v in ls])
        if not bool(torch.isfinite(vals).all()):
            raise NonFiniteError(f"cross_gramian: non-finite loss in the {name} batch: {vals.tolist()}")
    ra, rb = _rows(la, params), _rows(lb, params)
    dist = resolve(distributed)
    if dist is not None:  # T all-reduces per batch, as the engine's parameter level
        ra = [dist.mean_tensors(r) for r in ra]
        rb = [dist.mean_tensors(r) for r in rb]
    T = len(la)
    A = torch.zeros(T, T, dtype=torch.float64, device=params[0].device)
    for k in range(len(params)):
        for ca, cb in zip(torch.stack([r[k].reshape(-1) for r in ra]).split(_CHUNK, dim=1),
                          torch.stack([r[k].reshape(-1) for r in rb]).split(_CHUNK, dim=1)):
            A.addmm_(ca.to(torch.float64), cb.to(torch.float64).T)
    if not bool(torch.isfinite(A).all()):
        raise NonFiniteError("cross_gramian: a task gradient is not finite")
    return A
