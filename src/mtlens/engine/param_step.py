"""The common parameter-level step, without the general machinery: one shared map, a Gramian weighting.

:func:`mtlens.engine.mtl_backward` routes here a step that is ``level="param"`` with ``features=Z`` (one
tensor), ``jacobian="loop"``, a :class:`~mtlens.engine.protocols.GramianWeighting` whose decision is the
default one (``weights(G, losses)`` and its head rule: UPGrad, MGDA, DualProj, ...), the losses as a mapping
or a sequence, and none of: a regulariser, a loss transform, a GradScaler, a process group, a
:class:`~mtlens.engine.backward.DecisionCache`, ``compute_gramian``, ``keep_saliencies``, a method that needs
the saliencies' graph or gradient norms — on the CPU with the encoder's parameters in one dtype (the reused
``(T, P)`` Jacobian workspace, :func:`~mtlens.engine.gramian.jacobian_workspace`; elsewhere the general path
runs). It is the step of :func:`compute_task_gradients` → ``method.decide`` → :func:`check_decision` →
:func:`apply_decision` → ``step_record`` with only the work that step does: the same calls for the same numbers
(heads found from the graph, T head backwards for ``S_t`` and the heads' gradients, T encoder VJPs
``g_t = J_Zᵀ S_t`` written into the workspace's rows, its Gramian, ``method.weights``, ``Σ_t w_t g_t`` as one
product, the per-parameter views of it), the same checks with the same messages in the same order, the same
record (with the ``(T, *Z)`` saliencies) and the same transaction (the method's state restored and nothing
written unless every written gradient is finite), without building the
:class:`~mtlens.engine.gradients.TaskGradients` and :class:`~mtlens.engine.decision.Decision` objects that no
one reads afterwards. Proved against the general path in ``tests/engine/test_param_step.py`` (bitwise
``.grad``, record, method state; the errors and the skip policy). Why: docs/performance.md, "The lean
parameter-level step".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import MTLensError, NonFiniteError
from . import pool
from ._autograd import vjp
from .apply import _accumulate, _check_range, _combine_heads, weights_error
from .feature_step import _entries, _fresh_rows, _unit_rows
from .gradients import (
    _dense,
    _find_heads,
    _heads_pass,
    _retain_flags,
    _walk_heads,
    _warn_zero,
    _write_row,
    all_finite,
    check_only_route,
    host_finite,
    loss_problem,
    normalise_features,
    normalise_losses,
)
from .gramian import combine_matrix, gramian_from_matrix, jacobian_workspace, split_flat
from .protocols import GramianWeighting, MethodState
from .record import StepRecord

_DEFAULT_HEAD_WEIGHTS = GramianWeighting.head_weights


def param_step(losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor, task_names: Sequence[str] | None,
               features: Tensor, shared: list[Tensor], task_params: Iterable[Tensor] | None,
               method: GramianWeighting, retain_graph: bool) -> tuple[StepRecord, str] | None:
    """One parameter-level step of ``method`` (a Gramian weighting with the default ``decide``) through one
    shared map, or ``None`` — before anything is computed — where the Jacobian workspace does not apply (not on
    the CPU, or the encoder's parameters in several dtypes or on several devices) or a loss vector has no exact
    split (a stacked vector's tasks start at the stack's inputs, as in the general path:
    :func:`~mtlens.engine.stacked.lean_entry_points`): the caller then runs the general path.

    ``shared``: the encoder's parameters that require grad (not empty: the caller checked). Raises what the
    general path raises (:class:`ConfigurationError`, :class:`~mtlens.errors.ShapeError`,
    :class:`NonFiniteError`) with the same messages, the method's state left as before the step.

    Returns ``(record, problem)``: ``problem`` is ``""`` when the gradients were written, else why nothing was
    (a non-finite loss or gradient: the caller applies the non-finite policy to ``record``)."""
    if features.device.type != "cpu" or any(p.device != features.device for p in shared):
        return None
    if type(method).parameters is MethodState.parameters and not method._modules:  # its own tensors only
        method_params = [p for p in method._parameters.values() if p is not None and p.requires_grad]
    else:
        method_params = [p for p in method.parameters() if p.requires_grad]
    names, loss_list = normalise_losses(losses, task_names)
    feats = normalise_features(features, names)
    T = len(loss_list)
    split, outs, gos = _entries(losses, loss_list)
    if not outs:
        return None
    J = jacobian_workspace(T, shared)  # the reused (T, P) matrix the rows are written into
    if J is None:
        return None
    raw = torch.stack([v.detach() for v in loss_list])
    record = StepRecord(task_names=names, losses=raw, objective_losses=raw, level="param")
    if not host_finite(raw):
        return record, loss_problem(names, raw)
    # the heads pass of compute_task_gradients (gradients._heads_pass) for one map: per task S_t and the
    # gradients of its own heads, each task's head graph freed on its last use (as feature_step does); then
    # gradients._encoder_rows, loop mode: g_t = J_Zᵀ S_t into row t, the encoder's graph freed by the last
    n = len(shared)
    if task_params is None:  # the heads from the graph, with each task's part of it, in one walk
        heads, sets, own = _walk_heads(loss_list, feats.maps, shared, method_params,
                                       None if split is None else [node for node, _ in split.branches])
        retain = [True] * T if retain_graph else _retain_flags(sets)
        check_only_route(names, feats.maps, sets)
        # the last task in ONE backward (its head, S_T at the map, on through the encoder): the same numbers as
        # its head backward then its encoder VJP from S_T (the same nodes on the same values), one call fewer —
        # unless the map has backward hooks (``Z.register_hook``, ``Z.retain_grad()``): the general path's encoder
        # VJP from S_T runs them once more (on its root). The last task then takes the two calls too
        one_call = not (features._backward_hooks or features.retains_grad)
        k = T - 1 if one_call else T  # the tasks that take two calls
        sal: list[Tensor] = []
        rows: list[Sequence[Tensor | None]] = []
        for t in range(k):
            gs = vjp(outs[t], [features, *[heads[i] for i in own[t]]], gos[t], retain_graph=retain[t])
            sal.append(gs[0] if gs[0] is not None else torch.zeros_like(features))
            rows.append(gs[1:])
        for t in range(k):
            gz = vjp([features], shared, grad_outputs=[sal[t]], retain_graph=retain_graph or t < T - 1)
            _write_row(J, t, _dense(gz), shared)
        if one_call:
            gs = vjp(outs[T - 1], [features, *shared, *[heads[i] for i in own[T - 1]]], gos[T - 1],
                     retain_graph=retain_graph)
            rows.append(gs[n + 1:])
            if gs[0] is not None:
                sal.append(gs[0])
                _write_row(J, T - 1, _dense(gs[1:n + 1]), shared)
            else:  # the last loss does not reach the map: the general path's VJP of zeros, which also frees the
                # encoder's graph (as loss.backward() would) and gives its numbers (0 · inf = NaN included)
                sal.append(torch.zeros_like(features))
                gz = vjp([features], shared, grad_outputs=[sal[T - 1]], retain_graph=retain_graph)
                _write_row(J, T - 1, _dense(gz), shared)
        head_rows: list[list[Tensor | None]] | None = None  # full rows: built if the general combination runs
        fresh = _fresh_rows(sets, heads)  # no head gradient can be a tensor that someone else holds
    else:
        heads = _find_heads(loss_list, feats, shared, task_params, method_params)
        sal_maps, head_rows, own = _heads_pass(names, loss_list, feats, heads, False, retain_graph, split,
                                               None if split is None else list(zip(outs, gos)))
        sal = [s[0] for s in sal_maps]
        rows = [[head_rows[t][i] for i in own[t]] for t in range(T)]
        fresh = False  # (the graph was not walked here: the rows are copied, as the general path does)
        for t in range(T):
            gz = vjp([features], shared, grad_outputs=[sal[t]], retain_graph=retain_graph or t < T - 1)
            _write_row(J, t, _dense(gz), shared)
    record.saliencies = pool.stack(sal)  # the record's (T, *Z) saliencies, in a reused block (engine/pool.py)
    G = gramian_from_matrix(J)
    diag = G.diagonal().tolist()  # diag(G) = ‖g_t‖² in float64 is finite iff every per-task gradient is
    if not all(math.isfinite(v) for v in diag):
        bad = [n for n, v in zip(names, diag) if not math.isfinite(v)]
        return record, (f"non-finite gradient of task(s) {bad} at level 'param' (losses {raw.tolist()}); nothing "
                        "was written into .grad. A loss may be finite while its gradient overflows: lower the "
                        "learning rate or check the inputs.")
    if 0.0 in diag:
        _warn_zero(names, diag, "param")
    record.gramian = G

    # ---- decide and apply, as one transaction (mtl_backward's general path) ------------------------
    name = method.name
    snap = method.snapshot()
    try:
        try:  # GramianWeighting.decide
            w = method.weights(G, raw)
            w = torch.as_tensor(w)
            if w.requires_grad:
                w = w.detach()
            if w.dtype != torch.float64:
                w = w.to(torch.float64)
            if w.ndim != 1:
                w = w.reshape(-1)
            default_heads = type(method).head_weights is _DEFAULT_HEAD_WEIGHTS
            hw = torch.ones(w.shape, dtype=torch.float64) if default_heads else method.head_weights(w)
            values = method.log_values()
        except MTLensError:
            raise
        except (RuntimeError, FloatingPointError, ValueError, ZeroDivisionError, ArithmeticError) as exc:
            raise NonFiniteError(
                f"method '{name}' failed on this step's numbers (losses {raw.tolist()}, Gramian diagonal "
                f"{G.diagonal().tolist()}): {type(exc).__name__}: {exc}. Its state was left as before the step."
            ) from exc
        # check_decision
        if w.device.type != "cpu":
            w = w.cpu()
        wl = w.tolist()
        if w.shape[0] != T or not all(map(math.isfinite, wl)):
            raise weights_error(name, w, T, G.diagonal().tolist())
        if default_heads:
            hl = [1.0] * T
        else:
            hw = torch.as_tensor(hw, dtype=torch.float64).reshape(-1).cpu()
            hl = hw.tolist()
            if hw.shape[0] != T or not all(map(math.isfinite, hl)):
                raise NonFiniteError(f"method '{name}' returned head weights {hl}; nothing was written")
        low = {p.dtype for p in shared + heads} & {torch.float16, torch.bfloat16}
        if low:
            _check_range(w, low, "weights", name)
            _check_range(hw, low, "head weights", name)
        # apply_decision, parameter level from the (T, P) matrix: Σ_t w_t g_t as one product, a fresh flat vector
        # (never a view of the reused workspace) whose per-parameter views become the .grads
        flat = combine_matrix(w, J)
        shared_g = split_flat(flat, shared)
        head_g = _unit_rows(rows, own, len(heads)) if default_heads and fresh else None
        if head_g is None:  # shared heads, another head rule: the general path's combination (copies)
            if head_rows is None:
                head_rows = [[None] * len(heads) for _ in range(T)]
                for t in range(T):
                    for i, r in zip(own[t], rows[t]):
                        head_rows[t][i] = r
            head_g = _combine_heads(head_rows, hl, len(heads), own)
        problem = ""
        if not all_finite([flat, *[g for g in head_g if g is not None]]):
            problem = f"non-finite combined gradient from '{name}'; nothing was written into .grad"
        else:
            _accumulate([*shared, *heads], [*shared_g, *head_g])  # one call: no two .grad share memory
    except BaseException:
        method.restore(snap)
        raise
    if problem:
        method.restore(snap)
        return record, problem
    record.weights = w
    record.head_weights = hw
    record.method_values.update(values)
    return record, ""
