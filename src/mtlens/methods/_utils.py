"""Small shared helpers for method implementations (validation, RNG state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import ConfigurationError, ShapeError


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigurationError(msg)


def positive(name: str, value: float, method: str) -> float:
    check(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
          f"{method}: {name} must be a positive finite number, got {value!r}")
    return float(value)


def in_range(name: str, value: float, lo: float, hi: float, method: str) -> float:
    check(isinstance(value, (int, float)) and lo <= value <= hi,
          f"{method}: {name} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def check_seed(seed: int | None, method: str) -> int | None:
    """A seed must be a non-negative int (not a bool) or None; return it unchanged."""
    check(seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0),
          f"{method}: seed must be a non-negative int or None, got {seed!r}")
    return seed


def check_block_shapes(stored: Sequence[torch.Tensor], blocks: Sequence[torch.Tensor], method: str,
                       hint: str) -> None:
    """Raise :class:`ShapeError` (ending with ``hint``) when the Jacobian ``blocks`` do not have the
    shapes of the per-block state ``stored`` from earlier steps (DB-MTL's EMA, MoCo's tracked y)."""
    old = [tuple(e.shape) for e in stored]
    new = [tuple(b.shape) for b in blocks]
    if old != new:
        raise ShapeError(f"{method}: the Jacobian blocks changed shape since the last step ({old} → {new}); {hint}")


def nonzero_rows(sq: torch.Tensor, rel: float) -> tuple[float, torch.Tensor]:
    """``(big, live)`` for squared row norms ``sq`` (T,): ``big = max sq`` and the mask of the rows
    with ``sq > rel · big`` (all False when every row is zero)."""
    big = float(sq.max())
    live = sq > rel * big if big > 0 else torch.zeros_like(sq, dtype=torch.bool)
    return big, live


class Seeded:
    """Mixin of the methods that draw random numbers: one ``torch.Generator`` the method owns.

    Call :meth:`_seed` in the constructor with the ``seed`` argument: an int seeds the generator;
    ``None`` draws the seed from torch's global RNG (so ``torch.manual_seed`` makes the run
    reproducible) without reseeding the global RNG. ``self.seed`` and ``hparams()["seed"]`` are the
    effective seed; the generator's state is part of the method's state (``state_attrs``), so a
    resumed run draws what an uninterrupted one would. Place it before the method family in the
    bases: ``class PCGrad(Seeded, GramianWeighting)``.
    """

    state_attrs: ClassVar[tuple[str, ...]] = ("generator",)
    name: ClassVar[str]
    seed: int
    generator: torch.Generator

    def _seed(self, seed: int | None) -> None:
        check_seed(seed, self.name)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = int(seed)
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "seed": self.seed}  # type: ignore[misc]


def visiting_orders(generator: torch.Generator, T: int) -> np.ndarray:
    """PCGrad's / GradVac's visiting orders: an int64 array (T, T-1) whose row i is a uniformly random
    permutation of the other tasks ``j ≠ i``.

    The draws are those of the papers' task-by-task loop: one ``torch.randperm(T - 1, generator=generator)``
    per task, in task order; its permutation ``π`` indexes the other tasks in increasing order (position
    ``k`` of ``π`` is task ``π_k + (π_k ≥ i)``). So a seeded generator gives the same orders whether the
    projections then run task by task or all tasks at once.
    """
    perms = torch.stack([torch.randperm(T - 1, generator=generator) for _ in range(T)]).numpy()
    return perms + (perms >= np.arange(T)[:, None])


def visiting_order_lists(generator: torch.Generator, T: int) -> list[list[int]]:
    """:func:`visiting_orders` as T lists of ints: the same draws, the same orders (cheaper for a few tasks)."""
    return [[k + (k >= i) for k in torch.randperm(T - 1, generator=generator).tolist()] for i in range(T)]
