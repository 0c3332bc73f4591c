"""Gramian helpers: ``G = J Jᵀ`` from per-parameter Jacobian blocks, without flattening J."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor
from torch._utils import _unflatten_dense_tensors  # views of one flat tensor, in C++

from .pool import storage_refs

CHUNK = 4096
"""Columns per float32 product. Each chunk's T×T product is an sgemm over at most ``CHUNK`` terms
(relative error ~√CHUNK·2⁻²⁴ ≈ 4e-6 at worst-typical, far below the float32 gradients' own
rounding in a backward pass); the chunks' products are summed in float64, so the error does not
grow with the number of parameters. ~3× cheaper than float64 products (no float64 copy, sgemm)."""


_F32, _F64 = torch.float32, torch.float64


def _accumulate_gram(G: Tensor, m: Tensor) -> None:
    """``G += m mᵀ`` for ``m`` of shape (T, n).

    float64 ``m``, fewer than ``CHUNK`` columns, or ``m`` already in ``G``'s (non-float64) dtype:
    one product in ``G``'s dtype (exact: float32 products fit in float64). Larger float32 /
    float16 / bfloat16 blocks into a float64 ``G``: products in float32 on column chunks of
    ``CHUNK`` (one batched sgemm for all full chunks), each chunk's T×T result added in float64."""
    if m.is_complex():  # a complex parameter's gradients are vectors of R^2n: Re(g_s^H g_t) from the real views
        m = torch.view_as_real(m).reshape(m.shape[0], -1)
    T, n = m.shape
    if m.dtype == torch.float64 or (G.dtype != torch.float64 and m.dtype == G.dtype) or n < CHUNK:
        m = m.to(G.dtype)  # float64 blocks, or a small block: exact and cheap in G's dtype
        G.addmm_(m, m.T)
        return
    G.add_(_gram_float32(m if m.dtype == torch.float32 else m.float(), G.dtype))


_UPPER: dict[tuple[int, torch.device], Tensor] = {}
"""Per (T, device): the boolean mask of the upper triangle (diagonal included) :func:`_symmetric` selects."""


def _symmetric(G: Tensor) -> Tensor:
    """``G``'s upper triangle mirrored into the lower one: exactly symmetric, in one op (``torch.where`` with a
    cached mask; ``(G + Gᵀ)/2`` took three, each ≈ 15–25 µs cold inside a training step). The two triangles
    differ by round-off only (the sgemm kernel may order the (i, j) and (j, i) sums differently; MKL's does
    at T = 11)."""
    T = G.shape[0]
    if T == 1:
        return G
    key = (T, G.device)
    mask = _UPPER.get(key)
    if mask is None:
        mask = _UPPER[key] = torch.ones(T, T, dtype=torch.bool, device=G.device).triu_()
    return torch.where(mask, G, G.mT)


