"""What a bilevel method may do before a step: losses on a training and a validation batch,
at the current parameters or at look-ahead values of them (``needs_lookahead``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..errors import NonFiniteError, ShapeError
from ._autograd import vjp
from .distributed import resolve


class LookAhead:
    """The interface a bilevel method (Auto-Lambda, MOML, FORUM) gets from the caller before each step.

    Args:
        params: the model's trainable parameters, in a fixed order (the look-ahead step moves
            all of them, shared and task-specific, as the authors' code does).
        train_losses: a closure returning the T task losses (a list of attached scalars) on the
            step's own training batch, at the parameters' current values.
        val_losses: the same on an independent batch (Auto-Lambda's "validation" batch: the
            authors draw it from a second, differently shuffled loader over the training set).
        lr: the optimiser's current learning rate (the virtual step's size).
        momentum: SGD momentum coefficient (0 for optimisers without one).
        momentum_buffers: per parameter, the optimiser's momentum buffer or ``None``.
        weight_decay: the optimiser's weight decay coefficient.
        distributed: data parallelism, as in :func:`~mtlens.engine.mtl_backward`: ``None`` (default)
            reduces over the default process group when ``torch.distributed`` is initialised with
            more than one rank, ``False`` never, ``True`` or a group: that group. Each rank's closures
            return the losses of its equal share of the global batches; then every loss value is
            the global batch's and :meth:`grads` returns the global batch's gradient (the mean over
            ranks; exact for objectives linear in the losses, which is what Auto-Lambda, MOML and
            FORUM differentiate), so every rank takes the same decision.

    The caller restores anything the extra forwards change (BatchNorm running statistics).
    """

    def __init__(self, params: Sequence[Tensor], train_losses: Callable[[], Sequence[Tensor]],
                 val_losses: Callable[[], Sequence[Tensor]], *, lr: float, momentum: float = 0.0,
                 momentum_buffers: Sequence[Tensor | None] | None = None, weight_decay: float = 0.0,
                 distributed: Any = None) -> None:
        self.params = list(params)
        self._train, self._val = train_losses, val_losses
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        bufs = list(momentum_buffers) if momentum_buffers is not None else [None] * len(self.params)
        if len(bufs) != len(self.params):
            raise ShapeError(f"LookAhead: {len(bufs)} momentum buffers for {len(self.params)} parameters")
        self.momentum_buffers = bufs
        self._dist = resolve(distributed)

    @property
    def world(self) -> int:
        """The number of data-parallel ranks the look-ahead reduces over (1: none)."""
        return 1 if self._dist is None else self._dist.world

    def _stack(self, losses: Sequence[Tensor], what: str) -> Tensor:
        out = torch.stack([v.reshape(()) for v in losses])
        if self._dist is not None:  # valued at the global mean, differentiated through this rank's graph
            mean = self._dist.mean_(out.detach().clone())
            out = out - out.detach() + mean
        if not bool(torch.isfinite(out.detach()).all()):
            raise NonFiniteError(f"LookAhead: non-finite {what} losses {out.detach().tolist()}")
        return out

    def train_losses(self) -> Tensor:
        """The T training-batch losses (T,), attached to the graph, at the parameters' current values."""
        return self._stack(self._train(), "training")

    def val_losses(self) -> Tensor:
        """The T validation-batch losses (T,), attached to the graph."""
        return self._stack(self._val(), "validation")

    def grads(self, objective: Tensor, retain_graph: bool = False) -> list[Tensor]:
        """``∂ objective / ∂ params`` (zeros where a parameter does not reach the objective), dense (a sparse
        gradient of ``nn.Embedding(sparse=True)`` too: the look-ahead's arithmetic, ``θ − lr (g + wd θ)``, adds
        it to dense tensors, which a sparse tensor refuses); under data parallelism the mean over ranks, i.e. the
        global batch's gradient."""
        gs = vjp(objective, self.params, retain_graph=retain_graph)
        out = [torch.zeros_like(p) if g is None else g if g.layout == torch.strided else g.to_dense()
               for g, p in zip(gs, self.params)]
        if self._dist is not None:
            out = self._dist.mean_tensors(out)
        return out

    def sgd_step(self, grads: Sequence[Tensor], lr: float | None = None) -> list[Tensor]:
        """Values after one step of the caller's optimiser rule, ``θ − lr (m + g + wd θ)`` with the
        momentum ``m = momentum · buffer`` (Auto-Lambda's ``virtual_step``)."""
        lr = self.lr if lr is None else float(lr)
        out = []
        with torch.no_grad():
            for p, g, b in zip(self.params, grads, self.momentum_buffers):
                m = self.momentum * b if b is not None else 0.0
                out.append(p - lr * (m + g + self.weight_decay * p))
        return out

    @contextmanager
    def at(self, values: Sequence[Tensor]) -> Iterator[None]:
        """Evaluate with the parameters set to ``values`` (same order and shapes); restored on exit.

        Gradients taken inside the block are gradients at ``values``."""
        if len(values) != len(self.params):
            raise ShapeError(f"LookAhead.at: {len(values)} values for {len(self.params)} parameters")
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, v in zip(self.params, values):
                    p.copy_(v)
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, saved):
                    p.copy_(v)
