"""What the engine expects of a method: the three families and the regulariser interface.

The engine defines these contracts; :mod:`mtlens.methods` implements them. A method is a pure
object: everything it needs arrives as an argument (losses, Gramian, Jacobian blocks) or
through an explicit call (``on_epoch_end``, ``after_step``). It never reads trainer state.

A method is a :class:`torch.nn.Module` (as TorchJD's aggregators are), and its state goes
through PyTorch's own mechanisms: tensors as buffers (``register_buffer``), scalars the user's
optimiser learns as parameters (UW's log-variances), everything else (step counters, the
method's ``torch.Generator``, the state of an internal ``torch.optim`` optimiser) as the
module's extra state, named once in the class attribute ``state_attrs``. ``state_dict()`` and
``load_state_dict()`` are the module's; the hyper-parameters are the constructor's arguments,
recorded when the object is built.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigurationError
from .decision import Decision

if TYPE_CHECKING:  # pragma: no cover
    from .gradients import TaskGradients

LEVELS = ("param", "feature")
UNIT_HEAD_RULE = "own gradient, unit weights (TorchJD mtl_backward, LibMTL)"
LOSS_TRANSFORM_NAMES = ("none", "log")
USER_CALLS = ("parameters", "after_step", "on_epoch_end", "observe_cross_gramian", "on_task_scores", "meta_step")


@dataclass(frozen=True)
class Claim:
    """A property a method's source states for it, declared on the class (``Method.claims``).

    :mod:`mtlens.methods.testing` has one assertion per property name; the test suite runs each
    over every method that claims it, and nowhere else is a method's property listed.

    Args:
        source: where the property is stated or proved (paper and equation, or "by
            construction: ..." with the reason).
        when: the condition on the Jacobian under which it holds, a name from
            :data:`mtlens.methods.testing.CONDITIONS` (``"always"``, ``"two_tasks"``,
            ``"common_descent"``, ``"equal_projections_solvable"``).
        degree: for ``"homogeneous"``: ``k`` in ``d(cJ) = c^k d(J)``.
        total: for ``"weights_total"``: ``"T"`` or ``"1"``, what the weights sum to.
        hparams: hyper-parameters under which the property holds (MGDA's invariance to per-task
            rescaling needs ``normalization="l2"``).
    """

    source: str
    when: str = "always"
    degree: int = 1
    total: str = ""
    hparams: Mapping[str, Any] = field(default_factory=dict)


SYMMETRIC = Claim("by construction: the tasks enter symmetrically (no task order in the definition)")
"""The ``permutation_invariant`` claim of a method whose definition treats the tasks alike."""
SCALE_FREE = Claim("by construction: no absolute constant (epsilon, clip) enters the update")
"""The ``homogeneous`` claim (degree 1) of a method without absolute constants."""


def _plain(value: Any) -> Any:
    """A hyper-parameter value as plain Python (tuples and tensors as lists, devices as strings)."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, torch.device):
        return str(value)
    return value


def _save_attr(value: Any) -> Any:
    """The saved form of one ``state_attrs`` entry (copied by :meth:`Method.state_dict`)."""
    if isinstance(value, torch.Generator):
        return value.get_state()
    if hasattr(value, "state_dict"):  # torch.optim optimisers, the methods' small helpers
        return value.state_dict()
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):  # per-block tensors (DB-MTL's EMA, MoCo's tracked gradients)
        return [_save_attr(v) for v in value]
    return value


