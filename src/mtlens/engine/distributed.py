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

import math
import zlib
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
    device: torch.device = torch.device("cpu")  # where the engine's own small tensors go (:func:`collective_device`)

    # -- collectives ---------------------------------------------------------------------------
    def mean_(self, t: Tensor) -> Tensor:
        """All-reduce ``t`` in place to the mean over ranks (a float16/bfloat16 tensor summed in float32: the
        ranks' values rounded once, as the one-process mean of the global batch, not at every partial sum)."""
        if t.dtype in (torch.float16, torch.bfloat16):
            wide = t.float()
            torch.distributed.all_reduce(wide, group=self.group)
            return t.copy_(wide.div_(self.world))
        torch.distributed.all_reduce(t, group=self.group)
        t.div_(self.world)
        return t

    def sum_(self, t: Tensor) -> Tensor:
        torch.distributed.all_reduce(t, group=self.group)
        return t

    def mean_list(self, tensors: Sequence[Tensor | None], like: Sequence[Tensor] | None = None
                  ) -> list[Tensor | None]:
        """Mean over ranks of several gradients with one flat all-reduce: what the global batch's gradients are.

        ``like`` (the parameters, in ``tensors``' order; the same list on every rank): an entry may be ``None``
        on some ranks — a parameter no loss of this rank's share reaches (an expert no sample was routed to) —
        and set on others. It is reduced as zeros there, and every rank gets the mean, as the one-process step
        on the global batch writes it and as ``DistributedDataParallel`` does; an entry ``None`` on every rank
        stays ``None`` everywhere (no loss of the global batch reaches it: its ``.grad`` is left as it was).
        Whether an entry was set travels in the same all-reduce (one flag per entry), so every rank agrees.
        Without ``like`` a ``None`` entry must be ``None`` on every rank.

        Sparse gradients (``nn.Embedding(sparse=True)``) are reduced dense and come back sparse on exactly the
        rows some rank's gradient touched (:meth:`touched_union`; a second all-reduce, of one number per row, only
        when some rank's gradient was sparse): the communication of a dense all-reduce of the table. Complex
        gradients travel as their real views (real and imaginary parts). The buffer is float64 if any entry is
        float64 or complex128, else float32 (float16/bfloat16 gradients summed in float32); each result has its
        entry's dtype.

        Raises:
            ConfigurationError: the ranks passed lists of different sizes (caught by the all-reduce's size check
                where the backend has one).
        """
        n = len(tensors)
        if like is not None and len(like) != n:
            raise ValueError(f"mean_list: {n} tensors but {len(like)} parameters")
        if n == 0 or (like is None and all(t is None for t in tensors)):  # nothing (every head frozen): no reduction
            return list(tensors)
        kinds = [t if t is not None else (like[i] if like is not None else None) for i, t in enumerate(tensors)]
        wide = any(k is not None and k.dtype in (torch.float64, torch.complex128) for k in kinds)
        dtype = torch.float64 if wide else torch.float32
        device = next(k for k in kinds if k is not None).device
        parts: list[Tensor] = []
        for t, k in zip(tensors, kinds):
            if k is None:  # None here and no parameter given: None on every rank (the caller's promise)
                continue
            if t is None:
                parts.append(torch.zeros(k.numel() * (2 if k.is_complex() else 1), dtype=dtype, device=device))
                continue
            if t.layout != torch.strided:
                t = t.to_dense()
            if t.is_complex():
                t = torch.view_as_real(t.resolve_conj())
            parts.append(t.reshape(-1).to(dtype))
        flags: Tensor | None = None
        if like is not None:  # per entry, summed over ranks: set here (1), sparse here (1), its sparse_dim
            sparse_here = [t is not None and t.layout == torch.sparse_coo for t in tensors]
            flags = torch.tensor([float(t is not None) for t in tensors] + [float(sp) for sp in sparse_here]
                                 + [float(t.sparse_dim()) if sp and t is not None else 0.0
                                    for t, sp in zip(tensors, sparse_here)], dtype=dtype, device=device)
            parts.append(flags)
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        torch.distributed.all_reduce(flat, group=self.group)
        got: list[float] | None = None
        touched: dict[int, Tensor] = {}
        if flags is not None and like is not None:
            got = flat[flat.numel() - 3 * n:].tolist()
            flat = flat[: flat.numel() - 3 * n]
            sparse_any = [e for e in range(n) if got[n + e] > 0]
            if sparse_any:  # the rows every rank's sparse gradient touched, the same on every rank
                shapes = [(tuple(like[e].shape), round(got[2 * n + e] / got[n + e])) for e in sparse_any]
                local = [[t._indices()] if sparse_here[e] and (t := tensors[e]) is not None else []
                         for e in sparse_any]
                touched = dict(zip(sparse_any, self.touched_union(shapes, local)))
        elif any(t is not None and t.layout != torch.strided for t in tensors):
            raise ValueError("mean_list: sparse gradients need like= (the rows every rank touched are agreed on)")
        flat.div_(self.world)
        out: list[Tensor | None] = []
        i = 0
        for e, k in enumerate(kinds):
            if k is None:
                out.append(None)
                continue
            m = k.numel() * (2 if k.is_complex() else 1)
            piece = flat[i:i + m]
            i += m
            if got is not None and got[e] == 0:  # no rank's share reaches it
                out.append(None)
                continue
            if k.is_complex():
                g = torch.view_as_complex(piece.view(*k.shape, 2)).to(k.dtype)
            else:
                g = piece.view(k.shape).to(k.dtype)
            idx = touched.get(e)
            if idx is not None:
                idx = idx.to(g.device)
                g = torch.sparse_coo_tensor(idx, g[tuple(idx)], g.shape, dtype=g.dtype, device=g.device,
                                            is_coalesced=True)
            out.append(g)
        return out

    def touched_union(self, shapes: Sequence[tuple[tuple[int, ...], int]],
                      local: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """Per sparse parameter (``shapes[i]``: its shape and ``sparse_dim``), the indices that any rank's sparse
        gradients touched (``local[i]``: this rank's index tensors, ``(sparse_dim, nnz)`` each), sorted as a
        coalesced tensor's, the same on every rank: one all-reduce of a mask of the rows of every such parameter.
        ``loss.backward()`` keeps every touched row in the sparse ``.grad`` (one whose gradient is exactly zero
        too), which ``torch.optim.SparseAdam`` updates."""
        sizes = [math.prod(shape[:sd]) for shape, sd in shapes]
        mask = torch.zeros(sum(sizes), dtype=torch.float32, device=self.device)
        at = 0
        for (shape, sd), size, idx in zip(shapes, sizes, local):
            for ix in idx:
                if ix.numel():
                    lin = torch.zeros(ix.shape[1], dtype=torch.int64)
                    for d in range(sd):
                        lin = lin * shape[d] + ix[d].cpu()
                    mask[at + lin.to(self.device)] = 1.0
            at += size
        torch.distributed.all_reduce(mask, group=self.group)
        out: list[Tensor] = []
        at = 0
        for (shape, sd), size, idx in zip(shapes, sizes, local):
            lin = torch.nonzero(mask[at:at + size]).flatten().cpu()
            device = idx[0].device if idx else torch.device("cpu")
            out.append(torch.stack(torch.unravel_index(lin, shape[:sd])).to(device) if sd else lin.reshape(0, -1))
            at += size
        return out

    def mean_tensors(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`mean_list` of tensors without ``None`` entries (typed as such)."""
        return [t for t in self.mean_list(tensors) if t is not None]

    def reached_anywhere(self, reached: Sequence[bool]) -> list[bool]:
        """Per entry, whether any rank's flag is set (one all-reduce of ``len(reached)`` numbers): a parameter
        reached by some rank's share is reached by the global batch."""
        flags = torch.tensor([float(r) for r in reached], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(flags, group=self.group)
        return [f > 0 for f in flags.tolist()]

    def check_same_params(self, params: Sequence[Tensor], what: str) -> None:
        """Raise :class:`ConfigurationError` on every rank together unless every rank passes a list of the same
        length, shapes and dtypes (one all-reduce of 4 numbers): a list found from a rank's own graph differs
        between ranks when the graph depends on the data (an expert or a head only some samples reach), and the
        reduction that follows would pair different parameters (gloo aborts the process, NCCL may hang)."""
        same, n_lo, n_hi = self._same_everywhere(";".join(f"{tuple(p.shape)}{p.dtype}" for p in params), len(params))
        if not same:
            raise ConfigurationError(
                f"data parallelism: the {what} that the losses reach differ between ranks (rank {self.rank} found "
                f"{len(params)}; between {-n_lo} and {n_hi} over the ranks): the model's graph depends on the data "
                "(an expert, a head or a branch only some samples reach), and the ranks cannot reduce their "
                "gradients parameter by parameter. Pass task_params=[every task-specific parameter] and "
                "shared_params=[every encoder parameter] to mtl_backward, so that every rank reduces the same list "
                "(a parameter one rank's share does not reach is reduced as zeros there; docs/engine.md, "
                "'Data parallelism')."
            )

    def check_same_tasks(self, names: Sequence[str]) -> None:
        """Raise :class:`ConfigurationError` on every rank together unless every rank passes the same tasks in the
        same order (one all-reduce of 4 numbers, before the losses' own): a task left out on a rank whose share has
        no sample for it would make the ranks reduce loss vectors of different lengths (gloo aborts the process,
        NCCL may hang)."""
        same, n_lo, n_hi = self._same_everywhere("\x1f".join(names), len(names))
        if not same:
            raise ConfigurationError(
                f"data parallelism: the ranks passed different tasks (rank {self.rank}: {list(names)}; between "
                f"{n_lo} and {n_hi} tasks over the ranks). Every rank must pass every task's loss, in the same order: "
                "a task with no labelled sample in a rank's share still needs its loss there, as a mean over the "
                "share (the masked sum divided by the share's size: zero, attached to the graph, where there is no "
                "sample), so that the mean over the ranks is the global batch's loss (docs/engine.md, "
                "'Data parallelism')."
            )

    def _same_everywhere(self, signature: str, count: int) -> tuple[bool, int, int]:
        """Whether every rank passed the same ``signature`` and ``count`` (one MAX all-reduce of 4 numbers), with
        the smallest and largest count over the ranks."""
        sig = zlib.crc32(signature.encode())
        v = torch.tensor([sig, -sig, count, -count], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.MAX, group=self.group)
        hi, lo, n_hi, n_lo = v.tolist()
        return hi == -lo and n_hi == -n_lo, -n_lo, n_hi

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
    return Dist(group=group, world=world, rank=torch.distributed.get_rank(group), device=collective_device(group))


def collective_device(group: Any) -> torch.device:
    """The device of the small tensors the engine all-reduces itself (flags, checksums, masks): the CPU where the
    group's backend takes CPU tensors (gloo, mpi, a ``"cpu:gloo,cuda:nccl"`` pair), else the accelerator of this
    process (NCCL takes CUDA tensors only; XCCL XPU ones)."""
    backend = str(torch.distributed.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if "xccl" in backend and hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu", torch.xpu.current_device())
    return torch.device("cpu")
