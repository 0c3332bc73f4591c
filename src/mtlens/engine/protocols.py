"""What the engine expects of a method: the three families and the regulariser interface.

The engine defines these contracts; :mod:`mtlens.methods` implements them. A method is a pure
object: everything it needs arrives as an argument (losses, Gramian, Jacobian blocks) or
through an explicit call (``on_epoch_end``, ``after_step``). It never reads trainer state.
Stateful methods round-trip through ``state_dict()`` / ``load_state_dict()``, internal
optimiser state included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

LEVELS = ("param", "feature")


class Method:
    """Base of every multi-task optimisation method.

    Class attributes describe the method to the engine, the registry and the docs:
    ``name`` (registry name), ``family`` ("loss" | "gradient" | "regularizer"), ``levels``
    (the gradient levels it supports), ``reference`` (paper and arXiv id), ``loss_transform``
    (a transform the method itself prescribes, e.g. DB-MTL's log), ``needs_extra_forward``
    (FAMO: the caller passes the updated model's losses to :meth:`after_step`),
    ``needs_second_batch`` (SDMGrad, MoDo: before every step the caller passes the cross-Gramian
    of two further independent mini-batches to :meth:`observe_cross_gramian`).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    levels: ClassVar[tuple[str, ...]] = ()
    reference: ClassVar[str] = ""
    defaults_source: ClassVar[str] = ""
    loss_transform: ClassVar[str | None] = None
    needs_extra_forward: ClassVar[bool] = False
    needs_second_batch: ClassVar[bool] = False
    stateful: ClassVar[bool] = False

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors, counters, RNG and optimiser state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method '{self.name}' is stateless but got state keys {sorted(state)}")

    def parameters(self) -> list[Tensor]:
        """Learnable tensors the caller's optimiser must update (e.g. UW's log-variances)."""
        return []

    # -- explicit hooks --------------------------------------------------------------------
    def on_epoch_end(self, mean_losses: Tensor) -> None:
        """Called once per epoch with the epoch-mean loss of each task (DWA uses it)."""

    def after_step(self, new_losses: Tensor) -> None:
        """Called after ``optimizer.step()`` with the updated model's losses on the same batch.

        Only for methods with ``needs_extra_forward = True`` (FAMO)."""

    def observe_cross_gramian(self, cross_gramian: Tensor) -> None:
        """Called before each step with ``A = J_ξ J_ξ'ᵀ`` (T×T, float64, not symmetric): the
        per-task gradients of the shared parameters on two independent mini-batches ξ, ξ'.

        Only for methods with ``needs_second_batch = True`` (SDMGrad, MoDo); extra cost per step:
        two forward passes and 2T backward passes (see :func:`mtlens.engine.cross_gramian`)."""
        raise NotImplementedError(f"method '{self.name}' does not use a cross-Gramian (needs_second_batch=False)")

    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters this instance was built with."""
        return dict(getattr(self, "_hparams", {}))

    def log_values(self) -> dict[str, float]:
        """Scalars worth logging after the last step (solver iterations, temperatures, ...)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


class LossWeighting(Method):
    """Loss-level method: weights from the loss values (or learnable scalars).

    The engine does one backward of ``combine(losses)``; no per-task gradients are computed
    unless a regulariser or diagnostic asks for them.
    """

    family: ClassVar[str] = "loss"
    levels: ClassVar[tuple[str, ...]] = ()
    needs_grad_norms: ClassVar[bool] = False

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        """Task weights (T,) from the detached losses (T,)."""
        raise NotImplementedError

    def combine(self, losses: Tensor, grad_norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(objective, weights)``: the scalar to differentiate and the weights to log.

        ``losses`` is attached to the graph; the default objective is ``Σ_t w_t L_t`` with ``w``
        from :meth:`weights` on the detached losses. Learnable weightings override this."""
        w = self.weights(losses.detach(), grad_norms=grad_norms).to(losses.dtype)
        return (w * losses).sum(), w.detach()


class GramianWeighting(Method):
    """Gradient-level method that needs only the Gramian ``G = J Jᵀ`` (T×T, float64).

    It returns weights ``w`` (T,); the update is ``Σ_t w_t g_t``."""

    family: ClassVar[str] = "gradient"
    levels: ClassVar[tuple[str, ...]] = LEVELS

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        raise NotImplementedError

    def head_weights(self, weights: Tensor) -> Tensor:
        """Weights of the task losses for the task-specific parameters, given the shared ones.

        Default: the same weights. Methods whose papers treat heads differently override it
        (IMTL: the loss scales e^{s_t}; Nash-MTL: the unclipped α)."""
        return weights


class JacobianAggregator(Method):
    """Gradient-level method that needs the Jacobian itself, as per-parameter blocks.

    ``jacobian`` is a sequence of tensors with a leading task dimension (T, *shape): one per
    shared parameter at parameter level, a single block of shape (T, *Z.shape) at feature
    level. It returns the combined blocks (same shapes without T) and the weights applied to
    each task's task-specific parameters."""

    family: ClassVar[str] = "gradient"
    levels: ClassVar[tuple[str, ...]] = LEVELS

    def aggregate(self, jacobian: Sequence[Tensor], losses: Tensor) -> tuple[list[Tensor], Tensor]:
        raise NotImplementedError


class Regularizer(Method):
    """A term added to the objective, computed from per-task gradients.

    ``uses = "saliency"``: from the task saliencies ``S_t = ∂L_t/∂Z`` (Rep-MTL, CosReg at
    feature level); ``uses = "param"``: from the per-task shared-parameter gradients (CosReg at
    parameter level; second order through the encoder).
    The engine computes those gradients with ``create_graph=True`` so the regulariser trains.
    """

    family: ClassVar[str] = "regularizer"
    levels: ClassVar[tuple[str, ...]] = LEVELS
    uses: str = "saliency"

    def loss(self, grads: Sequence[Tensor], losses: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Return the (already λ-weighted) scalar penalty and named values to log.

        ``grads`` is a sequence of blocks with a leading task dimension: for saliencies a single
        block (T, B, ...) with the tasks' saliencies stacked; at parameter level one block per
        shared parameter."""
        raise NotImplementedError


def as_loss_vector(losses: Sequence[Tensor]) -> Tensor:
    return torch.stack([loss.reshape(()) for loss in losses])
