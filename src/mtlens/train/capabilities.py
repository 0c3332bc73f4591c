"""The trainer's side of the capabilities a method declares (never a method's name).

* ``needs_second_batch`` (SDMGrad, MoDo): :func:`feed_cross_gramian` — ``A = J_ξ J_ξ'ᵀ`` on two
  extra batches → ``method.observe_cross_gramian(A)``;
* ``needs_lookahead`` (Auto-Lambda, MOML): :func:`run_lookahead` — a
  :class:`~mtlens.engine.LookAhead` over the step's batch and an independent one →
  ``method.meta_step``;
* ``needs_extra_forward`` (FAMO): :func:`feed_losses_after_step` — the updated model's losses on the
  same batch → ``method.after_step``.

The extra forwards run in train mode; BatchNorm running statistics are restored afterwards so that
these measurements do not change the model [choice].
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..engine import LookAhead, cross_gramian
from .forward import TaskForward

__all__ = ["feed_cross_gramian", "feed_losses_after_step", "run_lookahead"]


@contextmanager
def _buffers_kept(model: torch.nn.Module) -> Iterator[None]:
    """Restore the model's buffers (BatchNorm running statistics) on exit."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])


def feed_cross_gramian(forward: TaskForward, method: Any, a: Any, b: Any) -> None:
    """``A = J_ξ J_ξ'ᵀ`` of the shared parameters on batches ``a`` and ``b`` → ``method.observe_cross_gramian(A)``."""
    la, _ = forward.losses(a)
    lb, _ = forward.losses(b)
    tasks = forward.tasks
    A = cross_gramian([la[t] for t in tasks], [lb[t] for t in tasks], forward.model.shared_parameters())
    method.observe_cross_gramian(A)


def run_lookahead(forward: TaskForward, optimizer: torch.optim.Optimizer, method: Any, batch: Any, val: Any,
                  distributed: bool = False) -> None:
    """A :class:`~mtlens.engine.LookAhead` over ``batch`` (training losses) and ``val`` (an independent
    batch) with the optimiser's first group's lr, momentum and weight decay → ``method.meta_step``
    (``distributed``: each rank holds its share of both batches; the look-ahead reduces over ranks)."""
    model, tasks = forward.model, forward.tasks
    params = [p for p in model.parameters() if p.requires_grad]
    group = optimizer.param_groups[0]
    momentum = float(group.get("momentum", 0.0) or 0.0)
    bufs = [optimizer.state.get(p, {}).get("momentum_buffer") if momentum else None for p in params]

    def losses_of(b: Any) -> Any:
        def closure() -> list[torch.Tensor]:
            losses, _ = forward.losses(b)
            return [losses[t] for t in tasks]
        return closure

    with _buffers_kept(model):
        la = LookAhead(params, losses_of(batch), losses_of(val), lr=float(group["lr"]), momentum=momentum,
                       momentum_buffers=bufs, weight_decay=float(group.get("weight_decay", 0.0) or 0.0),
                       distributed=distributed)
        method.meta_step(la)


def feed_losses_after_step(forward: TaskForward, method: Any, batch: Any, world: int = 1) -> None:
    """The updated model's task losses on ``batch`` (no grad; averaged over ranks when data-parallel,
    so that the method's state stays equal on every rank) → ``method.after_step``."""
    with _buffers_kept(forward.model), torch.no_grad():
        new_losses, _ = forward.losses(batch)
    new = torch.stack([new_losses[t].detach().float() for t in forward.tasks])
    if world > 1:
        torch.distributed.all_reduce(new)
        new /= world
    method.after_step(new)