def _record_init(init: Any) -> Any:
    """Wrap a method's ``__init__``: initialise the module first, record the bound arguments once."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapped(self: Method, *args: Any, **kwargs: Any) -> None:
        if "_parameters" not in self.__dict__:
            torch.nn.Module.__init__(self)
        if "_init_args" not in self.__dict__:  # the outermost constructor's arguments
            bound = sig.bind(self, *args, **kwargs)
            bound.apply_defaults()
            self._init_args = dict(list(bound.arguments.items())[1:])
        init(self, *args, **kwargs)

    wrapped._mtlens_records = True  # type: ignore[attr-defined]
    return wrapped


class MethodState(torch.nn.Module):
    """The state machinery of a :class:`Method`: a module whose ``state_dict`` resumes it exactly.

    Buffers and parameters may be ``None`` until the first call ("not created yet" is state too);
    the names in ``state_attrs`` travel as the module's extra state; ``state_dict()`` is a copy;
    ``load_state_dict`` raises :class:`~mtlens.errors.CheckpointError` naming the method;
    :meth:`snapshot` / :meth:`restore` make a step transactional. :class:`Method` adds the
    contract (hooks, capabilities, claims) on top.
    """

    name: ClassVar[str] = ""
    stateful: ClassVar[bool] = False
    _extra_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        if "_parameters" not in self.__dict__:
            super().__init__()

    # -- transactional steps -----------------------------------------------------------------------
    def snapshot(self) -> Any:
        """A copy of everything a step may change, restored by :meth:`restore` when the step fails.

        Default: ``state_dict()`` (already a copy; ``None`` for stateless methods; a deep copy of
        it for a subclass that writes its own ``state_dict``). The engine commits a step's state
        change only when the whole step succeeded."""
        if not self.stateful:
            return None
        if type(self).state_dict is MethodState.state_dict:
            # state_dict()'s deep copy, with tensors copied by clone() (Tensor.__deepcopy__ costs ~20 µs a
            # tensor in Python); the extra state (optimisers, plain attributes) is deep-copied as before
            live = torch.nn.Module.state_dict(self)
            snap = type(live)((k, v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)) for k, v in live.items())
            snap._metadata = getattr(live, "_metadata", {})  # type: ignore[attr-defined]
            return snap
        return copy.deepcopy(self.state_dict())

    def restore(self, snapshot: Any) -> None:
        """Undo a failed step: put back the state :meth:`snapshot` returned.

        A learnable parameter that did not exist before the step (``None`` in the snapshot: UW's
        log-variances created on the first call) cannot be un-created, since the user's optimiser
        may hold it; it holds only its initial values (no optimiser step ran), so it is left as it
        is. Buffers created by the failed step go back to ``None``."""
        if snapshot is None:
            return
        try:
            self.load_state_dict(snapshot)
        except CheckpointError:
            if not (isinstance(snapshot, Mapping) and any(v is None for v in snapshot.values())):
                raise

    # -- state: the module's, with lazily created tensors and plain attributes -------------------
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "",
                   keep_vars: bool = False) -> Any:
        """Everything needed to resume exactly: buffers, parameters and ``state_attrs`` (a copy).

        ``torch.nn.Module.state_dict`` (``torch.load(..., weights_only=True)`` reads it back); at
        the top level the result is a deep copy, because later steps update buffers and internal
        optimiser state in place."""
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if destination is None and not args and not keep_vars:
            out = copy.deepcopy(out)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """Restore a state from :meth:`state_dict` (``torch.nn.Module.load_state_dict``, strict).

        Raises :class:`~mtlens.errors.CheckpointError` naming the method and the problem when the
        state is of another method, lacks entries or has other shapes; ``ValueError`` when a
        stateless method gets a non-empty state."""
        if not isinstance(state_dict, Mapping):
            raise CheckpointError(f"method '{self.name}': a state must be a mapping, got {type(state_dict).__name__}")
        if not self.stateful and not self._extra_names and not any(
                True for _ in itertools.chain(self.named_parameters(), self.named_buffers())):
            if state_dict:
                raise ValueError(f"method '{self.name}' is stateless but got state keys {sorted(state_dict)}")
            return None
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except CheckpointError:
            raise
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"method '{self.name}': cannot load this state ({exc}); it was not saved by "
                f"'{self.name}'.state_dict() with the same hyper-parameters and task count (states saved before "
                "mtlens methods became torch.nn.Modules have other keys: restart such a run)") from exc

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, value in itertools.chain(self._parameters.items(), self._buffers.items()):
            if value is None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = None  # created on the first call: "not yet" is state too

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        rest = dict(state_dict)
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if name in self._non_persistent_buffers_set:
                continue
            if key not in state_dict:
                if buf is None and strict:
                    missing_keys.append(key)
                continue
            stored = state_dict[key]
            if stored is None:
                self._buffers[name] = None
                del rest[key]
            elif isinstance(stored, Tensor):  # the stored tensor's shape, dtype and device
                self._buffers[name] = torch.empty_like(stored, requires_grad=False)
        for name, param in list(self._parameters.items()):
            key = prefix + name
            if key not in state_dict:
                if param is None and strict:
                    missing_keys.append(key)
                continue
            stored = state_dict[key]
            if stored is None:
                del rest[key]
                if param is not None:
                    error_msgs.append(f"the state was saved before its {name} existed (they exist now)")
            elif param is None and isinstance(stored, Tensor):
                dtype = torch.promote_types(stored.dtype, torch.float32)
                self._parameters[name] = torch.nn.Parameter(torch.empty_like(stored, dtype=dtype))
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _get_extra(self) -> dict[str, Any]:
        """The ``state_attrs`` entries, keyed by their names without a leading underscore."""
        return {name.lstrip("_"): _save_attr(getattr(self, name)) for name in self._extra_names}

    def _set_extra(self, state: Any) -> None:
        keys = [name.lstrip("_") for name in self._extra_names]
        if not isinstance(state, Mapping) or set(state) != set(keys):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise CheckpointError(f"method '{self.name}': expected the state of {keys}, got {got}")
        for name, key in zip(self._extra_names, keys):
            current, stored = getattr(self, name), state[key]
            if isinstance(current, torch.Generator):
                current.set_state(stored)
            elif hasattr(current, "load_state_dict"):
                current.load_state_dict(copy.deepcopy(stored))
            else:
                setattr(self, name, copy.deepcopy(stored))

    def parameters(self, recurse: bool = True) -> list[torch.nn.Parameter]:  # type: ignore[override]
        """Learnable tensors the caller's optimiser must update (e.g. UW's log-variances), as a list:
        ``list(model.parameters()) + method.parameters()``."""
        return list(super().parameters(recurse))



class Method(MethodState):
    """Base of every multi-task optimisation method: a :class:`torch.nn.Module`.

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
    ``needs_lookahead`` (bilevel methods, Auto-Lambda, MOML and FORUM: before every step the
    caller passes a :class:`~mtlens.engine.LookAhead` over the step's batch and an independent
    validation batch to :meth:`meta_step`). ``needs_saliency_graph`` (ConsMTL: the engine keeps
    the graph of the saliencies ``S_t = ∂L_t/∂Z`` through the heads,
    :meth:`~mtlens.engine.gradients.TaskGradients.attached_saliencies`, so that the method can
    differentiate a function of them w.r.t. the task-specific parameters). ``adds_gradients``
    (ConsMTL's term on the heads, FORUM's upper-level multi-gradient): the method's
    :class:`Decision` may carry gradients it computed itself (``Decision.extra_grads``), which the
    engine adds to ``.grad`` with everything else (all or nothing); such a decision is not a
    weighting of the step's losses, so it is never cached (``update_every``).

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

    What a method guarantees is declared here too, once: ``claims`` maps a property name of
    :mod:`mtlens.methods.testing` (``"non_conflicting"``, ``"permutation_invariant"``,
    ``"homogeneous"``, ``"rescaling_invariant"``, ``"weights_total"``) to a :class:`Claim` with its
    source; ``disclaims`` maps a property a reader would expect to why it does not hold (e.g. an
    absolute epsilon breaks homogeneity); ``failures`` maps a condition to the error the method
    raises there and why (FairGrad: no direction improves every task → SolverError);
    ``solver_rtol`` is the relative accuracy of an iterative solver (``None``: closed form).

    State (see the module docstring): tensors are buffers, learnable scalars parameters, the rest
    is named in ``state_attrs`` and saved as the module's extra state (``"_extra_state"``): a
    ``torch.Generator`` by its state, an object with ``state_dict()`` (a ``torch.optim``
    optimiser, :class:`~mtlens.methods._calls.EpochCalls`) by it, anything else as is. A buffer or
    parameter that is created on the first call (``None`` until then) appears as ``None`` in the
    state, so that loading a state restores "not created yet" exactly. ``state_dict()`` returns a
    copy (later steps update the buffers in place); ``load_state_dict`` raises
    :class:`~mtlens.errors.CheckpointError` for a state of another method or shape.

    Subclasses need not call ``super().__init__()``: the module is initialised, and the
    constructor's arguments recorded for :meth:`hparams`, before their ``__init__`` runs.
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
    needs_saliency_graph: ClassVar[bool] = False
    adds_gradients: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    loss_transforms: ClassVar[tuple[str, ...]] = LOSS_TRANSFORM_NAMES
    loss_transform_conflict: ClassVar[str] = ""
    user_calls: ClassVar[tuple[str, ...]] = ()
    claims: ClassVar[Mapping[str, Claim]] = {}
    disclaims: ClassVar[Mapping[str, str]] = {}
    failures: ClassVar[Mapping[str, tuple[type[Exception], str]]] = {}
    solver_rtol: ClassVar[float | None] = None
    state_attrs: ClassVar[tuple[str, ...]] = ()
    _init_args: dict[str, Any]
    _extra_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_mtlens_records", False):
            cls.__init__ = _record_init(init)  # type: ignore[method-assign]
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            names += [n for n in klass.__dict__.get("state_attrs", ()) if n not in names]
        cls._extra_names = tuple(names)
        if names:  # only then does the module save an "_extra_state" entry (nn.Module checks the class)
            cls.get_extra_state = MethodState._get_extra  # type: ignore[method-assign, assignment]
            cls.set_extra_state = MethodState._set_extra  # type: ignore[method-assign, assignment]

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
        """The hyper-parameters this instance was built with: its constructor's arguments, defaults
        included, as plain Python values (recorded once, when the object was built)."""
        return {k: _plain(v) for k, v in self.__dict__.get("_init_args", {}).items()}

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
    constant_weights: ClassVar[bool] = False
    """``True`` when :meth:`combine` is a pure function of the attached losses whose weights are the same at
    every step for a given number of tasks (EW): they read neither the loss values nor any state. The
    engine may then check the losses for finiteness together with the gradients, after the backward and
    before anything is written (same verdicts, messages and transaction; the graph is then freed on a
    failing step as on a successful one)."""

    weighted_sum_objective: ClassVar[bool] = False
    """``True`` when an overridden :meth:`combine` still returns exactly ``(Σ_t w_t L_t, w)`` (EW). The default
    :meth:`combine` is such an objective whatever this says; a subclass that overrides :meth:`combine` again must
    declare it again (the promise is not inherited past an override); see :func:`objective_is_weighted_sum`."""

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