@functools.lru_cache(maxsize=64)
def _chunk_width(n: int) -> int:
    """The widest ``w ≤ CHUNK`` dividing ``n`` into at most twice the fewest chunks (``CHUNK`` itself for a multiple
    of :data:`CHUNK`; the conv benchmark's P = 56 640: 15 chunks of 3 776), so that one batched product covers
    every column with no tail; 0 where none does (e.g. a prime ``n``)."""
    c0 = -(-n // CHUNK)
    for c in range(c0, 2 * c0 + 1):
        if n % c == 0:
            return n // c
    return 0


def _gram_float32(m: Tensor, dtype: torch.dtype) -> Tensor:
    """``m mᵀ`` of one float32 block (T, n ≥ CHUNK; rows may be strided) into a new ``dtype`` matrix, not
    symmetrised: float32 products on column chunks of at most :data:`CHUNK` columns (one batched sgemm, read in
    place through a strided view: no copy), each chunk's T×T product summed in ``dtype``.

    The chunks: equal chunks of :func:`_chunk_width` columns; where there is no such width, ``CHUNK`` columns
    each, the last one reaching into the row's zeros, for whole rows of :func:`jacobian_workspace`'s padded buffer
    (:func:`_zero_padded`); else the full chunks and the tail's own float32 product. The one implementation of
    the chunked product (:func:`_accumulate_gram`, :func:`gramian_from_blocks`, :func:`gramian_from_matrix`)."""
    T, n = m.shape
    s, one = m.stride()  # rows' stride: any value when T = 1 (row 0 only)
    if one != 1:
        m = m.contiguous()
        s = n
    w = _chunk_width(n)
    if w:
        c = n // w
    else:
        w = CHUNK
        c = -(-n // CHUNK) if _zero_padded(m) else n // CHUNK
    x = m.as_strided((c, T, w), (w, s, 1))  # chunk k of every row, a view
    G = torch.bmm(x, m.as_strided((c, w, T), (w, 1, s))).sum(0, dtype=dtype)
    if c * w < n:  # no equal chunks: the tail's own product
        tail = m[:, c * w:]
        G.add_((tail @ tail.T).to(dtype))
    return G


def gramian_from_blocks(blocks: Sequence[Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
    """``G = Σ_p J_p J_pᵀ`` (T×T) from blocks of shape (T, *shape_p), accumulated in ``dtype``.

    float64 blocks and blocks of fewer than :data:`CHUNK` columns: float64 products (exact to
    float64 round-off). Larger float32 (and half-precision) blocks: float32 products on column
    chunks of :data:`CHUNK`, summed in float64 — relative error ~1e-6 of ``Σ_i |J_ti J_si|`` at
    worst-typical, no float64 copy of J, ~3× cheaper than float64 products.
    The result is symmetrised.

    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> gramian_from_blocks([J[:, :1], J[:, 1:]])
    tensor([[1., 0.],
            [0., 4.]], dtype=torch.float64)
    """
    if not blocks:
        raise ValueError("gramian_from_blocks needs at least one block")
    T = blocks[0].shape[0]
    if len(blocks) == 1 and blocks[0].dtype == torch.float32 and dtype == torch.float64 \
            and blocks[0].numel() >= T * CHUNK:  # one large float32 block (the feature level's (T, *Z) stack)
        return _symmetric(_gram_float32(blocks[0].reshape(T, -1), dtype))
    G = torch.zeros(T, T, dtype=dtype, device=blocks[0].device)
    for b in blocks:
        _accumulate_gram(G, b.reshape(T, -1))
    return _symmetric(G)


BUFFER_BYTES = 4 * 2**20
"""Size of the buffer :func:`gramian_from_rows` copies column chunks of the T rows into, reused for every
copy of one call: a few MiB stay in the last-level cache (and, unlike a T × n stack of a large parameter,
never exceed glibc's largest mmap threshold, 32 MiB, above which every step maps and faults in anew)."""


def gramian_exact(blocks: Sequence[Tensor]) -> Tensor:
    """``G = Σ_p J_p J_pᵀ`` (T×T, float64, symmetrised) with float64 products of every block (each converted): the
    rare path where the float32 chunk products of :func:`gramian_from_blocks` / :func:`gramian_from_matrix`
    overflowed — a chunk's sum of products beyond float32's 3.4e38, from finite saliencies or gradients of ~1e17
    and more — which the callers recompute here when the Gramian's diagonal is not finite but every gradient is.
    Before, such a step was refused as a "non-finite gradient" that ``loss.backward()`` computes finite."""
    T = blocks[0].shape[0]
    G = torch.zeros(T, T, dtype=_F64, device=blocks[0].device)
    for b in blocks:
        m = b.reshape(T, -1)
        if m.is_complex():
            m = torch.view_as_real(m).reshape(T, -1)
        m = m.to(_F64)
        G.addmm_(m, m.T)
    return _symmetric(G)


def gramian_from_rows(rows: Sequence[Sequence[Tensor]], dtype: torch.dtype = torch.float64) -> Tensor:
    """``G`` from per-task lists of per-parameter gradients, with the precision of
    :func:`gramian_from_blocks`.

    Large float32 parameters are never stacked whole (a T × n stack is a fresh allocation per step,
    and one above 32 MiB — glibc's largest mmap threshold — page-faults all its pages every step):
    the T rows' columns are copied, several :data:`CHUNK`-column chunks at a time, into one reused
    buffer of about :data:`BUFFER_BYTES`, and each copy's chunks are multiplied by one batched
    sgemm, every chunk's T×T product summed in float64 (the same products as
    :func:`gramian_from_blocks`). Parameters under :data:`CHUNK` columns and the chunks' tails are
    gathered into one float64 matrix and multiplied once (exact products). Other dtypes (float64,
    half precision) or a non-float64 ``dtype``: per parameter, as :func:`gramian_from_blocks`."""
    T = len(rows)
    G = torch.zeros(T, T, dtype=dtype, device=rows[0][0].device)
    buf: Tensor | None = None  # flat: T × (columns of one copy), contiguous
    g32: Tensor | None = None
    rest_rows: list[list[Tensor]] = [[] for _ in range(T)]
    per_copy = max(1, BUFFER_BYTES // (4 * T * CHUNK)) * CHUNK  # columns per copy: whole chunks
    for j in range(len(rows[0])):
        flat = [r[j].reshape(-1) for r in rows]
        n = flat[0].numel()
        if flat[0].dtype != torch.float32 or dtype != torch.float64:
            _accumulate_gram(G, torch.stack(flat))
            continue
        full = n - n % CHUNK
        if full:
            if buf is None or buf.numel() < T * min(per_copy, full):
                buf = torch.empty(T * min(per_copy, full), dtype=torch.float32, device=G.device)
            for start in range(0, full, per_copy):
                stop = min(start + per_copy, full)
                x = buf[: T * (stop - start)].view(T, stop - start)  # contiguous
                torch.stack([f[start:stop] for f in flat], out=x)
                c = (stop - start) // CHUNK
                if c == 1:
                    if g32 is None:
                        g32 = torch.empty(T, T, dtype=torch.float32, device=G.device)
                    G.add_(torch.mm(x, x.T, out=g32))
                else:
                    y = x.reshape(T, c, CHUNK).transpose(0, 1)  # (c, T, CHUNK) view of the copy
                    G.add_(torch.bmm(y, y.transpose(1, 2)).sum(0, dtype=G.dtype))
        if full < n:
            for t in range(T):
                rest_rows[t].append(flat[t][full:])
    if rest_rows[0]:  # per task: the small parameters and the tails, in order
        m = torch.stack([torch.cat(r) for r in rest_rows]).to(G.dtype)  # float32 products are exact in float64
        G.addmm_(m, m.T)
    return _symmetric(G)


def _calibrate_free_refs() -> int | None:
    """The count :func:`~mtlens.engine.pool.storage_refs` gives for a tensor nothing else shares, checked to rise with a
    view and fall back without it; ``None`` (never reuse a workspace) when that does not hold."""
    a = torch.empty(1)
    free = storage_refs(a)
    view = a[:1]
    shared = storage_refs(a)
    del view
    if free is None or shared is None or shared <= free or storage_refs(a) != free:
        return None
    return free


_FREE_REFS = _calibrate_free_refs()
_WORKSPACE: dict[tuple, Tensor] = {}
_PADDED = "_mtlens_zero_padded"
"""Attribute of a :func:`jacobian_workspace` buffer whose rows are padded with zeros: ``(P, row stride)``."""


def _zero_padded(J: Tensor) -> bool:
    """Whether ``J`` is whole rows of a :func:`jacobian_workspace` buffer with zero padding: each row then runs on
    in zeros up to a multiple of :data:`CHUNK` (columns nobody writes nor sees)."""
    base = J._base
    pad = getattr(base, _PADDED, None) if base is not None else None
    return (pad is not None and J.dim() == 2 and J.shape[1] == pad[0] and J.stride() == (pad[1], 1)
            and J.storage_offset() % pad[1] == 0)


def jacobian_workspace(T: int, like: Sequence[Tensor]) -> Tensor | None:
    """The Jacobian as one ``(T, P)`` matrix (``P = Σ_p p.numel()`` over ``like``, in order), a view of one
    CPU buffer reused from step to step; ``None`` where it does not apply (not on the CPU, mixed dtypes or
    devices, no parameters). Row ``t`` is task ``t``'s gradient flattened over all parameters; each
    parameter's block is a strided view of it (:func:`matrix_blocks`). float32 rows of ``P > CHUNK`` columns
    that no equal chunk width divides (:func:`_chunk_width` is 0) are strided: the buffer is ``(T, P_pad)``,
    ``P_pad`` the next multiple of ``CHUNK``, and the matrix returned is its ``[:, :P]`` view; the padding is
    zeroed once, when the buffer is allocated, and no view handed out reaches it (rows are written through
    ``J[t]``), so that :func:`gramian_from_matrix` multiplies whole chunks in one batched product, with no tail.

    Why one buffer: per-task gradients kept for the whole step (``T·P`` floats) are freed together at its
    end; glibc then returns the top of its heap to the system, and the next step faults every page back
    in (7 158 minor faults a step, ≈ 28 MiB, at the MLP benchmark's T = 11; 11 812 at T = 40). Rows
    copied here as each task's backward returns them leave only one task's gradients to the allocator,
    which it reuses in place. Why one matrix: the Gramian (:func:`gramian_from_matrix`), the combination
    (:func:`combine_matrix`) and the finiteness check are then one op each over the whole Jacobian
    instead of one (or several) per parameter. The buffer stays allocated between steps (the ``T·P``
    floats the step holds anyway at its peak); :func:`release_workspace` frees it.

    Safe against aliasing: a buffer is reused only when nothing else references its storage (a method
    that kept a block, a view of it, the same step in another thread — then a fresh buffer is
    allocated), judged by the storage's reference count, which :data:`_FREE_REFS` calibrates at import
    (reuse is off where the count is unavailable)."""
    if not like:
        return None
    dev, dt = like[0].device, like[0].dtype
    if dev.type != "cpu" or any(p.device != dev or p.dtype != dt for p in like):
        return None
    P = sum(p.numel() for p in like)
    # rows padded with zeros only where the Gramian has no equal chunks to take (_chunk_width)
    width = -(-P // CHUNK) * CHUNK if dt == torch.float32 and P > CHUNK and not _chunk_width(P) else P
    key = (dev, dt, T, P)
    ws = _WORKSPACE.pop(key, None)  # atomic: a concurrent step finds none and allocates its own
    if ws is None or _FREE_REFS is None or storage_refs(ws) != _FREE_REFS:
        ws = torch.empty(T, width, dtype=dt, device=dev)
        if width > P:
            ws[:, P:].zero_()
            setattr(ws, _PADDED, (P, width))
    # a tensor of its own on the storage, made BEFORE the buffer goes back: the buffer is taken until it (and its
    # views) die, so a step in another thread that pops it in between finds it referenced and allocates its own
    out = ws[:, :P] if width > P else ws.view(T, P)
    if _FREE_REFS is not None:
        _WORKSPACE.clear()  # one buffer: a second model or T replaces it
        _WORKSPACE[key] = ws
    return out


def matrix_blocks(J: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Per-parameter views ``(T, *p.shape)`` of a ``(T, P)`` Jacobian laid out as :func:`jacobian_workspace`'s
    (columns in ``like``'s order). Each is strided (row stride ``J.stride(0)``, ``P`` or the padded width):
    ``b.reshape(T, -1)`` and ``b[t]`` are views, ``b.view(-1)`` is not possible."""
    out, off = [], 0
    T = J.shape[0]
    for p in like:
        n = p.numel()
        out.append(J[:, off:off + n].view(T, *p.shape))
        off += n
    return out


def split_flat(v: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views ``p.shape`` of consecutive slices of the flat vector ``v`` (``like``'s order), made in one C++
    call (the unflatten DDP's buckets use; a third of the time of a Python ``split`` + ``view`` loop)."""
    return list(_unflatten_dense_tensors(v, list(like)))


def gramian_from_matrix(J: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``G = J Jᵀ`` (T×T, exactly symmetric) of a ``(T, P)`` matrix whose rows may be strided, with the precision
    contract of :func:`gramian_from_blocks` over the whole row: float32 (or half precision) ``J`` into a float64
    ``G``: float32 products on column chunks of at most :data:`CHUNK` columns (one batched sgemm over all of
    them, read in place: no copy of J), each chunk's T×T product summed in float64 (the chunks:
    :func:`_gram_float32`; :func:`jacobian_workspace`'s zero-padded matrix in whole chunks of ``CHUNK``);
    all columns when ``P < CHUNK`` in one float64 product (exact).
    float64 ``J`` or a non-float64 ``dtype``: one product in ``dtype``.

    Errors relative to ``Σ_i |J_ti J_si|`` ~1e-6 at worst-typical (√CHUNK·2⁻²⁴), independent of P.
    Inside a training step (cold caches) at the conv benchmark's T = 3: three torch ops (bmm, float64 sum,
    symmetrisation) instead of ~12 (docs/performance.md, "The Gramian inside a step")."""
    T, n = J.shape
    if J.dtype is _F32 and dtype is _F64 and n >= CHUNK:  # the workspace's case first: fewest Python steps
        return _symmetric(_gram_float32(J, _F64))
    if J.is_complex():  # a complex parameter's gradients are vectors of R^2P: Re(J J^H) from the real view
        return gramian_from_matrix(torch.view_as_real(J).reshape(T, 2 * n), dtype)
    if J.dtype == torch.float64 or dtype != torch.float64 or n < CHUNK:
        m = J.to(dtype)
        return _symmetric(torch.mm(m, m.T))
    return _symmetric(_gram_float32(J.float(), dtype))


def combine_matrix(weights: Tensor, J: Tensor) -> Tensor:
    """``Σ_t w_t J[t]``: one (T)·(T, P) product in ``J``'s dtype, a fresh flat (P,) vector."""
    return torch.mv(J.T, weights.to(device=J.device, dtype=J.dtype))


def release_workspace() -> None:
    """Free the buffer :func:`jacobian_workspace` keeps between steps (blocks still in use stay valid)."""
    _WORKSPACE.clear()


def combine_rows(weights: Tensor, rows: Sequence[Sequence[Tensor]], inplace: bool = False) -> list[Tensor]:
    """``Σ_t w_t g_t[p]`` for every parameter, from per-task lists of per-parameter gradients.

    One multi-tensor (``torch._foreach_*``) op per task over all parameters: the same
    ``acc = w_0 g_0; acc += w_t g_t`` per element as one op per parameter and task, without
    T × (number of parameters) op dispatches. ``inplace=True`` accumulates into the first task's
    tensors (no allocation; they are lost)."""
    w = weights.tolist()
    if inplace:
        acc = list(rows[0])
        torch._foreach_mul_(acc, w[0])
    else:
        acc = list(torch._foreach_mul(list(rows[0]), w[0]))
    for t in range(1, len(rows)):
        torch._foreach_add_(acc, list(rows[t]), alpha=w[t])
    return acc


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
