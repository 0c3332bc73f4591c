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

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from . import pool
from ._autograd import MapHooksHeld, vjp
from .feature_step import _write_rows, decide_and_write, gramian_problem, lean_heads_pass, lean_start
from .gradients import (
    _dense,
    _write_row,
    host_finite,
    loss_problem,
    sparse_again,
    unreached_by_all,
)
from .gramian import combine_matrix, gramian_from_matrix, jacobian_workspace, split_flat
from .graph import refuse_reentrant_checkpoint
from .protocols import GramianWeighting
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
    start = lean_start(losses, task_names, features, method, "param")
    if start is None:
        return None
    names, T, outs, gos, raw, record = start.names, start.T, start.outs, start.gos, start.raw, start.record
    J = jacobian_workspace(T, shared)  # the reused (T, P) matrix the rows are written into
    if J is None:
        return None
    if not host_finite(raw):
        return record, loss_problem(names, raw)
    # the last task in ONE backward (its head, S_T at the map, on through the encoder): the same numbers as its
    # head backward then its encoder VJP from S_T (the same nodes on the same values), one call fewer — with the
    # heads found from the graph, and unless the map has backward hooks (``Z.register_hook``, ``Z.retain_grad()``):
    # the general path's encoder VJP from S_T runs them once more (on its root)
    hooked = bool(features._backward_hooks or features.retains_grad)
    one_call = task_params is None and not hooked
    k = T - 1 if one_call else T  # the tasks that take two calls: a head backward, then an encoder VJP
    # the record's (T, *Z) saliencies, in a reused block (engine/pool.py) written as the tasks go: each task's head
    # backward, then at once its encoder VJP g_t = J_Zᵀ S_t into row t of the workspace (gradients._encoder_rows,
    # loop mode; the encoder's graph freed by the last), then S_t into the block (one copy: ≈ 5 µs against a
    # millisecond VJP) — so one map is alive beside it, not all T and then their stack
    S = pool.block(T, features.shape, features.dtype, features.device)
    misses: list[list[Tensor]] = [[] for _ in range(T)]  # per task, the parameters its VJP did not reach
    sparse: dict[int, list[Tensor]] = {}  # parameters with sparse gradients (nn.Embedding(sparse=True)): their indices

    def encoder_row(t: int, s: Tensor) -> None:
        if features._backward_hooks:  # hooks on the map already shaped S_t: not run again on this VJP's root
            with MapHooksHeld([features]):
                gz = vjp([features], shared, grad_outputs=[s], retain_graph=retain_graph or t < T - 1)
        else:
            gz = vjp([features], shared, grad_outputs=[s], retain_graph=retain_graph or t < T - 1)
        _write_row(J, t, _dense(gz, shared, sparse), shared, misses[t])

    heads, own, sal, rows, head_rows, fresh = lean_heads_pass(start, features, shared, task_params, retain_graph,
                                                              k, into=None if hooked else S,
                                                              each=None if hooked else encoder_row, group=1)
    if hooked:  # hooks on the map see the general path's order of backwards (``Z.grad`` sums in that order), each
        # encoder VJP from the map autograd returned (its strides, not the block's: the VJP's products round by
        # them; an in-place hook changes it), then the record's copies
        for t in range(k):
            encoder_row(t, sal[t])
        _write_rows(S, 0, sal)
    if one_call:
        n = len(shared)
        gs = vjp(outs[T - 1], [features, *shared, *[heads[i] for i in own[T - 1]]], gos[T - 1],
                 retain_graph=retain_graph)
        rows.append(gs[n + 1:])
        if gs[0] is not None:
            S[T - 1].copy_(gs[0])
            _write_row(J, T - 1, _dense(gs[1:n + 1], shared, sparse), shared, misses[T - 1])
        else:  # the last loss does not reach the map: the general path's VJP of zeros, which also frees the
            # encoder's graph (as loss.backward() would) and gives its numbers (0 · inf = NaN included)
            zero = torch.zeros_like(features)
            S[T - 1].zero_()
            with MapHooksHeld([features]):  # (no hook runs on a zero S_T: the general path's encoder VJP)
                gz = vjp([features], shared, grad_outputs=[zero], retain_graph=retain_graph)
            _write_row(J, T - 1, _dense(gz, shared, sparse), shared, misses[T - 1])
        del gs
    unreached = unreached_by_all(misses, shared)
    if unreached:  # no loss reaches them, unless a reentrant checkpoint hides them from autograd.grad
        refuse_reentrant_checkpoint([features])
    record.saliencies = S
    G = gramian_from_matrix(J)
    G, problem = gramian_problem(names, G, raw, "param", [J])  # diag(G) = ‖g_t‖²: finite iff every per-task gradient is
    if problem:
        return record, problem
    record.gramian = G

    # ---- decide and apply, as one transaction (mtl_backward's general path) ------------------------
    def from_the_matrix(w: Tensor) -> tuple[list[Tensor | None], list[Tensor]]:
        # apply_decision, parameter level from the (T, P) matrix: Σ_t w_t g_t as one product, a fresh flat vector
        # (never a view of the reused workspace) whose per-parameter views become the .grads
        flat = combine_matrix(w, J)
        out: list[Tensor | None] = list(split_flat(flat, shared))
        for i in unreached:  # no loss reaches it: .grad left as it was (None stays None), as after loss.backward()
            out[i] = None
        sparse_again(out, shared, sparse)
        return out, [flat]

    return decide_and_write(method, G, raw, record, shared, heads, rows, own, head_rows, fresh, from_the_matrix,
                            start.loss_list)