def objective_is_weighted_sum(method: Method) -> bool:
    """Whether ``method``'s loss-level objective is ``Σ_t w_t L_t`` with ``w`` its decision's ``weights``: a
    loss weighting with the default :meth:`LossWeighting.decide` whose :meth:`~LossWeighting.combine` is the
    default one or declares ``weighted_sum_objective``. The engine then may write ``Σ_t w_t g_t`` from per-task
    rows it computed anyway (``compute_gramian="param"``) instead of differentiating the objective again."""
    if not isinstance(method, LossWeighting):
        return False
    cls = type(method)
    return (cls.decide is LossWeighting.decide and _declares_weighted_sum(cls)
            and not method.needs_grad_norms and not method.adds_gradients)


def _declares_weighted_sum(cls: type) -> bool:
    """The default :meth:`LossWeighting.combine`, or ``weighted_sum_objective`` declared by the class that defines
    the :meth:`~LossWeighting.combine` in use or by a subclass of it: a subclass of EW that overrides ``combine``
    (nonlinearly, say) without declaring it again does not inherit EW's promise."""
    for k in cls.__mro__:
        if k is LossWeighting:  # neither overridden: the default combine
            return True
        if "weighted_sum_objective" in vars(k):
            return bool(vars(k)["weighted_sum_objective"])
        if "combine" in vars(k):
            return False
    return False


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
