"""The tiny encoder/heads model the engine tests share: Z = enc(x) (6-d), L_t = mean(h_t(Z)²) + offset_t."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class _ScaledBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return t.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return g * ctx.factor, None


def poison_backward(t: Tensor, factor: float) -> Tensor:
    """The identity whose backward multiplies the gradient by ``factor``: ``float("nan")`` or ``float("inf")`` puts a
    non-finite gradient into the backward only (finite losses; an inf as a float16 overflow leaves)."""
    return _ScaledBackward.apply(t, factor)


class TinyNet(nn.Module):
    """Shared MLP encoder 5 → 8 → 6 (tanh) and T linear heads 6 → 1.

    ``offsets[t]`` is added to task t's loss (default 0): some tests need losses away from zero
    (log transform) or distinct per task."""

    def __init__(self, T: int = 3, offsets: Sequence[float] | None = None):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(T)])
        self.offsets = [0.0] * T if offsets is None else list(offsets)

    def forward(self, x):
        z = self.enc(x)
        return z, {f"t{i}": (h(z) ** 2).mean() + self.offsets[i] for i, h in enumerate(self.heads)}


def count_direct_writes(monkeypatch) -> list[int]:
    """A list that gets one entry each time the lean loss step lets ``backward()`` write ``.grad`` itself (the direct
    write, docs/reliability.md §4): ``mtlens.engine.backward.backward_into_grad`` wrapped by a counter, undone with
    ``monkeypatch``."""
    import mtlens.engine.backward as B

    calls: list[int] = []
    real = B.backward_into_grad

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(B, "backward_into_grad", counted)
    return calls
