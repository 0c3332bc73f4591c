"""Reused CPU blocks for the feature level's (T, *Z) stack of saliencies.

A fresh T·|Z| block every step is, on CPU, a fresh mapping of memory most steps: glibc serves a
large request by ``mmap`` (above its dynamic threshold, always above 32 MiB) or from a heap it
trims back after the step, and every page is then faulted in (and zeroed by the kernel) anew.
Measured on the synthetic conv encoder of ``benchmarks/run_all.py`` (B = 8, Z 64×8×8, T = 11):
≈ 550 minor page faults per feature-level step, ≈ 20 % of the step (docs/performance.md,
"Feature-level Gramian methods against EW").

:func:`stack` writes the T tensors into a block kept from an earlier step instead, but only into
one nobody else holds any more: the engine hands out views of the pooled tensor, and a pooled block
is reused only when no tensor other than the pool's own shares its storage (the storage's use
count, which counts every tensor and view on it: the record's ``saliencies``, a method's saved
copy, a NumPy or DLPack export of one of them) and its storage object is not held either.
A block still held is never written: a new one is allocated (at most :data:`PER_KEY` per shape,
then plain ``torch.stack``). The values are those of ``torch.stack`` exactly.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

MIN_BYTES = 1024 * 1024
"""Smaller blocks: plain ``torch.stack``. Below this size no step measured faulted more without the pool than with
it (the synthetic workloads' MGDA feature step and a training loop with an optimiser, conv T ≤ 5 and MLP T ≤ 3),
and the fresh block — memory the allocator freed moments before, still in cache — is cheaper than a pooled one
written a whole step ago: the pool cost 1.5–2 % of the conv step at T = 2–5 (engine / arithmetic floor 1.05
against 1.03–1.04 without it, same-process A/B). From
conv T = 11 (1.4 MiB) up, a fresh stack faulted 16–2 100 times a step and the pool none (docs/performance.md,
"The lean feature step")."""
MAX_BYTES = 256 * 2**20
"""At most this many bytes stay pooled between steps (all shapes together); beyond it, plain ``torch.stack``."""
PER_KEY = 2
"""Blocks per (shape, dtype): two let a training loop keep the last step's record while the next step runs."""

_use_count = getattr(torch._C, "_storage_Use_Count", None)
"""torch's count of the tensors and views sharing a storage (a private API: the one place mtlens reads it)."""
_lock = threading.Lock()
_pool: OrderedDict[tuple, list[tuple[Tensor, tuple[int | None, int]]]] = OrderedDict()


def storage_refs(t: Tensor) -> int | None:
    """Tensors and views sharing ``t``'s storage, or ``None`` when this torch has no such count
    (then nothing is ever reused: this module's blocks, :func:`mtlens.engine.gramian.jacobian_workspace`)."""
    if _use_count is None:
        return None
    try:
        return int(_use_count(t.untyped_storage()._cdata))
    except Exception:  # noqa: BLE001 - any failure only disables reuse
        return None


def _holders(buf: Tensor) -> tuple[int | None, int]:
    return storage_refs(buf), sys.getrefcount(buf.untyped_storage())


def _pooled_bytes() -> int:
    return sum(b.numel() * b.element_size() for entries in _pool.values() for b, _ in entries)


def block(n: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous ``(n, *shape)`` tensor to be filled row by row: a view of a pooled block that no
    live tensor shares (see the module docstring) for CPU blocks of at least :data:`MIN_BYTES`, else a fresh
    ``torch.empty``. Never returns memory another tensor still uses."""
    out = _take(n, tuple(shape), dtype) if device.type == "cpu" else None
    return out if out is not None else torch.empty((n, *shape), dtype=dtype, device=device)


def _take(n: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor | None:
    """A view of a free pooled CPU block ``(n, *shape)`` (a new one while the key has fewer than :data:`PER_KEY` and
    :data:`MAX_BYTES` allows), or ``None``: below :data:`MIN_BYTES`, no use count on this torch, or every block of
    the key still held."""
    nbytes = n * math.prod(shape) * dtype.itemsize
    if _use_count is None or nbytes < MIN_BYTES or nbytes > MAX_BYTES:  # a block beyond the cap evicts nothing
        return None
    key = (n, shape, dtype)
    with _lock:
        entries = _pool.get(key)
        if entries is not None:
            _pool.move_to_end(key)
            for buf, base in entries:
                held = _holders(buf)
                if held[0] is not None and held == base:
                    return buf.view(buf.shape)  # a new tensor on the storage: the block is taken until it dies
        if entries is None or len(entries) < PER_KEY:
            while _pool and _pooled_bytes() + nbytes > MAX_BYTES:  # nbytes ≤ MAX_BYTES: ends with room for it
                _pool.popitem(last=False)  # the least recently used shapes go first
            buf = torch.empty((n, *shape), dtype=dtype)
            _pool.setdefault(key, []).append((buf, _holders(buf)))
            return buf.view(buf.shape)
    return None


def stack(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.stack(tensors)`` (same values, shape, dtype, contiguous), into a reused block where possible.

    CPU tensors of equal shape and dtype whose stack is at least :data:`MIN_BYTES`: the result is a
    view of a pooled block that no live tensor shares (see the module docstring); anything else, or a
    block nobody has released: a fresh ``torch.stack``. Never returns memory another tensor still uses."""
    first = tensors[0]
    if (
        _use_count is None
        or first.device.type != "cpu"
        or first.requires_grad
        or any(t.shape != first.shape or t.dtype != first.dtype or t.device != first.device for t in tensors)
    ):
        return torch.stack(list(tensors))
    out = _take(len(tensors), tuple(first.shape), first.dtype)
    if out is None:
        return torch.stack(list(tensors))
    return torch.stack(list(tensors), out=out)


def clear() -> None:
    """Release every pooled block (their memory returns to the allocator once no view of them is alive)."""
    with _lock:
        _pool.clear()
