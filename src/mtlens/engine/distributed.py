"""Data-parallel helpers of the engine: reductions that make a step exact on the global batch.

Every rank holds an equal share of the global batch and computes per-task losses that are
means over its share, so the global loss of task t is the mean of the ranks' losses and every
gradient of the global batch is the mean of the ranks' gradients. The engine reduces:

* parameter level: the per-task gradients themselves (T all-reduces of the shared parameters'
  size, one per task — T× a plain DDP all-reduce) *before* the Gramian is formed, because the
  Gramian of the mean gradients is not the sum of the ranks' Gramians;
* feature level: the T×T saliency Gramian (``G = Σ_r S_r S_rᵀ / W²``: rows of different samples
  are orthogonal coordinates of the global representation, so summing is exact), then the
  written gradients once (one all-reduce, as DDP);
* loss level: the loss values the method sees (T numbers), then the written gradients once.

All collectives use ``torch.distributed`` on the given process group (gloo or nccl).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigurationError


@dataclass(frozen=True)
class Dist:
    """The process group a step is reduced over (``world`` ranks, this one is ``rank``)."""

    group: Any
    world: int
    rank: int

    # -- collectives ---------------------------------------------------------------------------
    def mean_(self, t: Tensor) -> Tensor:
        """All-reduce ``t`` in place to the mean over ranks."""
        torch.distributed.all_reduce(t, group=self.group)
        t.div_(self.world)
        return t

    def sum_(self, t: Tensor) -> Tensor:
        torch.distributed.all_reduce(t, group=self.group)
        return t

    def mean_list(self, tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Mean over ranks of several tensors with one flat all-reduce (``None`` entries stay ``None``
        and must be ``None`` on every rank)."""
        present = [t for t in tensors if t is not None]
        if not present:
            return list(tensors)
        dtype = torch.promote_types(present[0].dtype, torch.float32)
        flat = torch.cat([t.reshape(-1).to(dtype) for t in present])
        self.mean_(flat)
        out: list[Tensor | None] = []
        i = 0
        for t in tensors:
            if t is None:
                out.append(None)
                continue
            n = t.numel()
            out.append(flat[i:i + n].view_as(t).to(t.dtype))
            i += n
        return out

    def mean_tensors(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`mean_list` of tensors without ``None`` entries (typed as such)."""
        return [t for t in self.mean_list(tensors) if t is not None]

    def all_gather_with_grad(self, t: Tensor, dim: int) -> Tensor:
        """Concatenate every rank's ``t`` along ``dim`` (equal shapes), differentiably.

        The backward sums the incoming gradient over ranks and returns this rank's slice: each
        rank computes the same function of the gathered tensor, so the sum is ``W`` times this
        rank's share; the engine's final mean over ranks divides it back."""
        return _GatherWithGrad.apply(t, dim, self)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: Tensor, dim: int, dist: Dist) -> Tensor:
        ctx.dim, ctx.dist, ctx.size = dim, dist, t.shape[dim]
        parts = [torch.empty_like(t) for _ in range(dist.world)]
        torch.distributed.all_gather(parts, t.contiguous(), group=dist.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        g = grad.contiguous().clone()
        torch.distributed.all_reduce(g, group=ctx.dist.group)
        start = ctx.dist.rank * ctx.size
        return g.narrow(ctx.dim, start, ctx.size), None, None


def resolve(distributed: Any) -> Dist | None:
    """``None`` → the default group when ``torch.distributed`` is initialised with > 1 rank;
    ``False`` → no reduction; ``True`` → the default group (must be initialised); a process
    group → that group."""
    if distributed is False:
        return None
    avail = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed is None:
        if not avail or torch.distributed.get_world_size() <= 1:
            return None
        group = None
    elif distributed is True:
        if not avail:
            raise ConfigurationError(
                "distributed=True but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group (torchrun sets the environment) first"
            )
        group = None
    else:
        if not avail:
            raise ConfigurationError("a process group was passed but torch.distributed is not initialised")
        group = distributed
    world = torch.distributed.get_world_size(group)
    if world <= 1:
        return None
    return Dist(group=group, world=world, rank=torch.distributed.get_rank(group))
