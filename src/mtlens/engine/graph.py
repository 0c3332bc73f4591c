"""Autograd-graph helpers: find the leaf tensors a set of outputs depends on."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigurationError

# The node autograd puts at each leaf that requires grad (it holds the leaf as ``.variable``).
_ACCUMULATE_GRAD: type = torch._C._functions.AccumulateGrad  # type: ignore[attr-defined]


def find_leaves(roots: Sequence[Tensor], stop_at: Iterable[Tensor] = ()) -> list[Tensor]:
    """Leaf tensors requiring grad reached from ``roots``'s graphs, not going past ``stop_at``.

    Order is deterministic: the first-reached order of a depth-first walk (each node's inputs in
    ``next_functions`` order, the roots in turn). Used to find the task-specific parameters (the
    heads) as the leaves between the losses and the features, and, at loss level, every leaf the
    objective's backward writes a gradient to.

    An iterative walk costing ≈ 0.25 µs a node (warm): one read of ``next_functions`` per node (an
    iterator over it stands for the node on the walk's stack), a leaf recognised by its node's type
    and recorded when its edge is met (never pushed).
    """
    seen: set = {t.grad_fn for t in stop_at if t.grad_fn is not None}  # a stop node is never entered
    seen_leaves: set[int] = {id(t) for t in stop_at if t.grad_fn is None}
    mark, leaves, acc = seen.add, [], _ACCUMULATE_GRAD
    for r in roots:
        fn = r.grad_fn
        if fn is None or fn in seen:
            continue
        mark(fn)
        stack = [iter(fn.next_functions)]
        push, pop = stack.append, stack.pop
        while stack:
            for n, _ in stack[-1]:
                if n is None or n in seen:
                    continue
                mark(n)
                if type(n) is acc:
                    var = n.variable  # type: ignore[attr-defined]
                    if var is not None and id(var) not in seen_leaves:
                        seen_leaves.add(id(var))
                        leaves.append(var)
                else:
                    push(iter(n.next_functions))  # a new tuple at every read: read once
                    break
            else:
                pop()
    return leaves


def objective_leaves(root: Tensor) -> list[Tensor]:
    """Every leaf tensor requiring grad that ``root``'s backward reaches, each once: the set
    :func:`find_leaves` ``([root])`` returns, in another (deterministic) order — :func:`objective_leaves_direct`'s
    list.

    The loss-level step's walk (docs/performance.md, "EW against a plain loop"): every node is read
    once and a leaf is recorded when its edge is met (by its ``id``: a leaf reached by several edges
    is recorded once), with no stack of iterators — ≈ 0.15 µs a node warm, about half of
    :func:`find_leaves`; inside a training loop ≈ 45–65 µs for the 32–103 nodes of the benchmark's
    graphs (≈ 35 µs of it a fixed cost of cold code after the forward).
    """
    return objective_leaves_direct(root)[0]


_CUSTOM_FUNCTION: type = torch.autograd.function.BackwardCFunction


def objective_leaves_direct(root: Tensor) -> tuple[list[Tensor], bool, bool]:
    """:func:`objective_leaves` ``(root)``, whether ``root``'s own ``backward()`` may write those leaves'
    ``.grad`` before the step's finiteness verdict with nothing else seeing a value that the verdict could refuse:
    every leaf's ``.grad`` is ``None`` (a refused step resets it to ``None``, exactly the state before) and has no
    post-accumulate-grad hook (it would run before the verdict, docs/reliability.md §4), and no node is a custom
    ``autograd.Function`` (one may call ``backward()`` itself — ``torch.utils.checkpoint(use_reentrant=True)`` —
    and write leaves this walk cannot see) — and whether the leaves' gradients are autograd's own tensors (no custom
    ``autograd.Function``, no tensor hook on a leaf: either may hand autograd a tensor of the caller's, which
    :func:`~mtlens.engine.gradients.all_finite`'s fused check must not store into). The same walk, in the same
    order (docs/performance.md, "EW against a plain loop")."""
    fn = root.grad_fn
    if fn is None:
        return [], False, False
    leaves: list[Tensor] = []
    seen: set = {fn}
    seen_leaves: set[int] = set()
    mark, acc, custom = seen.add, _ACCUMULATE_GRAD, _CUSTOM_FUNCTION
    owned = not isinstance(fn, custom)
    direct = owned
    stack = [fn]
    pop, push = stack.pop, stack.append
    while stack:
        for n, _ in pop().next_functions:
            if type(n) is acc:  # a leaf: recorded, never pushed
                var = n.variable  # type: ignore[union-attr]
                if var is not None and id(var) not in seen_leaves:
                    seen_leaves.add(id(var))
                    leaves.append(var)
                    if owned and var._backward_hooks:
                        owned = False
                    if direct and (var.grad is not None or var._post_accumulate_grad_hooks):
                        direct = False
            elif n is not None and n not in seen:
                mark(n)
                push(n)
                if (owned or direct) and isinstance(n, custom):
                    owned = direct = False
    return leaves, direct, owned


def refuse_reentrant_checkpoint(roots: Sequence[Tensor]) -> None:
    """Raise :class:`ConfigurationError` if ``roots``'s graph holds a node of
    ``torch.utils.checkpoint(..., use_reentrant=True)``. Called only where a shared parameter got no gradient from the
    engine's ``torch.autograd.grad`` (a rare path): such a node's backward calls ``backward()`` itself on the block
    it recomputes, so the block's parameters are not edges of the graph — ``torch.autograd.grad`` with respect to
    them returns ``None`` without running the node (PyTorch raises its own error only when the node runs), where
    ``loss.backward()`` writes their gradients. Before this check a gradient method stepped with the whole encoder
    inside such a checkpoint (its input requiring grad, as ``enable_input_require_grads()`` does) trained the heads
    only, silently."""
    from torch.utils.checkpoint import CheckpointFunction as ckpt  # the rare path only: no import cost per step

    seen: set = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if getattr(n, "_forward_cls", None) is ckpt:
            raise ConfigurationError(
                "the encoder runs torch.utils.checkpoint(..., use_reentrant=True): its backward calls backward() "
                "itself and writes the parameters inside the checkpoint, which torch.autograd.grad (how the engine "
                "differentiates) cannot reach, so they would get no gradient (PyTorch: 'When use_reentrant=True, "
                "torch.utils.checkpoint is incompatible with .grad()'). Pass use_reentrant=False, which matches "
                "loss.backward()."
            )
        stack.extend(m for m, _ in n.next_functions if m is not None and m not in seen)


def backward_order(roots: Sequence[Tensor]) -> list[Tensor]:
    """The leaves whose ``AccumulateGrad`` node ``loss.backward()`` runs — for ``loss`` any sum of ``roots`` built
    after them (``sum(losses)``, ``Σ_t w_t L_t``) — in the order it runs them, which is the order of their
    post-accumulate-grad hooks.

    A replay of autograd's CPU engine (``torch/csrc/autograd/engine.cpp``) on the graph's structure, which outlives
    a freed graph: each node's dependencies are its incoming edges; a node is pushed on the ready queue when the
    last of them is done, each node's outputs in ``next_functions`` order; the queue is a ``std::priority_queue``
    (libstdc++'s binary heap, replayed step for step, so that equal priorities come out in the engine's order)
    ordered by ``sequence_nr``, the newest node first, ``AccumulateGrad`` above every other node (``UINT64_MAX``).
    The sum's own nodes, newer than the whole forward, run first, so each root's node enters the queue when no
    node of the forward has run. Exact for a graph on one device (autograd runs each device's nodes on that
    device's thread, from its own queue: a graph over several devices interleaves them). Used only when some
    parameter has post-accumulate-grad hooks (:func:`~mtlens.engine.apply._accumulate`).
    """
    fns = [r.grad_fn for r in roots if r.grad_fn is not None]
    deps: dict = {}
    seen = set(fns)
    stack = list(fns)
    while stack:
        for n, _ in stack.pop().next_functions:
            if n is not None:
                deps[n] = deps.get(n, 0) + 1
                if n not in seen:
                    seen.add(n)
                    stack.append(n)
    heap: list = []  # (sequence_nr, node), a libstdc++ max-heap on sequence_nr

    def sift_up(hole: int, top: int, item: tuple) -> None:  # std::__push_heap
        parent = (hole - 1) // 2
        while hole > top and heap[parent][0] < item[0]:
            heap[hole] = heap[parent]
            hole = parent
            parent = (hole - 1) // 2
        heap[hole] = item

    def push(n: object) -> None:
        heap.append(None)
        sift_up(len(heap) - 1, 0, (n._sequence_nr(), n))  # type: ignore[attr-defined]

    def pop() -> Any:  # std::pop_heap (std::__adjust_heap), then pop_back
        top = heap[0]
        last = heap.pop()
        size = len(heap)
        if size:
            hole = child = 0
            while child < (size - 1) // 2:
                child = 2 * (child + 1)
                if heap[child][0] < heap[child - 1][0]:
                    child -= 1
                heap[hole] = heap[child]
                hole = child
            if size % 2 == 0 and child == (size - 2) // 2:
                child = 2 * (child + 1)
                heap[hole] = heap[child - 1]
                hole = child - 1
            sift_up(hole, 0, last)
        return top[1]

    for fn in fns:  # the sum's nodes have run: each root's node is ready once no other node feeds it
        if deps.get(fn, 0) == 0:
            deps[fn] = -1  # pushed (a root listed twice, or one root's node inside another's graph: once)
            push(fn)
    order: list[Tensor] = []
    acc = _ACCUMULATE_GRAD
    while heap:
        fn = pop()
        if type(fn) is acc:
            var = fn.variable  # type: ignore[attr-defined]
            if var is not None:
                order.append(var)
            continue
        for n, _ in fn.next_functions:
            if n is not None:
                left = deps[n] - 1
                deps[n] = left
                if left == 0:
                    push(n)
    return order
