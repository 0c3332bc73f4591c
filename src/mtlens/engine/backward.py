"""``mtl_backward``: the short composition of the engine's three steps for the common loop.

::

    grads    = compute_task_gradients(losses, level=..., features=z, shared_params=...)   # 1
    decision = method.decide(grads)                                                      # 2
    apply_decision(grads, decision)                                                      # 3

Usable in any training loop::

    record = mtl_backward(losses, features=z, shared_params=encoder.parameters(),
                          method=mtlens.methods.create("upgrad"), level="param")
    optimizer.step()

The boundary handles, once: the method family → level, the loss transform, the GradScaler, the
process group (data parallelism), the non-finite policy and the transaction (a method's state
is committed only when the whole step succeeded). See docs/engine.md for the design.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from ..errors import ConfigurationError, MTLensError, NonFiniteError
from ._autograd import backward_into_grad, vjp
from .apply import _accumulate, apply_decision, backward_problem, check_decision, weights_error, write_overflow_signal
from .decision import Decision
from .distributed import Dist, resolve
from .feature_step import feature_step
from .gradients import (
    JACOBIAN_MODES,
    LOG_EPS,
    LOSS_TRANSFORMS,
    TaskGradients,
    _dist_initialized,
    _sum,
    all_finite,
    complex_loss_error,
    compute_task_gradients,
    frozen_encoder,
    host_finite,
    loss_problem,
    no_shared_error,
    normalise_features,
    normalise_losses,
    trainable,
    transform_losses,
    warn_parameters_outside_shared,
)
from .graph import objective_leaves, objective_leaves_direct
from .param_step import param_step
from .protocols import (
    GramianWeighting,
    JacobianAggregator,
    LossWeighting,
    Method,
    Regularizer,
    check_loss_transform,
    objective_is_weighted_sum,
)
from .record import StepRecord
from .sharded import refuse_sharded

__all__ = ["DecisionCache", "LOG_EPS", "counters", "mtl_backward", "resolve_level", "transform_losses"]

NONFINITE_POLICIES = ("raise", "skip")

@dataclass
class _Counters:
    skipped_steps: int = 0


counters = _Counters()
"""Process-wide count of steps skipped under ``nonfinite="skip"`` (also in each record)."""


class DecisionCache:
    """Reuse a method's decision for ``update_every`` steps (``update_every=k``).

    Nash-MTL's paper updates its weights every few steps to cut its cost ~4–10×; this does it for
    any method whose decision reduces to task weights: on a decision step the full step runs and
    the weights are kept; on the ``k − 1`` steps between, the engine skips the per-task gradients
    and does one backward of ``Σ_t w_t L_t`` (the heads get ``Σ_t h_t L_t``, a second, head-only
    backward when ``h ≠ w``). Jacobian aggregators (their update is not a weighting) and
    regularisers on per-task gradients refuse it.

    The cache is part of the training state: ``state_dict()`` / ``load_state_dict()``.
    """

    def __init__(self, update_every: int) -> None:
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ConfigurationError(f"update_every must be an int >= 1, got {update_every!r}")
        self.update_every = update_every
        self.step = 0
        self.decision: Decision | None = None

    def due(self) -> bool:
        return self.decision is None or self.step % self.update_every == 0

    def state_dict(self) -> dict[str, Any]:
        d = self.decision
        return {"step": self.step, "weights": None if d is None else d.weights,
                "head_weights": None if d is None else d.head_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.decision = None if state["weights"] is None else Decision(
            weights=state["weights"], head_weights=state["head_weights"])


def resolve_level(method: Method, level: str | None) -> str:
    """The level a step runs at: ``"loss"`` for loss weightings, else ``level`` (default ``"param"``)."""
    if isinstance(method, LossWeighting):
        if level == "feature":
            raise ConfigurationError(
                f"'{method.name}' is a loss-level method: it weights losses, not gradients, so "
                "level='feature' has no meaning for it. Drop level (one backward of the weighted "
                "sum), or choose a gradient method for the feature level (e.g. mgda, aligned_mtl)."
            )
        if level not in (None, "param", "loss"):
            raise ConfigurationError(f"level={level!r}; choose 'param' or 'feature'")
        return "loss"
    if isinstance(method, (GramianWeighting, JacobianAggregator)):
        level = level or "param"
        if level not in ("param", "feature"):
            raise ConfigurationError(f"level={level!r}; choose 'param' or 'feature'")
        if level not in method.levels:
            raise ConfigurationError(
                f"'{method.name}' supports level(s) {method.levels}, not '{level}'"
                + (" (it is defined on the representation)" if method.levels == ("feature",) else "")
            )
        return level
    raise ConfigurationError(f"'{method.name}' ({type(method).__name__}) is not a usable method family")


def _default_grad_norm_params(shared: list[Tensor] | None, name: str) -> list[Tensor]:
    if not shared:
        raise ConfigurationError(f"'{name}' needs shared_params to measure per-task gradient norms")
    weights_2d = [p for p in shared if p.ndim >= 2]
    return [weights_2d[-1] if weights_2d else shared[-1]]


def mtl_backward(
    losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
    *,
    method: Method,
    features: Tensor | Sequence[Tensor] | Mapping[str, Tensor] | None = None,
    shared_params: Iterable[Tensor] | None = None,
    level: str | None = None,
    regularizers: Sequence[Regularizer] = (),
    task_params: Iterable[Tensor] | None = None,
    task_names: Sequence[str] | None = None,
    loss_transform: str | None = None,
    jacobian: str = "loop",
    keep_saliencies: bool = False,
    compute_gramian: bool | str = False,
    nonfinite: str = "raise",
    grad_scaler: torch.amp.GradScaler | None = None,
    grad_norm_params: Sequence[Tensor] | None = None,
    retain_graph: bool = False,
    distributed: Any = None,
    cache: DecisionCache | None = None,
) -> StepRecord:
    """Turn per-task losses into gradients on every parameter, through ``method``.

    Args:
        losses: per-task scalar losses, a ``{task: loss}`` mapping (preferred) or a sequence.
            A vector from ``torch.stack``/``torch.cat`` is as fast (its backward node skips
            the branches of the other tasks, exactly); any other loss vector warns once, since
            each task's backward then runs through every task's head.
        method: a method object from :func:`mtlens.methods.create`.
        features: the shared representation the heads consumed, attached to the encoder's graph:
            ``Z`` (one map); ``[Z_1, Z_2, ...]`` (several shared maps of ONE input, every task may
            read every map; none may be computed from another at feature level); or
            ``{task: Z_task}`` for multi-input benchmarks (one input batch per task; a task's
            loss reaching another task's map raises). Required at feature level and by saliency
            regularisers; at parameter level it lets the engine differentiate the heads once per
            task and the encoder by vector-Jacobian products. It must be the only route from the
            shared parameters to the losses (with ``torch.compile``, compile the encoder as its own
            module: docs/engine.md, "torch.compile").
        shared_params: the encoder's parameters. Required by gradient-level methods.
        level: ``"param"`` or ``"feature"`` for gradient methods (default ``"param"``); a
            loss-level method runs at loss level (``None``).
        regularizers: e.g. ``[create("rep_mtl")]``; their gradients are added after aggregation.
        task_params: task-specific parameters; found from the graph when omitted.
        loss_transform: ``"none"`` or ``"log"``; methods that prescribe one (DB-MTL) set it.
        jacobian: ``"loop"`` (one VJP per task; safe with BatchNorm and RNNs) or
            ``"batched"`` (one vmapped VJP, ``is_grads_batched``). See docs/benchmarks.md.
        keep_saliencies: loss level: store ``S_t`` in the record (T head backwards).
        compute_gramian: loss level, for diagnostics: ``"param"`` or ``"feature"`` computes the
            per-task gradients and the Gramian there; ``True`` means ``"feature"`` when features
            are given, else ``"param"``.
        nonfinite: ``"raise"`` (default) raises :class:`NonFiniteError`; ``"skip"`` warns,
            counts, writes nothing, leaves the method's state untouched and returns a record with
            ``skipped=True``.
        grad_scaler: a ``torch.amp.GradScaler`` for float16 autocast: pass *unscaled* losses;
            the engine scales them, decides on unscaled gradients and writes scaled gradients,
            so ``scaler.step(optimizer); scaler.update()`` work as usual. On overflow it writes
            ``inf`` gradients (the scaler's own signal: ``scaler.step`` skips the optimiser step,
            ``scaler.update`` backs the scale off) into every parameter the step would have written,
            running their post-accumulate-grad hooks as ``scaler.scale(loss).backward()`` would,
            leaves the method's state untouched and returns ``skipped=True``.
        grad_norm_params: parameters on which loss-level methods that declare
            ``needs_grad_norms`` (GradNorm) measure them; default: the last shared weight with
            ndim ≥ 2.
        retain_graph: keep the graph after the step (default: freed, as ``loss.backward()``).
        distributed: data parallelism. ``None`` (default): reduce over the default process group
            when ``torch.distributed`` is initialised with more than one rank; ``False``: never;
            ``True`` or a process group: that group. Each rank passes the losses of its equal
            share of the global batch; every rank then writes the gradient of the global batch.
        cache: a :class:`DecisionCache` to reuse decisions for ``update_every`` steps.

    Returns:
        a :class:`StepRecord`.

    Raises:
        ConfigurationError: impossible options (the message names the fix).
        NonFiniteError: a non-finite loss or gradient under ``nonfinite="raise"``, or a method
            that failed on this step's numbers (its state is left as before the step).
    """
    if _any_autocast() or not torch.is_grad_enabled():  # ≈ 0.1 µs: two reads of thread-local state
        # called inside ``torch.autocast`` (the forward's context left open around the step), ``torch.no_grad()`` or
        # ``torch.inference_mode()``: the step's own arithmetic (the stacked losses and the objective, the Gramian,
        # the combination Σ_t w_t g_t) runs as outside them. Autocast does not change autograd's backward kernels, so
        # ``loss.backward()`` gives the same gradients inside it as outside; it would turn the engine's float32
        # products into bfloat16/float16 ones (before: UPGrad's weights and the encoder's .grad changed by bfloat16
        # rounding); without grad mode the stacked losses had no graph (before: EW raised autograd's "`inputs`
        # argument to `grad()` cannot be empty").
        with _outside_ambient_modes():
            return mtl_backward(
                losses, method=method, features=features, shared_params=shared_params, level=level,
                regularizers=regularizers, task_params=task_params, task_names=task_names,
                loss_transform=loss_transform, jacobian=jacobian, keep_saliencies=keep_saliencies,
                compute_gramian=compute_gramian, nonfinite=nonfinite, grad_scaler=grad_scaler,
                grad_norm_params=grad_norm_params, retain_graph=retain_graph, distributed=distributed, cache=cache)
    dist_up = _dist_initialized()
    if dist_up:  # sharded parameters (FSDP) need a process group: refused, never a silent step
        if shared_params is not None:
            shared_params = list(shared_params)  # an iterator (module.parameters()) is read twice
        refuse_sharded(shared_params)
    if (getattr(type(method), "decide", None) is LossWeighting.decide and level in (None, "loss") and not regularizers
            and not keep_saliencies and not compute_gramian and cache is None and grad_scaler is None
            and loss_transform in (None, "none") and method.loss_transform is None and not method.needs_grad_norms
            and jacobian in JACOBIAN_MODES and nonfinite in NONFINITE_POLICIES
            and (features is not None or not method.needs_features)
            and (distributed is False or (distributed is None and not dist_up)
                 or resolve(distributed) is None)):
        # The common loop: a loss weighting (EW, UW, DWA, ...) with no option that needs per-task gradients.
        # The same step as below, with every check that can fail here, without the general machinery
        # (docs/performance.md, "EW against a plain loop").
        check_loss_transform(method, "none")
        record, problem = _loss_step(losses, task_names, features, cast(LossWeighting, method), retain_graph,
                                     shared_params, dist_up)
        return record if not problem else _not_written(problem, nonfinite, record, None, None)
    if (level in ("feature", "param") and isinstance(features, Tensor)
            and getattr(type(method), "decide", None) is GramianWeighting.decide and level in method.levels
            and not regularizers and not keep_saliencies and not compute_gramian and cache is None
            and grad_scaler is None and loss_transform in (None, "none") and method.loss_transform is None
            and not method.needs_grad_norms and not method.needs_saliency_graph and shared_params is not None
            and (jacobian == "loop" or (level == "feature" and jacobian in JACOBIAN_MODES))
            and nonfinite in NONFINITE_POLICIES and resolve(distributed) is None):
        # The common feature- and parameter-level steps: a Gramian weighting (MGDA, UPGrad, ...) through one shared
        # map with no option that needs the general machinery. The same step as below, with the same checks and
        # transaction (engine/feature_step.py, engine/param_step.py; docs/performance.md, "The feature path's
        # fixed cost", "The lean parameter-level step").
        encoder = trainable(shared_params)
        if not encoder:
            raise no_shared_error(f"gradient method '{method.name}'")
        check_loss_transform(method, "none")
        warn_parameters_outside_shared(method, features, encoder)
        lean = feature_step if level == "feature" else param_step
        done = lean(losses, task_names, features, encoder, task_params, cast(GramianWeighting, method), retain_graph)
        if done is not None:
            record, problem = done
            return record if not problem else _not_written(problem, nonfinite, record, None, None)
        # None, before anything was computed: a loss vector without an exact split, or (parameter level) no Jacobian
        # workspace (not the CPU, mixed dtypes). The general path below, with the parameters already taken from
        # shared_params (an iterator, such as ``module.parameters()``, is spent)
        shared_params = encoder
    if not isinstance(method, Method):
        raise ConfigurationError(
            f"method must be a method object (mtlens.methods.create(name)), got {type(method).__name__}"
        )
    if jacobian not in JACOBIAN_MODES:
        raise ConfigurationError(f"jacobian={jacobian!r}; choose one of {JACOBIAN_MODES}")
    if nonfinite not in NONFINITE_POLICIES:
        raise ConfigurationError(f"nonfinite={nonfinite!r}; choose one of {NONFINITE_POLICIES}")
    for r in regularizers:
        if not isinstance(r, Regularizer):
            raise ConfigurationError(
                f"regularizers must be Regularizer objects; '{getattr(r, 'name', r)}' is a "
                f"{getattr(r, 'family', type(r).__name__)} method"
            )
    is_loss = isinstance(method, LossWeighting)
    gramian_level: str | None = None
    if is_loss and level == "param":
        # ``level`` used to mean, for loss weightings, where compute_gramian measures: one option,
        # two meanings. It is now compute_gramian="param"; the old spelling still works, with a warning.
        warnings.warn(
            f"level='param' has no meaning for the loss weighting '{method.name}' (one backward of the weighted "
            "sum); to measure the parameter-level Gramian for diagnostics pass compute_gramian='param'",
            DeprecationWarning, stacklevel=2,
        )
        gramian_level = "param" if compute_gramian else None
        level = None
    lvl = resolve_level(method, level)
    if compute_gramian and is_loss and gramian_level is None:
        gramian_level = compute_gramian if isinstance(compute_gramian, str) else (
            "feature" if features is not None else "param")
        if gramian_level not in ("param", "feature"):
            raise ConfigurationError(f"compute_gramian={compute_gramian!r}; choose True, 'param' or 'feature'")
    given = None if shared_params is None else list(shared_params)
    shared = trainable(given) if given is not None else None
    if not is_loss and not shared:
        raise no_shared_error(f"gradient method '{method.name}'")
    if not is_loss and features is not None and shared:
        warn_parameters_outside_shared(method, features, shared)
    if isinstance(method, JacobianAggregator) and lvl == "feature" and isinstance(features, Mapping):
        raise ConfigurationError(
            f"'{method.name}' combines the Jacobian itself; at feature level it needs one shared "
            "representation, but this benchmark has one per task (multi-input). Use level='param'."
        )
    if method.needs_features and features is None:
        raise ConfigurationError(f"'{method.name}' needs features=Z (it declares needs_features)")

    # ---- loss transform ---------------------------------------------------------------------
    transform = loss_transform if loss_transform is not None else "none"
    if method.loss_transform is not None:
        if loss_transform not in (None, method.loss_transform):
            raise ConfigurationError(
                f"'{method.name}' prescribes loss_transform='{method.loss_transform}', got '{loss_transform}'"
            )
        transform = method.loss_transform
    if transform not in LOSS_TRANSFORMS:
        raise ConfigurationError(f"unknown loss_transform {transform!r}; choose one of {LOSS_TRANSFORMS}")
    for m in (method, *regularizers):  # each method declares the transforms it is defined for
        check_loss_transform(m, transform)

    scale = 1.0
    if grad_scaler is not None and grad_scaler.is_enabled():
        names, loss_list = normalise_losses(losses, task_names)
        grad_scaler.scale(loss_list[0].detach())  # initialises the scaler's scale tensor
        scale = float(grad_scaler.get_scale())
    dist = resolve(distributed)
    if dist is not None and isinstance(method, JacobianAggregator) and lvl == "feature":
        raise ConfigurationError(
            f"'{method.name}' combines the saliencies entry by entry; under data parallelism each rank holds only "
            "its share of the representation, so its decision would not be the global batch's. Use level='param' "
            "(exact: the per-task gradients are reduced first) or train in one process."
        )

    # ---- cached decision ------------------------------------------------------------------------
    if cache is not None and method.adds_gradients:
        raise ConfigurationError(
            f"'{method.name}' cannot reuse its decisions (update_every): each step adds gradients it computes on "
            "that step's batch (adds_gradients), which a cached weighting would drop; use update_every=1"
        )
    if cache is not None:
        if is_loss or isinstance(method, JacobianAggregator):
            raise ConfigurationError(
                f"'{method.name}' cannot reuse its decisions (update_every): "
                + ("a loss weighting decides from the losses at no gradient cost; use update_every=1"
                   if is_loss else "a Jacobian aggregator's update is not a weighting of the task losses")
            )
        if not cache.due():
            return _cached_step(losses, task_names, method, cache, shared, task_params, transform,
                                regularizers, scale, dist, retain_graph, nonfinite, grad_scaler, lvl)

    method_params = [p for p in method.parameters() if p.requires_grad]
    grads = compute_task_gradients(
        losses, level=lvl, features=features, shared_params=shared or given, task_params=task_params,
        task_names=task_names, loss_transform=transform, jacobian=jacobian, regularizers=regularizers,
        keep_saliencies=keep_saliencies, compute_gramian=gramian_level,
        grad_norm_params=(list(grad_norm_params) if grad_norm_params is not None
                          else _default_grad_norm_params(shared, method.name)) if method.needs_grad_norms else None,
        method_params=method_params, scale=scale, dist=dist, retain_graph=retain_graph,
        saliency_graph=method.needs_saliency_graph and not is_loss,
        weighted_sum=gramian_level == "param" and objective_is_weighted_sum(method),
    )
    record = step_record(grads)
    if not grads.ok:
        return _not_written(grads.problem, nonfinite, record, grads, grad_scaler, grads.overflow)

    # ---- decide and apply, as one transaction ------------------------------------------------
    snap = method.snapshot()
    try:
        try:
            decision = method.decide(grads)
        except MTLensError:
            raise
        except (RuntimeError, FloatingPointError, ValueError, ZeroDivisionError, ArithmeticError) as exc:
            raise NonFiniteError(
                f"method '{method.name}' failed on this step's numbers (losses {grads.losses.tolist()}"
                + (f", Gramian diagonal {grads._gramian.diagonal().tolist()}" if grads._gramian is not None else "")
                + f"): {type(exc).__name__}: {exc}. Its state was left as before the step."
            ) from exc
        if decision.extra_grads and not method.adds_gradients:
            raise ConfigurationError(
                f"method '{method.name}' returned extra_grads without declaring adds_gradients = True"
            )
        check_decision(decision, grads, method.name)
        problem = apply_decision(grads, decision, retain_graph=retain_graph, name=method.name)
    except BaseException:
        method.restore(snap)
        raise
    if problem:
        method.restore(snap)
        return _not_written(problem, nonfinite, record, grads, grad_scaler, scale != 1.0)
    if cache is not None:
        cache.decision = Decision(weights=decision.weights, head_weights=decision.head_weights)
        cache.step += 1
    record.weights = decision.weights
    record.head_weights = decision.head_weights
    record.method_values.update(decision.values)
    return record


_any_autocast = torch._C._is_any_autocast_enabled
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu")


def _outside_ambient_modes() -> contextlib.ExitStack:
    """A context with grad mode on, inference mode off and autocast off on every device type where it is on
    (:func:`mtl_backward` called inside ``torch.no_grad()``, ``torch.inference_mode()`` or ``torch.autocast``)."""
    stack = contextlib.ExitStack()
    if torch.is_inference_mode_enabled():  # (grad mode reads off there too)
        stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    for dev in (*_AUTOCAST_DEVICES, torch._C._get_privateuse1_backend_name()):
        try:
            on = torch.is_autocast_enabled(dev)
        except RuntimeError:  # a device type this torch's autocast does not know
            continue
        if on:
            stack.enter_context(torch.autocast(dev, enabled=False))
    return stack


def _loss_step(losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor, task_names: Sequence[str] | None,
               features: Tensor | Sequence[Tensor] | Mapping[str, Tensor] | None, method: LossWeighting,
               retain_graph: bool, shared_params: Iterable[Tensor] | None = None,
               dist_up: bool = False) -> tuple[StepRecord, str]:
    """One loss-level step of a loss weighting whose decision is the default one (``combine`` of the
    attached losses), without a loss transform, GradScaler, process group, cache, regulariser or
    diagnostic: :func:`compute_task_gradients` → ``method.decide`` → :func:`check_decision` →
    :func:`apply_decision` with only the work that step does, with the same checks, errors and
    messages, the same record and the same transaction (the method's state is restored and nothing is
    written into ``.grad`` unless every gradient is finite).

    A method with ``constant_weights`` (EW) has its losses checked together with the gradients, in one
    fused check after the backward (the verdict and message are those of the separate checks: a
    non-finite loss is reported as such, before any gradient). The weights (T floats, on the host) are
    checked element by element, before the backward.

    ``dist_up``: ``torch.distributed`` is initialised (the caller's one reading): the gradients are then captured and
    written after the verdict, never by ``backward()`` (a DDP reducer listens on the leaves' ``AccumulateGrad`` nodes).

    Returns ``(record, problem)``: ``problem`` is ``""`` when the gradients were written, else why
    nothing was (the caller applies the non-finite policy)."""
    names, loss_list = _lean_losses(losses, task_names)
    if not (isinstance(features, Tensor) and features.requires_grad):  # one attached map passes as it is
        # its checks only: the loss level reads no features (a frozen encoder's are not attached)
        normalise_features(features, names, frozen=frozen_encoder(shared_params)[1])
    stacked = torch.stack(loss_list)  # its detached view is the record's losses
    if stacked.dtype.is_complex:  # one complex loss makes the stack complex
        raise next(complex_loss_error(n, v) for n, v in zip(names, loss_list) if v.dtype.is_complex)
    raw = stacked.detach()
    record = StepRecord(task_names=names, losses=raw, objective_losses=raw, level="loss")
    fused = method.constant_weights and not method.stateful
    if not fused and not host_finite(raw):
        return record, loss_problem(names, raw)
    name = method.name
    snap = method.snapshot()
    written: list[Tensor] = []
    try:
        try:  # LossWeighting.decide
            objective, w = method.combine(stacked, grad_norms=None)
            weights = w.detach() if w.requires_grad else w
            weights = weights if weights.dtype == torch.float64 else weights.to(torch.float64)
            weights = weights if weights.ndim == 1 else weights.reshape(-1)
            values = method.log_values()
        except MTLensError:
            raise
        except (RuntimeError, FloatingPointError, ValueError, ZeroDivisionError, ArithmeticError) as exc:
            raise NonFiniteError(
                f"method '{name}' failed on this step's numbers (losses {raw.tolist()}): {type(exc).__name__}: {exc}. "
                "Its state was left as before the step."
            ) from exc
        if not weights.is_cpu:  # check_decision (``is_cpu``: ``device.type`` builds a device object, ≈ 15 µs cold)
            weights = weights.cpu()
        w_list = weights.tolist()  # one read for the length and the values (host_finite's)
        if len(w_list) != len(names) or not all(map(math.isfinite, w_list)):
            raise weights_error(name, weights, len(names))
        if objective is None:  # apply_decision, loss level
            raise ConfigurationError(f"loss level needs an objective from '{name}'")
        if dist_up:  # a DDP reducer's hooks on the leaves' AccumulateGrad nodes: never before the verdict
            params, direct, owned = objective_leaves(objective), False, False
        else:
            params, direct, owned = objective_leaves_direct(objective)
        if direct:  # every .grad is None and nothing runs on a write: backward() writes them, a refusal unwrites them
            written = params  # from here on a failure (below) puts them back to None
            backward_into_grad(objective, retain_graph)
            gs: Sequence[Tensor | None] = [p.grad for p in params]
        else:
            gs = vjp(objective, params, retain_graph=retain_graph)
        problem = ""
        if not all_finite([*gs, raw] if fused else gs, owned):
            if fused and not host_finite(raw):
                problem = loss_problem(names, raw)
            else:
                problem = backward_problem(name, raw)
            for p in written:  # the direct write's .grad go back to None, the state before the step
                p.grad = None
        elif not direct:
            _accumulate(params, gs, 1.0, objective)
    except BaseException:  # a hook that raises, anomaly mode's NaN, ^C during the backward or the check
        for p in written:  # the direct write's leaves, some written before the failure: every .grad was None
            p.grad = None
        method.restore(snap)
        raise
    if problem:
        method.restore(snap)
        return record, problem
    record.weights = weights
    if values:
        record.method_values.update(values)
    return record, ""


def _lean_losses(losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
                 task_names: Sequence[str] | None) -> tuple[list[str], list[Tensor]]:
    """:func:`normalise_losses` for the common call, ``{name: 0-dim loss with a graph}`` without
    ``task_names``, with its checks in one pass (the same list back); anything else goes through
    :func:`normalise_losses` (its errors and messages)."""
    if type(losses) is dict and task_names is None and losses:
        values = list(losses.values())
        for v in values:
            if type(v) is not Tensor or v.ndim or not v.requires_grad:
                break
        else:
            names = list(losses)
            for n in names:
                if type(n) is not str:
                    break
            else:
                return names, values
    return normalise_losses(losses, task_names)


def step_record(grads: TaskGradients) -> StepRecord:
    rec = StepRecord(task_names=list(grads.task_names), losses=grads.losses,
                     objective_losses=grads.objective_losses, level=grads.gramian_level or grads.level)
    rec.saliencies = grads.saliencies
    rec.regularizer_values = dict(grads.regularizer_values)
    if grads.ok and grads._gramian is not None:
        rec.gramian = grads._gramian
    elif grads.ok and grads.level == "param" and (grads._rows is not None or grads._blocks is not None):
        rec.gramian = grads.gramian()
    return rec


def _not_written(msg: str, policy: str, record: StepRecord, grads: TaskGradients | None,
                 grad_scaler: torch.amp.GradScaler | None, overflow: bool = False) -> StepRecord:
    record.weights = None
    record.gramian = None
    if grad_scaler is not None and overflow and grads is not None:
        # The scaler's own overflow signal: inf gradients make scaler.step() skip the optimiser
        # step and scaler.update() back the scale off, exactly as after scaler.scale(loss).backward(),
        # which also runs every written parameter's post-accumulate hooks (in its order)
        write_overflow_signal(grads)
        record.skipped, record.reason = True, "grad_scaler overflow: " + msg
        return record
    if policy == "raise":
        raise NonFiniteError(msg)
    counters.skipped_steps += 1
    warnings.warn(f"mtlens: step skipped ({counters.skipped_steps} so far): {msg}", RuntimeWarning, stacklevel=3)
    record.skipped, record.reason = True, msg
    return record


def _cached_step(losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor, task_names: Sequence[str] | None,
                 method: Method, cache: DecisionCache, shared: list[Tensor] | None,
                 task_params: Iterable[Tensor] | None, transform: str, regularizers: Sequence[Regularizer],
                 scale: float, dist: Dist | None, retain_graph: bool, nonfinite: str,
                 grad_scaler: torch.amp.GradScaler | None, lvl: str) -> StepRecord:
    """One backward of ``Σ_t w_t L_t`` with the cached weights (heads: ``Σ_t h_t L_t``)."""
    if regularizers:
        raise ConfigurationError(
            "update_every > 1 with regularisers: a regulariser's penalty needs the per-task gradients of every "
            "step; use update_every=1"
        )
    grads = compute_task_gradients(losses, level="loss", features=None, shared_params=shared,
                                   task_params=task_params if task_params is not None else None,
                                   task_names=task_names, loss_transform=transform, scale=scale, dist=dist)
    record = step_record(grads)
    record.level = lvl
    if not grads.ok:
        return _not_written(grads.problem, nonfinite, record, grads, grad_scaler, False)
    d = cache.decision
    if d is None or d.weights is None:  # cache.due() is true without a decision: never reached
        raise ConfigurationError("update_every: no cached decision to reuse; the step should have been a decision step")
    assert shared is not None  # gradient methods refuse a missing shared_params above
    w, hw = d.weights, d.head_weights
    if w.shape[0] != grads.T:
        raise ConfigurationError(f"the cached decision has {w.shape[0]} weights for {grads.T} tasks")
    attached = grads._attached
    assert attached is not None  # the loss level keeps the attached objective losses
    heads = grads.task_params
    obj = _sum(float(w[t]) * attached[t] for t in range(grads.T)) * scale
    same = hw is None or bool(torch.equal(hw, w))
    params = list(shared) + ([] if not same else heads)
    head_pass = not same and bool(heads)  # no head to write (every head frozen): no second backward
    gs: list[Tensor | None] = list(
        vjp(obj, params, retain_graph=retain_graph or head_pass))
    if head_pass:
        assert hw is not None  # not same
        hobj = _sum(float(hw[t]) * attached[t] for t in range(grads.T)) * scale
        gs += list(vjp(hobj, heads, retain_graph=retain_graph))
    if dist is not None:
        if not grads._heads_given:  # heads found from this rank's graph: the same list on every rank?
            dist.check_same_params(heads, "task-specific parameters (heads)")
        gs = dist.mean_list(gs, like=list(shared) + heads)
    if not all_finite(gs):
        return _not_written(f"non-finite gradient with the cached weights of '{method.name}'", nonfinite, record,
                            grads, grad_scaler, scale != 1.0)
    gs = [None if g is None else g / scale for g in gs] if scale != 1.0 else gs
    _accumulate(list(shared) + heads, gs, scale, attached)
    cache.step += 1
    record.weights = w
    record.method_values["cached"] = 1.0
    return record
