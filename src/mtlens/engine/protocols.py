"""What the engine expects of a method: the three families and the regulariser interface.

The engine defines these contracts; :mod:`mtlens.methods` implements them. A method is a pure
object: everything it needs arrives as an argument (losses, Gramian, Jacobian blocks) or
through an explicit call (``on_epoch_end``, ``after_step``). It never reads trainer state.
Stateful methods round-trip through ``state_dict()`` / ``load_state_dict()``, internal
optimiser state included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConfigurationError
from .decision import Decision

if TYPE_CHECKING:  # pragma: no cover
    from .gradients import TaskGradients

LEVELS = ("param", "feature")
UNIT_HEAD_RULE = "own gradient, unit weights (TorchJD mtl_backward, LibMTL)"
LOSS_TRANSFORM_NAMES = ("none", "log")
USER_CALLS = ("parameters", "after_step", "on_epoch_end", "observe_cross_gramian", "on_task_scores", "meta_step")


class Method:
    """Base of every multi-task optimisation method.

    Class attributes describe the method to the engine, the registry and the docs:
    ``name`` (registry name), ``family`` ("loss" | "gradient" | "regularizer"), ``levels``
    (the gradient levels it supports), ``reference`` (paper and arXiv id), ``loss_transform``
    (a transform the method itself prescribes, e.g. DB-MTL's log).

    What a method needs from the engine is declared here, on the contract, never discovered:
    ``needs_extra_forward`` (FAMO: the caller passes the updated model's losses to
    :meth:`after_step`), ``needs_grad_norms`` (GradNorm: per-task gradient norms on a shared
    layer), ``needs_features`` (GradDrop's batch form: the activations ``Z``). ``head_rule``
    states, with its source, what the task-specific parameters receive (docs/methods.md).
    ``needs_second_batch`` (SDMGrad, MoDo: before every step the caller passes the cross-Gramian
    of two further independent mini-batches to :meth:`observe_cross_gramian`),
    ``needs_task_scores`` (PIVRG: after every epoch the caller reports each task's relative
    performance drop against its single-task baseline to :meth:`on_task_scores`),
    ``needs_lookahead`` (bilevel methods, Auto-Lambda and MOML: before every step the caller
    passes a :class:`~mtlens.engine.LookAhead` over the step's batch and an independent
    validation batch to :meth:`meta_step`).

    Two declared properties make a method safe in the user's own loop:

    * ``loss_transforms``: the loss transforms the method is defined for (``"none"``,
      ``"log"``); ``loss_transform_conflict`` says why one is missing. The engine and the
      configuration refuse any other combination (:func:`check_loss_transform`) — e.g. UW with
      log losses has no minimum (its weights grow without bound).
    * ``user_calls``: what the user's loop must do besides ``mtl_backward`` for the method to be
      itself: ``"parameters"`` (add :meth:`parameters` to the optimiser), ``"after_step"`` (call
      :meth:`after_step` after ``optimizer.step()``), ``"on_epoch_end"`` (call
      :meth:`on_epoch_end` once per epoch); the ``needs_*`` flags above imply theirs
      (:func:`required_calls`). A stateful method detects a missed call and raises
      :class:`~mtlens.errors.ConfigurationError` naming it (docs: README, own-loop section).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    levels: ClassVar[tuple[str, ...]] = ()
    reference: ClassVar[str] = ""
    defaults_source: ClassVar[str] = ""
    loss_transform: ClassVar[str | None] = None
    needs_extra_forward: ClassVar[bool] = False
    needs_grad_norms: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    needs_second_batch: ClassVar[bool] = False
    needs_task_scores: ClassVar[bool] = False
    needs_lookahead: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    loss_transforms: ClassVar[tuple[str, ...]] = LOSS_TRANSFORM_NAMES
    loss_transform_conflict: ClassVar[str] = ""
    user_calls: ClassVar[tuple[str, ...]] = ()

    def loss_transform_problem(self, transform: str) -> str | None:
        """Why this method is not defined for ``transform`` ("none" | "log"), or ``None`` if it is.

        Default: from the declared ``loss_transforms`` / ``loss_transform_conflict``; methods whose
        answer depends on a hyper-parameter (MoCo's ``normalize``) override it."""
        if self.loss_transform is not None and transform != self.loss_transform:
            return f"it prescribes loss_transform='{self.loss_transform}'"
        if transform in self.loss_transforms:
            return None
        return self.loss_transform_conflict or f"it is defined for loss_transform in {self.loss_transforms}"

    head_rule: ClassVar[str] = ""

    # -- step 2 of the engine ------------------------------------------------------------------
    def decide(self, grads: TaskGradients) -> Decision:
        """Map what the method needs from ``grads`` (losses, Gramian or Jacobian) to a :class:`Decision`.

        Each family implements it from its classic method (``weights``, ``aggregate``,
        ``combine``), so a method written against those keeps working unchanged."""
        raise NotImplementedError

    # -- transactional steps -----------------------------------------------------------------------
    def snapshot(self) -> Any:
        """A copy of everything a step may change, restored by :meth:`restore` when the step fails.

        Default: a deep copy of ``state_dict()`` (``None`` for stateless methods). The engine
        commits a step's state change only when the whole step succeeded."""
        if not self.stateful:
            return None
        import copy

        return copy.deepcopy(self.state_dict())

    def restore(self, snapshot: Any) -> None:
        """Undo a failed step: put back the state :meth:`snapshot` returned.

        State that did not exist before the step (``None`` in the snapshot: learnable scalars
        created lazily on first use, e.g. UW's) cannot be un-created by ``load_state_dict``; it
        holds only its initial values (no optimiser step ran), so it is left as it is."""
        if snapshot is None:
            return
        from ..errors import CheckpointError

        try:
            self.load_state_dict(snapshot)
        except CheckpointError:
            if not (isinstance(snapshot, dict) and any(v is None for v in snapshot.values())):
                raise

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

    def on_task_scores(self, scores: Tensor) -> None:
        """Called after each epoch with each task's relative performance drop (T,), in percent
        against its single-task baseline (higher = worse). Only for ``needs_task_scores`` (PIVRG)."""
        raise NotImplementedError(f"method '{self.name}' does not use task scores (needs_task_scores=False)")

    def meta_step(self, lookahead: Any) -> None:
        """Bilevel methods (``needs_lookahead``): update the method's own variables (task weights)
        from a look-ahead step, before the step's backward. ``lookahead`` is a
        :class:`mtlens.engine.LookAhead`; the method must leave the model's parameters as it found
        them (``LookAhead.at`` restores them)."""
        raise NotImplementedError(f"method '{self.name}' is not bilevel (needs_lookahead=False)")

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
    head_rule: ClassVar[str] = "the objective's own gradient (one backward of the weighted sum)"

    def decide(self, grads: TaskGradients) -> Decision:
        """Loss level: the objective from :meth:`combine` on the attached objective losses."""
        objective, w = self.combine(grads.attached_losses(), grad_norms=grads.grad_norms)
        return Decision(weights=w.detach().to(torch.float64).reshape(-1), objective=objective,
                        values=self.log_values())

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
    head_rule: ClassVar[str] = UNIT_HEAD_RULE

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        raise NotImplementedError

    def head_weights(self, weights: Tensor) -> Tensor:
        """Weights of the task losses for the task-specific parameters, given the shared ones.

        Default: unit weights — each head receives its own task's gradient, unscaled: the
        aggregation concerns the shared parameters only (TorchJD's ``mtl_backward``, LibMTL's
        gradient weightings; MGDA's Algorithm 2 states it). Methods whose source states another
        rule override :meth:`decide` (IMTL: the loss scales e^{s_t}; Nash-MTL: α)."""
        return torch.ones_like(torch.as_tensor(weights, dtype=torch.float64))

    def decide(self, grads: TaskGradients) -> Decision:
        """``w = weights(G, losses)``; heads by :meth:`head_weights`."""
        w = self.weights(grads.gramian(), grads.objective_losses)
        w = torch.as_tensor(w).detach().to(torch.float64).reshape(-1)
        return Decision(weights=w, head_weights=self.head_weights(w), values=self.log_values())


class JacobianAggregator(Method):
    """Gradient-level method that needs the Jacobian itself, as per-parameter blocks.

    ``jacobian`` is a sequence of tensors with a leading task dimension (T, *shape): one per
    shared parameter at parameter level, a single block of shape (T, *Z.shape) at feature
    level. It returns the combined blocks (same shapes without T) and the weights applied to
    each task's task-specific parameters."""

    family: ClassVar[str] = "gradient"
    levels: ClassVar[tuple[str, ...]] = LEVELS
    head_rule: ClassVar[str] = "the weights returned by aggregate()"

    def aggregate(self, jacobian: Sequence[Tensor], losses: Tensor) -> tuple[list[Tensor], Tensor]:
        raise NotImplementedError

    def decide(self, grads: TaskGradients) -> Decision:
        """``(combined, head weights) = aggregate(J, losses)`` (with ``features=`` when the method
        declares ``needs_features``)."""
        J = grads.jacobian_blocks()
        if self.needs_features:  # the contract of needs_features: aggregate() also takes features=
            aggregate_with_features: Callable[..., tuple[list[Tensor], Tensor]] = self.aggregate
            combined, head_w = aggregate_with_features(J, grads.objective_losses, features=grads.method_features())
        else:
            combined, head_w = self.aggregate(J, grads.objective_losses)
        return Decision(combined=list(combined), head_weights=torch.as_tensor(head_w, dtype=torch.float64),
                        values=self.log_values())


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


def required_calls(cls: type[Method] | Method) -> tuple[str, ...]:
    """What the user's own loop must call for ``cls`` to be itself: its ``user_calls`` and the calls
    its ``needs_*`` flags imply (``after_step``, ``observe_cross_gramian``, ``on_task_scores``,
    ``meta_step``), in :data:`USER_CALLS` order."""
    implied = {"after_step": cls.needs_extra_forward, "observe_cross_gramian": cls.needs_second_batch,
               "on_task_scores": cls.needs_task_scores, "meta_step": cls.needs_lookahead}
    wanted = set(cls.user_calls) | {c for c, flag in implied.items() if flag}
    return tuple(c for c in USER_CALLS if c in wanted)


def check_loss_transform(method: Method, transform: str | None) -> None:
    """Raise :class:`~mtlens.errors.ConfigurationError` when ``method`` is not defined for ``transform``.

    The message names the method, the transform, the reason (the method's declared
    ``loss_transform_conflict``) and the fix."""
    t = "none" if transform is None else transform
    problem = method.loss_transform_problem(t)
    if problem is None:
        return
    if t == "log":
        fix = ("Train it on the raw losses: loss_transform='none' (command line: --set loss_transform=none; the "
               "Rep-MTL and quick-* presets set loss_transform: log), or choose a method defined for log "
               "losses (`mtlens methods` marks the others)")
    else:
        fix = f"use loss_transform='{method.loss_transforms[0]}'"
    raise ConfigurationError(f"'{method.name}' is not defined for loss_transform='{t}': {problem}. {fix}.")


def as_loss_vector(losses: Sequence[Tensor]) -> Tensor:
    return torch.stack([loss.reshape(()) for loss in losses])
