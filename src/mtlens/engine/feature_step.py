"""The common feature-level step, without the general machinery: one shared map, a Gramian weighting.

:func:`mtlens.engine.mtl_backward` routes here a step that is ``level="feature"`` with ``features=Z``
(one tensor), a :class:`~mtlens.engine.protocols.GramianWeighting` whose decision is the default one
(``weights(G, losses)`` and its head rule: MGDA, Aligned-MTL, UPGrad, ...), the losses as a mapping or
a sequence, and none of: a regulariser, a loss transform, a GradScaler, a process group, a
:class:`~mtlens.engine.backward.DecisionCache`, ``compute_gramian``, ``keep_saliencies``, a method that
needs the saliencies' graph or gradient norms. It is the step of :func:`compute_task_gradients` →
``method.decide`` → :func:`check_decision` → :func:`apply_decision` → ``step_record`` with only the work
that step does: the same calls for the same numbers (heads found from the graph, T head backwards,
the pooled ``(T, *Z)`` stack, its Gramian, ``method.weights``, one contraction, one encoder VJP), the
same checks with the same messages in the same order, the same record and the same transaction (the
method's state restored and nothing written unless every written gradient is finite), without
building the :class:`~mtlens.engine.gradients.TaskGradients` and :class:`~mtlens.engine.decision.Decision`
objects that no one reads afterwards, and without the tensor conversions that leave a float64 vector
as it is. Proved against the general path in ``tests/engine/test_feature_step.py`` (bitwise ``.grad``,
record, method state; the errors and the skip policy). Why: docs/performance.md, "The feature path's
fixed cost".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import BackwardCFunction

from ..errors import MTLensError, NonFiniteError
from . import pool
from ._autograd import MapHooksHeld, vjp
from .apply import _accumulate, _check_range, _combine_heads, weights_error
from .gradients import (
    Features,
    _find_heads,
    _heads_pass,
    _retain_flags,
    _walk_heads,
    _warn_zero,
    all_finite,
    check_only_route,
    host_finite,
    loss_problem,
    normalise_features,
    normalise_losses,
    recheck_gramian,
)
from .gramian import gramian_from_blocks
from .graph import refuse_reentrant_checkpoint
from .protocols import GramianWeighting, MethodState
from .record import StepRecord
from .stacked import StackSplit, lean_entry_points

_DEFAULT_HEAD_WEIGHTS = GramianWeighting.head_weights


def feature_step(losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor, task_names: Sequence[str] | None,
                 features: Tensor, shared: list[Tensor], task_params: Iterable[Tensor] | None,
                 method: GramianWeighting, retain_graph: bool) -> tuple[StepRecord, str] | None:
    """One feature-level step of ``method`` (a Gramian weighting with the default ``decide``) on one shared map.

    ``shared``: the encoder's parameters that require grad (not empty: the caller checked). Raises what the
    general path raises (:class:`ConfigurationError`, :class:`~mtlens.errors.ShapeError`,
    :class:`NonFiniteError`) with the same messages, the method's state left as before the step.

    A stacked loss vector (``torch.stack(losses)``) takes each task's backward from the stack's input t, as the
    general path does (:func:`~mtlens.engine.stacked.lean_entry_points`); a vector without that exact split
    returns ``None`` before anything is computed, and the caller runs the general path.

    Returns ``(record, problem)``: ``problem`` is ``""`` when the gradients were written, else why nothing was
    (a non-finite loss or gradient: the caller applies the non-finite policy to ``record``)."""
    start = lean_start(losses, task_names, features, method, "feature")
    if start is None:
        return None
    names, T, raw, record = start.names, start.T, start.raw, start.record
    if not host_finite(raw):
        return record, loss_problem(names, raw)
    # the (T, *Z) block of the saliencies, reused where no one holds the last one (engine/pool.py); beyond GROUP
    # tasks (or off the CPU) written while the heads pass runs, so that at most GROUP per-task maps are alive besides
    # it — not all T, then the stack (at T ≤ GROUP on the CPU one stack is cheaper, and saves as much)
    into = pool.block(T, features.shape, features.dtype, features.device) if (
        T > GROUP or features.device.type != "cpu") else None
    heads, own, sal, rows, head_rows, fresh = lean_heads_pass(start, features, shared, task_params, retain_graph, T,
                                                              into=into)
    S = into if into is not None else pool.stack(sal)
    sal.clear()  # the per-task maps are in S now: freed here, not held through the encoder VJP
    G = gramian_from_blocks([S])
    record.saliencies = S
    G, problem = gramian_problem(names, G, raw, "feature", [S])  # diag(G) = ‖S_t‖²: finite iff every saliency is
    if problem:
        return record, problem
    record.gramian = G

    # ---- decide and apply, as one transaction (mtl_backward's general path) ------------------------
    def through_encoder(w: Tensor) -> tuple[list[Tensor | None], list[Tensor]]:
        # apply_decision, feature level: Σ_t w_t S_t as one contraction, pushed through the encoder once
        dz = torch.tensordot(w.to(S.dtype), S, dims=1)
        if features._backward_hooks:  # hooks on the map already shaped S_t: not run again on this VJP's root
            with MapHooksHeld([features]):
                gz = vjp([features], shared, grad_outputs=[dz], retain_graph=retain_graph)
        else:
            gz = vjp([features], shared, grad_outputs=[dz], retain_graph=retain_graph)
        # a parameter the map does not depend on keeps its .grad (None stays None), as after loss.backward()
        got = [g for g in gz if g is not None]
        if len(got) < len(gz):  # unless a reentrant checkpoint hides it from autograd.grad
            refuse_reentrant_checkpoint([features])
        return list(gz), got

    return decide_and_write(method, G, raw, record, shared, heads, rows, own, head_rows, fresh, through_encoder,
                            start.loss_list)


class LeanStart(NamedTuple):
    """What both lean steps (this module's, :mod:`~mtlens.engine.param_step`'s) have before their backwards."""

    names: list[str]
    loss_list: list[Tensor]
    feats: Features  # the normalised features (one map here)
    T: int
    split: StackSplit | None
    outs: list[Any]  # where each task's backward starts: its loss, or a stacked vector's entry point
    gos: list[Any]  # its grad_output (None: autograd's unit gradient)
    raw: Tensor  # (T,) the losses, detached
    record: StepRecord
    method_params: Sequence[Tensor]


def lean_start(losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor, task_names: Sequence[str] | None,
               features: Tensor, method: GramianWeighting, level: str) -> LeanStart | None:
    """The general path's first checks (``normalise_losses``, ``normalise_features``: the same errors and
    messages), the method's own learnable tensors (never heads), each task's entry point and the record; ``None``
    for a loss vector without an exact split (the general path handles it; nothing was computed)."""
    if type(method).parameters is MethodState.parameters and not method._modules:  # its own tensors only
        method_params = [p for p in method._parameters.values() if p is not None and p.requires_grad]
    else:
        method_params = [p for p in method.parameters() if p.requires_grad]
    names, loss_list = normalise_losses(losses, task_names)
    feats = normalise_features(features, names)
    split, outs, gos = _entries(losses, loss_list)
    if not outs:
        return None
    raw = torch.stack([v.detach() for v in loss_list])
    record = StepRecord(task_names=names, losses=raw, objective_losses=raw, level=level)
    return LeanStart(names, loss_list, feats, len(loss_list), split, outs, gos, raw, record, method_params)


GROUP = 8
"""CPU: the saliency maps :func:`lean_heads_pass` writes into the caller's block per ``torch.stack`` (one op per
``GROUP`` tasks instead of one copy each — a copy's dispatch costs ≈ 5 µs inside a step — with at most ``GROUP`` maps
alive besides the block). Other devices write each map as it comes (a copy is a kernel launch there; memory is
what counts)."""


def lean_heads_pass(start: LeanStart, features: Tensor, shared: list[Tensor], task_params: Iterable[Tensor] | None,
                    retain_graph: bool, n: int, into: Tensor | None = None,
                    each: Callable[[int, Tensor], None] | None = None, group: int = GROUP
                    ) -> tuple[list[Tensor], list[list[int]], list[Tensor], list[Sequence[Tensor | None]],
                               list[list[Tensor | None]] | None, bool]:
    """The heads pass of ``compute_task_gradients`` (``gradients._heads_pass``) for one map: per task ``S_t`` and
    the gradients of its own heads, each task's head graph freed on its last use. Heads found from the graph (one
    walk: the heads, each task's part of the graph, its own heads) run the first ``n`` tasks only (the caller
    runs the others); given heads (``task_params``) run ``_heads_pass`` for every task.

    ``into``: a ``(T, *Z)`` block to write ``S_t`` into (row t, the values of ``torch.stack``) as the pass goes, so
    that the T maps are never all alive beside it: ``group`` maps per ``torch.stack`` on the CPU, one copy each on
    other devices (:data:`GROUP`); ``sal`` is then empty. ``each(t, S_t)``: called
    with each task's map as soon as it is known (heads found from the graph: right after the task's head backward;
    given heads: after the pass), before it goes into ``into`` (the parameter-level step's encoder VJP).

    Returns ``(heads, own, sal, rows, head_rows, fresh)``: ``own[t]`` the indices of task t's heads, ``rows[t][k]``
    its gradient of ``heads[own[t][k]]``, ``head_rows`` the general path's full rows (``None`` when walked: built
    if the general combination runs), ``fresh`` whether every head gradient is a tensor of its own
    (:func:`_fresh_rows`: the given-heads path always copies, as the general path does)."""
    names, loss_list, feats, T, split, outs, gos = (start.names, start.loss_list, start.feats, start.T, start.split,
                                                   start.outs, start.gos)
    if task_params is None:  # the heads from the graph, with each task's part of it, in one walk
        heads, sets, own = _walk_heads(loss_list, feats.maps, shared, start.method_params,
                                       None if split is None else [node for node, _ in split.branches])
        check_only_route(names, feats.maps, sets, loss_list)
        retain = [True] * T if retain_graph else _retain_flags(sets)
        sal: list[Tensor] = []
        rows: list[Sequence[Tensor | None]] = []
        group = (group if into.device.type == "cpu" else 1) if into is not None else 0
        first = 0  # the first task whose map is not in ``into`` yet
        for t in range(n):
            gs = vjp(outs[t], [features, *[heads[i] for i in own[t]]], gos[t], retain_graph=retain[t])
            sal.append(gs[0] if gs[0] is not None else torch.zeros_like(features))
            rows.append(gs[1:])
            if each is not None:
                each(t, sal[-1])
            if into is not None and (len(sal) == group or t == n - 1):
                del gs
                _write_rows(into, first, sal)
                first = t + 1
        return heads, own, sal, rows, None, _fresh_rows(sets, heads)
    heads = _find_heads(loss_list, feats, shared, task_params, start.method_params)
    sal_maps, head_rows, own = _heads_pass(names, loss_list, feats, heads, False, retain_graph, split,
                                           None if split is None else list(zip(outs, gos)))
    rows = [[head_rows[t][i] for i in own[t]] for t in range(T)]
    sal = [s[0] for s in sal_maps]
    if each is not None:  # given heads: n == T (the one-call task needs heads found from the graph)
        for t in range(n):
            each(t, sal[t])
    if into is not None:
        _write_rows(into, 0, sal)
    return heads, own, sal, rows, head_rows, False


def _write_rows(into: Tensor, first: int, maps: list[Tensor]) -> None:
    """Rows ``first …`` of the block ``into`` ← ``maps`` (``torch.stack``'s values; one copy for one map), then the
    list emptied: the maps are freed unless someone else holds them."""
    if len(maps) == 1:
        into[first].copy_(maps[0])
    else:
        torch.stack(maps, out=into[first:first + len(maps)])
    maps.clear()


def gramian_problem(names: Sequence[str], G: Tensor, raw: Tensor, level: str, blocks: Sequence[Tensor]
                    ) -> tuple[Tensor, str]:
    """``(G, why nothing may be written)``: ``""`` when every per-task gradient is finite (after its warning for a
    zero gradient), else the general path's message. ``diag(G)`` is finite iff every per-task gradient is, unless
    the float32 chunk products of finite but huge gradients overflowed: only then (a non-finite diagonal, the rare
    path) are ``blocks`` (the step's ``(T, …)`` gradients) checked, and where they are finite ``G`` is recomputed
    with float64 products (:func:`recheck_gramian`) and returned in its place."""
    diag = G.diagonal().tolist()  # T floats, read once
    if not all(math.isfinite(v) for v in diag):
        G, problem = recheck_gramian(names, diag, blocks, raw, level)
        if problem:
            return G, problem
        diag = G.diagonal().tolist()
    if 0.0 in diag:
        _warn_zero(names, diag, level)
    return G, ""


def decide_and_write(method: GramianWeighting, G: Tensor, raw: Tensor, record: StepRecord, shared: list[Tensor],
                     heads: list[Tensor], rows: Sequence[Sequence[Tensor | None]], own: Sequence[Sequence[int]],
                     head_rows: list[list[Tensor | None]] | None, fresh: bool,
                     shared_update: Callable[[Tensor], tuple[list[Tensor | None], list[Tensor]]],
                     losses: Sequence[Tensor] | None = None) -> tuple[StepRecord, str]:
    """The transaction of a lean Gramian step (this module's and :mod:`~mtlens.engine.param_step`'s), as
    ``mtl_backward``'s general path runs it: ``method.snapshot()``; ``GramianWeighting.decide`` (``weights(G,
    losses)`` as float64, the head rule) with its errors wrapped as :class:`NonFiniteError`; ``check_decision``'s
    checks and messages (length, finiteness, the range of half-precision parameters); the shared parameters'
    gradients from ``shared_update(w)`` (returns them and the tensors whose finiteness stands for theirs) and the
    heads' (``rows[t][k]``: task t's gradient of ``heads[own[t][k]]``; :func:`_unit_rows` without a copy where
    ``fresh`` allows it, else ``_combine_heads``); one finiteness check, then every ``.grad`` written; the state
    restored on any failure; ``losses``: the step's task losses (the post-accumulate hooks' order,
    :func:`~mtlens.engine.apply._accumulate`). Returns ``(record, problem)`` as the steps do."""
    name = method.name
    T = len(rows)
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
        shared_g, checked = shared_update(w)
        head_g = _unit_rows(rows, own, len(heads)) if default_heads and fresh else None
        if head_g is None:  # shared heads, another head rule: the general path's combination (copies)
            if head_rows is None:
                head_rows = [[None] * len(heads) for _ in range(T)]
                for t in range(T):
                    for i, r in zip(own[t], rows[t]):
                        head_rows[t][i] = r
            head_g = _combine_heads(head_rows, hl, len(heads), own)
        problem = ""
        if not all_finite([*checked, *[g for g in head_g if g is not None]]):
            problem = f"non-finite combined gradient from '{name}'; nothing was written into .grad"
        else:
            _accumulate([*shared, *heads], [*shared_g, *head_g], 1.0, losses)  # one call: no two .grad share memory
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


def _entries(losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor, loss_list: list[Tensor]
             ) -> tuple[StackSplit | None, list[Any], list[Any]]:
    """Where each task's backward starts, with its ``grad_output``: the loss itself (``None``: autograd's unit
    gradient), or for a stacked loss vector the stack's input t (:func:`~mtlens.engine.stacked.lean_entry_points`,
    with the split). Empty lists when a loss vector has no exact split (the general path handles it)."""
    if not isinstance(losses, Tensor):
        return None, loss_list, [None] * len(loss_list)
    found = lean_entry_points(losses, loss_list)
    if found is None:
        return None, [], []
    split, entries = found
    return split, [e for e, _ in entries], [g for _, g in entries]


def _fresh_rows(sets: Sequence[set[Any]], heads: Sequence[Tensor]) -> bool:
    """Whether every head gradient autograd returns for these losses is a tensor of its own (computed, or passed
    on from the unit gradient it started with), which :func:`_unit_rows` may make a ``.grad`` without a copy: not
    when a custom ``torch.autograd.Function`` (its backward may return a tensor it keeps) is in a task's part of
    the graph (``sets``: the nodes each loss reaches before the map), or a head parameter has a backward hook
    (which may return one). Such a tensor as a ``.grad`` would take the next step's accumulation into it."""
    if any(p._backward_hooks for p in heads):
        return False
    kinds: set[type] = set()  # the node types (a few), then a subclass test each: ≈ 8 µs for 120 nodes
    for nodes in sets:
        kinds.update(map(type, nodes))
    return not any(issubclass(k, BackwardCFunction) for k in kinds)


def _unit_rows(rows: Sequence[Sequence[Tensor | None]], own: Sequence[Sequence[int]], n: int
               ) -> list[Tensor | None] | None:
    """Per head parameter ``Σ_t 1 · ∇_head L_t`` under the unit head rule (``rows[t][k]``: task t's gradient of
    head ``own[t][k]``) when no head parameter is reached by two tasks: its one task's row as autograd returned
    it (``× 1.0`` is exact; ``None`` where no task reaches it). No copy is needed here: unlike a caller of
    :func:`~mtlens.engine.apply.apply_decision`, no one holds the rows after this step. ``None`` (use
    :func:`~mtlens.engine.apply._combine_heads`, which copies) when a parameter is shared by tasks, or a row is
    sparse or not contiguous (an expanded gradient would make a ``.grad`` whose elements share memory)."""
    out: list[Tensor | None] = [None] * n
    for idx, row in zip(own, rows):
        for i, r in zip(idx, row):
            if r is None:
                continue
            if out[i] is not None or r.layout != torch.strided or not r.is_contiguous():
                return None
            out[i] = r
    return out

