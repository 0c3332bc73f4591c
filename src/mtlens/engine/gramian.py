"""Gramian helpers: ``G = J Jᵀ`` from per-parameter Jacobian blocks, without flattening J."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_CHUNK = 1 << 16  # columns converted to float64 at a time: exact, cache-sized, no big temporaries


def gramian_from_blocks(blocks: Sequence[Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
    """``G = Σ_p J_p J_pᵀ`` (T×T) from blocks of shape (T, *shape_p), accumulated in ``dtype``.

    Products are formed in ``dtype`` on column chunks, so the result is as exact as a float64
    product of the whole Jacobian without ever materialising a float64 copy of it.

    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> gramian_from_blocks([J[:, :1], J[:, 1:]])
    tensor([[1., 0.],
            [0., 4.]], dtype=torch.float64)
    """
    if not blocks:
        raise ValueError("gramian_from_blocks needs at least one block")
    T = blocks[0].shape[0]
    G = torch.zeros(T, T, dtype=dtype, device=blocks[0].device)
    for b in blocks:
        for m in b.reshape(T, -1).split(_CHUNK, dim=1):
            m = m.to(dtype)
            G.addmm_(m, m.T)
    return G


def gramian_from_rows(rows: Sequence[Sequence[Tensor]], dtype: torch.dtype = torch.float64) -> Tensor:
    """``G`` from per-task lists of per-parameter gradients, without stacking them into blocks."""
    T = len(rows)
    G = torch.zeros(T, T, dtype=dtype, device=rows[0][0].device)
    for j in range(len(rows[0])):
        flat = [r[j].reshape(-1) for r in rows]
        n = flat[0].numel()
        for start in range(0, n, _CHUNK):
            m = torch.stack([f[start:start + _CHUNK] for f in flat]).to(dtype)
            G.addmm_(m, m.T)
    return G


def combine_rows(weights: Tensor, rows: Sequence[Sequence[Tensor]], inplace: bool = False) -> list[Tensor]:
    """``Σ_t w_t g_t[p]`` for every parameter, from per-task lists of per-parameter gradients.

    ``inplace=True`` accumulates into the first task's tensors (no allocation; they are lost)."""
    w = weights.tolist()
    out = []
    for j in range(len(rows[0])):
        acc = rows[0][j].mul_(w[0]) if inplace else rows[0][j] * w[0]
        for t in range(1, len(rows)):
            acc.add_(rows[t][j], alpha=w[t])
        out.append(acc)
    return out


def combine_blocks(weights: Tensor, blocks: Sequence[Tensor]) -> list[Tensor]:
    """``Σ_t w_t J_p[t]`` for every block, in each block's dtype."""
    return [torch.tensordot(weights.to(b.dtype), b, dims=1) for b in blocks]


def stack_rows(rows: Sequence[Sequence[Tensor | None]], like: Sequence[Tensor]) -> list[Tensor]:
    """Turn per-task lists of per-parameter gradients into per-parameter blocks (T, *shape).

    Missing gradients (``None``: the task does not reach that parameter) become zeros."""
    out = []
    for j, ref in enumerate(like):
        out.append(torch.stack([g if (g := r[j]) is not None else torch.zeros_like(ref) for r in rows]))
    return out
