"""Saliency-based identifiers: Feature Disentanglement (FD) and Rep-MTL's TSR entropy.

FD: Mao, Chen, Wu, Gilles, Wong, "Robust Analysis of Multi-Task Learning Efficiency ...",
arXiv:2402.03557 (the aggregation and normalisation are our choices, marked [choice] in docs/diagnostics.md).
TSR entropy: Wang, Li, Xu, Rep-MTL, arXiv:2507.21049, Eqs. 4–6.
Both read the task saliencies ``S_t = ∂L_t/∂Z`` — one heads backward, no encoder backward.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.record import StepRecord
from ..engine.saliency import tsr_loss
from ..errors import ConfigurationError
from ._inputs import saliencies_of

_FD_CHUNK_ELEMENTS = 1 << 19  # elements per column chunk of FD (2 MiB of float32; 1 << 20 spills the cache)


def feature_disentanglement(
    saliencies: StepRecord | Tensor | Sequence[Tensor], temperature: float = 0.0
) -> float:
    """Feature Disentanglement FD ∈ [0, 1] (arXiv:2402.03557): lower = more disentangled.

    For every element ``j`` of Z (batch, channel and space): ``a_t[j] = |S_t[j]|``, a distribution
    over tasks ``p_·[j]``, its entropy ``H[j]``; ``FD = mean_j H[j] / log T``.

    * ``temperature = 0`` (default): ``p_t[j] = a_t[j] / Σ_k a_k[j]`` (exact at any scale).
    * ``temperature = τ > 0`` (the "smoothened" option): ``p_·[j] = softmax_t(a_·[j] / (τ·mean(a)))``
      where ``mean(a)`` runs over all tasks and elements, so τ is scale-free [our choice].

    Elements whose saliencies are zero for every task are left out of the mean. Defined values
    at the edges: ``T = 1`` gives 0.0 (one task: nothing is shared); all elements zero gives NaN
    (an empty mean — nothing to measure).

    Args:
        saliencies: ``(T, B, C, H, W)`` / ``(T, B, C)`` (``StepRecord.saliencies``), a list of T
            tensors, or the StepRecord itself.
        temperature: τ ≥ 0 as above.

    Example:
        >>> S = torch.zeros(2, 1, 4); S[0, 0, :2] = 1.0; S[1, 0, 2:] = 3.0
        >>> feature_disentanglement(S)
        0.0
    """
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ConfigurationError(
            f"feature_disentanglement: temperature must be a finite number ≥ 0, got {temperature!r}"
        )
    S = saliencies_of(saliencies, min_ndim=2, what="feature_disentanglement")
    T = S.shape[0]
    with torch.no_grad():
        flat = S.reshape(T, -1)
        if temperature != 0:
            return _fd_softmax(flat, float(temperature))
        return _fd_ratio(flat)


def _fd_ratio(flat: Tensor) -> float:
    """FD with ``p = a / Σ_t a`` of a ``(T, n)`` block (no grad), in column chunks.

    Per chunk, six passes over the ``(T, chunk)`` block — ``|S|``, ``Σ_t``, the ratio, ``log``, the
    product and one NaN-skipping sum — and three over the chunk's ``Σ_t`` row (its sum, and the active
    elements as ``Σ sign``); no mask, no clamp. The
    ratio is taken as it is: ``p = 0`` (a task with zero saliency) gives ``0·log 0 = 0·(−inf) = NaN``
    and an element where every task is zero gives ``0/0 = NaN``, and ``nansum`` leaves both out —
    exactly the ``0 log 0 = 0`` convention, with no clamp (the former ``log(max(p, tiny))`` changed
    terms below 1e-36). A NaN can arise no other way from finite saliencies whose task sums are
    finite, which the per-chunk sums of ``Σ_t`` check: a non-finite input gives NaN, an overflowing
    sum of finite ones is measured on rescaled saliencies (rare path)."""
    T = flat.shape[0]
    width = min(flat.shape[1], max(1024, _FD_CHUNK_ELEMENTS // T))  # columns per chunk
    # per chunk, one 0-dim triple (Σ_j s_j, Σ_j Σ_t p log p, active elements): no synchronisation per chunk
    parts: list[Tensor] = []
    # column chunks of ~2 MiB, written into two scratch blocks of the chunk's shape kept between calls: they
    # stay in cache, and no fresh memory is touched per chunk or per call (in a training loop, the page faults
    # of fresh temporaries cost about as much as FD's arithmetic)
    for chunk in flat.split(width, dim=1) if width < flat.shape[1] else (flat,):
        a_out, l_out = _scratch(chunk.shape, flat.dtype, flat.device)
        a = torch.abs(chunk, out=a_out)
        s = a.sum(dim=0)  # Σ_t a_t per element: 0 exactly where every task's saliency is 0
        if T == 1:
            count = torch.sign(s).sum()
            parts.append(torch.stack([s.sum(), count, count]))
            continue
        # p = a / s: a ratio, exact at any scale (multiplying by |Z| reciprocals measured no faster, and
        # 1/s overflows for subnormal s). torch.special.xlogy / entr are ~3× slower on CPU (not
        # vectorised). These T·|Z| logarithms are FD's floor (docs/performance.md, "Monitoring").
        p = a.div_(s)
        lg = torch.log(p, out=l_out)
        total_s = s.sum()
        # active elements: Σ sign(s) (s ≥ 0: each term 0 or 1; ≤ 2^19 a chunk, exact in float32; a NaN or inf
        # s is caught by Σ s below first). One vectorised pass, cheaper than count_nonzero + a dtype cast
        count = s.sign_().sum()
        parts.append(torch.stack([total_s, lg.mul_(p).nansum(), count]))  # torch's cascade sums: ~1e-8 relative
    acc = parts[0] if len(parts) == 1 else torch.stack(parts).double().sum(dim=0)
    s_f, total, n_f = acc.tolist()
    if not math.isfinite(s_f):  # Σ_t |S_t[j]| is not finite somewhere
        if not bool(torch.isfinite(flat).all()):
            return float("nan")  # a non-finite saliency
        # Σ_t |S_t[j]| overflowed (entries near the dtype's limit: p = a/inf = 0 read as FD 0): p is
        # invariant to a per-element scale, so measure S_t[j] / max_t |S_t[j]| (≤ 1) instead (rare path)
        m = flat.abs().amax(dim=0)
        return _fd_ratio(flat / torch.where(m > 0, m, 1.0))
    n = int(n_f)
    if n == 0:
        return float("nan")
    if T == 1:
        return 0.0
    return -total / (n * math.log(T)) + 0.0  # + 0.0: a disentangled batch gives 0.0, not -0.0


def _fd_softmax(flat: Tensor, temperature: float) -> float:
    """FD with the smoothened distribution ``p = softmax_t(a / (τ·mean(a)))`` (see above)."""
    T = flat.shape[0]
    # logits a/(τ·mean(a)) computed as ((a − max_t a)/gmax)/(mean(a)/gmax)/τ, gmax = max |S|: every factor stays
    # in range (float32 saliencies of 1e-45 made mean(a) 0 and τ = 1e-40 made τ·mean(a) 0: NaN through 0/0)
    gmax = float(flat.abs().amax())
    if not math.isfinite(gmax):
        return float("nan")  # a non-finite saliency (as with temperature = 0)
    scale = float(flat.abs().mean(dtype=torch.float64)) / gmax if gmax > 0 else 1.0  # in [1/(T|Z|), 1]
    tiny = torch.finfo(flat.dtype).tiny
    total, n = 0.0, 0
    for chunk in flat.split(max(1024, _FD_CHUNK_ELEMENTS // T), dim=1):
        a = chunk.abs()
        active = a.sum(dim=0) > 0
        n += int(active.sum())
        if T == 1:
            continue
        # shifted by the per-element maximum (softmax is invariant to it): logits ≤ 0, no overflow; τ below the
        # dtype's smallest normal number is taken as it (τ = 1e-300 is 0 in float32)
        x = (a - a.amax(dim=0, keepdim=True)).div_(gmax if gmax > 0 else 1.0)
        p = torch.softmax(x.div_(scale).div_(max(temperature, tiny)), dim=0)
        H = p.clamp_min(tiny).log_().mul_(p).sum(dim=0)  # −H[j]
        H = H * active  # inactive elements are left out of the mean (softmax made them uniform)
        total += float(H.sum(dtype=torch.float64))
    if n == 0:
        return float("nan")
    if T == 1:
        return 0.0
    return -total / (n * math.log(T)) + 0.0


_scratch_local = threading.local()
_SCRATCH_SHAPES = 4  # shapes kept per thread (a loop needs one, or two with a last partial chunk)


def _scratch(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Two reused scratch tensors of ``shape`` (per thread, shape, dtype and device): FD's chunk temporaries.

    They are written on every call instead of freshly allocated memory, which the allocator returns to the
    system between training steps and whose pages then fault again on first touch; kept already shaped, so
    a call costs one dictionary lookup and no view ops (each a few µs right after a backward). At most
    :data:`_SCRATCH_SHAPES` shapes are kept per thread (the oldest dropped); each pair is ≤ 2 chunks of
    ≈ 2 MiB. Only FD writes them; nothing it returns aliases them."""
    cache = getattr(_scratch_local, "blocks", None)
    if cache is None:
        cache = _scratch_local.blocks = {}
    key = (shape, dtype, device)
    pair = cache.get(key)
    if pair is None:
        if len(cache) >= _SCRATCH_SHAPES:
            del cache[next(iter(cache))]
        block = torch.empty((2, *shape), dtype=dtype, device=device)
        pair = cache[key] = (block[0], block[1])
    return pair


def tsr_entropy(saliencies: StepRecord | Tensor | Sequence[Tensor], normalize: bool = False) -> float:
    """Rep-MTL's TSR entropy (arXiv:2507.21049, Eqs. 4–6) as a diagnostic, in ``[0, log T]``.

    The same value Rep-MTL's TSR penalty takes (:func:`mtlens.engine.saliency.tsr_loss`): signed
    channel mean per location, then ``|·|``, L1 over tasks, mean entropy over locations (all-zero
    locations count as 0). Differs from FD, which takes ``|·|`` per element with no channel mean.
    ``normalize=True`` divides by ``log T`` (``T = 1`` → 0.0).

    Args:
        saliencies: ``(T, B, C, ...)`` (channel dimension third), a list, or a StepRecord.
        normalize: divide by ``log T`` to land in ``[0, 1]`` (default ``False``: the training value).
    """
    S = saliencies_of(saliencies, min_ndim=3, what="tsr_entropy")
    with torch.no_grad():
        v = float(tsr_loss(S))
    if normalize:
        T = S.shape[0]
        return 0.0 if T == 1 else v / math.log(T)
    return v


__all__ = ["feature_disentanglement", "tsr_entropy"]
