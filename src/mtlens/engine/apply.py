"""Step 3 of the engine: write a :class:`Decision` into ``.grad`` — all of it, or nothing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigurationError, NonFiniteError
from ._autograd import MapHooksHeld
from .decision import Decision
from .distributed import Dist
from .gradients import TaskGradients, _grads, all_finite, host_finite, sparse_again, zeros_if_none
from .gramian import combine_blocks, combine_matrix, combine_rows, split_flat
from .graph import backward_order, find_leaves, refuse_reentrant_checkpoint


def _accumulate(params: Sequence[Tensor], grads: Sequence[Tensor | None], scale: float = 1.0,
                roots: Roots = None, _taken: set[int] | None = None, _ordered: bool = False) -> None:
    """``.grad += g`` for each pair, as ``backward()`` accumulates: a parameter without ``.grad`` takes ``g``
    itself (× ``scale``, in its dtype). Every ``.grad`` gets memory of its own: autograd returns ONE tensor for
    several inputs when a node passes its gradient on unchanged (both parameters of ``a + b``), and two
    ``.grad`` sharing memory would each take the other's later in-place accumulation; a gradient whose data
    pointer this call already gave to another ``.grad`` is cloned (``backward()`` copies it too), and one whose
    strides are not its parameter's (an expanded gradient) is copied into the parameter's layout, as autograd's
    ``AccumulateGrad`` does.

    A parameter's post-accumulate-grad hooks (``p.register_post_accumulate_grad_hook``: optimizer-in-backward,
    gradient offloading, DDP-like bucketing) run right after its ``.grad`` is written, in registration order, as
    autograd's ``AccumulateGrad`` runs them, and in the order ``loss.backward()`` runs them: from the first
    parameter with hooks on, the parameters are written in the order autograd's engine would run their
    ``AccumulateGrad`` nodes for a sum of ``roots`` (the step's losses or objective: a tensor, a sequence, or a
    callable returning one, called only then; :func:`~mtlens.engine.graph.backward_order`) — the heads before the
    encoder, the encoder from its last layer back — each one's hooks right after its write; parameters outside
    that graph (a method's extra gradients) last, as given. Without ``roots``, in the order given. The parameters
    before the first hooked one (none of them hooked) are written first, as given: a hook that reads ANOTHER
    parameter's ``.grad`` may see it written where ``backward()`` would write it later. Every caller writes only
    after the step's verdict, so a failing step runs none (docs/reliability.md §4). A hook that returns a value
    raises :class:`ConfigurationError`, as ``backward()`` refuses it ("should return None")."""
    taken: set[int] = set() if _taken is None else _taken
    for p, g in zip(params, grads):
        if g is None:
            continue
        hooks = p._post_accumulate_grad_hooks
        if hooks and not _ordered:  # from here on in backward()'s order (the rare path: hooks are set)
            k = next(i for i, q in enumerate(params) if q is p)
            rest_p, rest_g = in_backward_order(params[k:], grads[k:], roots)
            _accumulate(rest_p, rest_g, scale, None, taken, True)
            return
        if g.requires_grad:
            g = g.detach()
        if scale != 1.0:
            g = g * scale
        cur = p.grad
        if cur is None:
            if g.layout == torch.strided and g.stride() != p.stride() and (
                    not p.is_contiguous() or not g.is_contiguous() or 0 in g.stride()):
                # autograd's layout contract (AccumulateGrad): a .grad has its parameter's strides. An expanded
                # gradient (a sum's unit gradient passed on unchanged by an addition: ``(z + b).sum()``) would make
                # a .grad whose elements share memory, which the next accumulation and clip_grad_norm_ refuse; a
                # size-1 dimension of stride 0 is copied too, as AccumulateGrad does (``b.sum()`` for a one-element
                # ``b``: "contiguous", stride (0,)). Strides compared first: the common case reads no more
                g = torch.empty_like(p).copy_(g)
            elif g.dtype != p.dtype:
                g = g.to(p.dtype)
            ptr = _memory_of(g)
            if ptr in taken:
                g = g.clone()
            else:
                taken.add(ptr)
            p.grad = g
        else:
            cur.add_(g if g.dtype == cur.dtype else g.to(cur.dtype))
        if hooks:
            run_post_accumulate_hooks(p, hooks)


Roots = Tensor | Sequence[Tensor] | Callable[[], Sequence[Tensor]] | None
"""The graph a step's ``.grad`` writes stand for (:func:`_accumulate`'s ``roots``)."""


def in_backward_order(params: Sequence[Tensor], grads: Sequence[Tensor | None],
                      roots: Roots) -> tuple[list[Tensor], list[Tensor | None]]:
    """``params`` and their ``grads`` sorted in the order ``backward()`` of a sum of ``roots`` runs the parameters'
    ``AccumulateGrad`` nodes (:func:`~mtlens.engine.graph.backward_order`); parameters outside that graph last, in
    the order given; without ``roots`` unchanged."""
    if callable(roots):
        roots = roots()
    if roots is None:
        return list(params), list(grads)
    rank = {id(v): i for i, v in enumerate(backward_order([roots] if isinstance(roots, Tensor) else roots))}
    n = len(rank)
    order = sorted(range(len(params)), key=lambda i: rank.get(id(params[i]), n + i))
    return [params[i] for i in order], [grads[i] for i in order]


def write_overflow_signal(grads: TaskGradients) -> None:
    """GradScaler's overflow signal after a step that overflowed (nothing else written): ``inf`` in the ``.grad``
    of every parameter the step would have written — at loss level every parameter the losses reach, at parameter
    and feature level the shared parameters and the heads the losses reach — each one's post-accumulate-grad hooks
    right after, in the order ``scaler.scale(loss).backward()`` runs them (:func:`in_backward_order`), as that
    backward writes its non-finite gradients and runs every hook. ``scaler.step`` then skips the optimiser step
    (``scaler.unscale_`` finds the ``inf``) and ``scaler.update`` backs the scale off. An existing ``.grad`` is filled
    in place (an accumulation of ``inf``); a missing one is created. Without a graph to read (no losses kept), the
    first shared parameter (or head) alone carries the signal. Under data parallelism: every parameter some rank's
    step would have written, on every rank (:func:`_written_anywhere`), as the one-process step on the global batch
    and as DDP's all-reduce of the scaled backward's ``inf`` write it."""
    roots = step_roots(grads) or list(grads._attached or [])
    order = backward_order(roots)
    if grads.level != "loss":
        mine = {id(p) for p in grads.shared_params} | {id(p) for p in grads.task_params}
        order = [p for p in order if id(p) in mine]
    if grads._dist is not None:
        order = _written_anywhere(grads, order, grads._dist)
    if not order:
        order = list(grads.shared_params[:1] or grads.task_params[:1])
    for p in order:
        if p.grad is None:
            p.grad = torch.full_like(p, float("inf"))
        else:
            p.grad.fill_(float("inf"))
        hooks = p._post_accumulate_grad_hooks
        if hooks:
            run_post_accumulate_hooks(p, hooks)


def _written_anywhere(grads: TaskGradients, order: list[Tensor], dist: Dist) -> list[Tensor]:
    """``order`` (the parameters this rank's graph reaches) followed by those only another rank's reaches: the
    candidates are the same list on every rank (:func:`agreed_leaves` at loss level; the shared parameters and the
    heads otherwise), one flag each all-reduced."""
    heads = list(grads.task_params)
    if grads.level == "loss":
        fixed = list(grads.shared_params) + (heads if grads._heads_given else [])
        known = {id(p) for p in fixed}
        cands = fixed + [p for p in order if id(p) not in known]
    else:
        cands = list(grads.shared_params) + heads
    if grads.level == "loss" or not grads._heads_given:
        dist.check_same_params(cands, "parameters")
    here = {id(p) for p in order}
    anywhere = dist.reached_anywhere([id(p) in here for p in cands])
    return order + [p for p, a in zip(cands, anywhere) if a and id(p) not in here]


def run_post_accumulate_hooks(p: Tensor, hooks: Any) -> None:
    """``p``'s post-accumulate-grad hooks, in registration order, as ``AccumulateGrad`` runs them; a hook that
    returns a value raises :class:`ConfigurationError` (``backward()``: "should return None")."""
    for hook in tuple(hooks.values()):
        if hook(p) is not None:  # autograd's own refusal: such a hook cannot replace the gradient
            raise ConfigurationError(
                f"a post-accumulate-grad hook on a parameter of shape {tuple(p.shape)} returned a value; "
                "Tensor post accumulate grad hooks should return None (change p.grad in place, or use "
                "p.register_hook to replace a gradient)")


def agreed_leaves(grads: TaskGradients, total: Tensor) -> list[Tensor]:
    """Data parallelism, loss level: the parameters whose gradients the ranks reduce, the same list on every rank
    (:meth:`~mtlens.engine.distributed.Dist.check_same_params`). The shared parameters and the heads given
    (``shared_params``, ``task_params``) come first, whether this rank's share reaches them or not; then the other
    leaves of the objective (found from this rank's graph: a method's own parameters, heads not given)."""
    fixed = list(grads.shared_params) + (list(grads.task_params) if grads._heads_given else [])
    known = {id(p) for p in fixed}
    params = fixed + [p for p in find_leaves([total]) if id(p) not in known]
    assert grads._dist is not None
    grads._dist.check_same_params(params, "parameters")
    return params


def _memory_of(g: Tensor) -> int:
    """Where ``g``'s values live: its data pointer; a sparse gradient's values' (``nn.Embedding(sparse=True)``:
    a sparse tensor has no storage of its own, and ``data_ptr()`` raises)."""
    if g.layout == torch.strided:
        return g.data_ptr()
    return (g._values() if g.layout == torch.sparse_coo else g.values()).data_ptr()


def _check_range(w: Tensor, dtypes: set[torch.dtype], what: str, name: str) -> None:
    """Finite weights beyond a low-precision dtype's range would overflow while combining."""
    for dt in dtypes:
        if dt in (torch.float16, torch.bfloat16):
            big = float(torch.finfo(dt).max)
            if bool((w.abs() > big).any()):
                raise NonFiniteError(
                    f"method '{name}' returned {what} {w.tolist()}, beyond the range of the {dt} gradients "
                    f"(max {big:g}); nothing was written into .grad. Keep the model's parameters in float32 "
                    "(autocast computes in float16 but keeps float32 parameters) or bound the method's weights."
                )


def weights_error(name: str, weights: Tensor, T: int, diagonal: list[float] | None = None) -> NonFiniteError:
    """The error for weights of the wrong length or not finite (the engine's one message for it)."""
    return NonFiniteError(f"method '{name}' returned weights {weights.tolist()} for {T} tasks"
                          + (f" (Gramian diagonal {diagonal})" if diagonal is not None else "")
                          + "; nothing was written into .grad")


def backward_problem(name: str, losses: Tensor) -> str:
    """Why nothing was written when the gradient of a loss-level objective is not finite (the engine's one
    message for it: the objective's backward, its rows, the lean loss step)."""
    return f"non-finite gradient in the backward of '{name}' (losses {losses.tolist()}); nothing was written into .grad"


def check_decision(decision: Decision, grads: TaskGradients, name: str) -> Decision:
    """Validate a method's decision (shapes, finiteness); raise :class:`NonFiniteError` naming the method."""
    T = grads.T
    if not isinstance(decision, Decision):
        raise ConfigurationError(f"method '{name}'.decide() returned {type(decision).__name__}, not a Decision")
    if decision.weights is not None:
        w = torch.as_tensor(decision.weights, dtype=torch.float64).reshape(-1).cpu()
        if w.shape[0] != T or not host_finite(w):
            diag = grads.gramian().diagonal().tolist() if grads.level != "loss" and grads._gramian is not None else None
            raise weights_error(name, w, T, diag)
        decision.weights = w
    if decision.head_weights is not None:
        hw = torch.as_tensor(decision.head_weights, dtype=torch.float64).reshape(-1).cpu()
        if hw.shape[0] != T or not host_finite(hw):
            raise NonFiniteError(f"method '{name}' returned head weights {hw.tolist()}; nothing was written")
        decision.head_weights = hw
    if decision.combined is not None and not all_finite(decision.combined):
        raise NonFiniteError(f"method '{name}' produced a non-finite update; nothing was written into .grad")
    if decision.extra_grads:
        for p, g in decision.extra_grads:
            if not isinstance(p, Tensor) or not isinstance(g, Tensor) or tuple(g.shape) != tuple(p.shape):
                raise ConfigurationError(
                    f"method '{name}' returned an extra gradient of shape "
                    f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__} for a parameter of shape "
                    f"{tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__}; extra_grads holds "
                    "(parameter, gradient) pairs of equal shapes"
                )
        if not all_finite([g for _, g in decision.extra_grads]):
            raise NonFiniteError(f"method '{name}' computed a non-finite extra gradient; nothing was written "
                                 "into .grad")
    if grads.level != "loss" and decision.combined is None and decision.weights is None:
        raise ConfigurationError(f"method '{name}' decided neither weights nor combined blocks")
    range_weights = decision.weights is not None and decision.combined is None and decision.objective is None
    if range_weights or decision.head_weights is not None:
        dtypes = {p.dtype for p in grads.shared_params + grads.task_params}
        if range_weights:
            assert decision.weights is not None  # range_weights says so
            _check_range(decision.weights, dtypes, "weights", name)
        if decision.head_weights is not None:
            _check_range(decision.head_weights, dtypes, "head weights", name)
    return decision


def apply_decision(grads: TaskGradients, decision: Decision, *, retain_graph: bool = False,
                   name: str = "method") -> str:
    """Step 3: write the gradients of ``decision`` into ``.grad`` (accumulating like ``backward``).

    Shared parameters: ``Σ_t w_t g_t`` (or the combined blocks; at feature level the combined
    saliency pushed through the encoder once per micro-batch); heads: ``Σ_t h_t ∇_head L_t``
    with the decision's head weights; regulariser gradients added; loss level: one backward of
    the objective (+ penalties). Under data parallelism every locally computed part is averaged
    over ranks with one flat all-reduce. Nothing is written unless every gradient is finite.

    Returns:
        ``""`` when written, else the reason nothing was written (a non-finite gradient).
    """
    dist = grads._dist
    scale = grads._scale
    if grads.level == "loss":
        if decision.objective is None:
            raise ConfigurationError(f"loss level needs an objective from '{name}'")
        if grads._objective_from_rows and not decision.extra_grads and grads._reg_total is None:
            return _weighted_sum_from_rows(grads, decision, name)
        total = decision.objective
        if grads._reg_total is not None:
            total = total + grads._reg_total
        if scale != 1.0:
            total = total * scale
        params = find_leaves([total]) if dist is None else agreed_leaves(grads, total)
        gs: list[Tensor | None] = list(_grads(total, params, retain_graph=retain_graph))
        if dist is not None:
            gs = dist.mean_list(gs, like=params)
        params, gs = _with_extras(params, gs, decision.extra_grads, scale)
        if not all_finite(gs):
            return backward_problem(name, grads.losses)
        _accumulate(params, gs, 1.0, total)
        return ""

    T = grads.T
    shared, heads = grads.shared_params, grads.task_params
    reg_shared: list[Tensor] | None = None
    reg_heads: list[Tensor | None] | None = None
    reg_dz: list[list[Tensor | None]] | None = None
    if grads._reg_total is not None:
        reg = grads._reg_total * scale if scale != 1.0 else grads._reg_total
        if grads._reg_kind == "param":
            rg = _grads(reg, list(shared) + heads, retain_graph=True)
            reg_shared = [g.detach() / scale if scale != 1.0 else g.detach()
                          for g in zeros_if_none(rg[: len(shared)], shared)]
            reg_heads = [None if g is None else g.detach() / scale for g in rg[len(shared):]]
        else:
            maps = [z for part in grads._parts for z in part["features"].maps]
            rg = _grads(reg, maps + heads, retain_graph=True)
            flat = [None if g is None else g.detach() / scale for g in rg[: len(maps)]]
            reg_dz, i = [], 0
            for part in grads._parts:
                n = len(part["features"].maps)
                reg_dz.append(flat[i:i + n])
                i += n
            reg_heads = [None if g is None else g.detach() / scale for g in rg[len(maps):]]

    # ---- shared parameters -----------------------------------------------------------------
    flat_shared: Tensor | None = None  # parameter level from the (T, P) matrix: the combined gradient, flat
    local_shared: list[Tensor | None] | None = None  # computed on this rank's samples: averaged below
    global_shared: list[Tensor] | None = None  # already the global gradient
    if grads.level == "feature":
        w = decision.weights
        # the first micro-batch's encoder gradients are fresh autograd outputs: later ones are added into them
        # (no zero-filled accumulators: on CPU a fresh zeroed block per parameter page-faults every step)
        local: list[Tensor | None] = [None] * len(shared)
        for k, part in enumerate(grads._parts):
            pf = part["features"]
            S = part["saliencies"]
            if decision.combined is not None:
                if len(grads._parts) > 1 or pf.multi_input:
                    raise ConfigurationError(
                        f"'{name}' combines the Jacobian itself; at feature level it needs one shared representation "
                        "and one batch (not multi-input, not accumulated micro-batches)"
                    )
                dz = list(decision.combined)
            elif w is None:  # apply_decision may be called without check_decision (README's accumulation)
                raise ConfigurationError(f"method '{name}' decided neither weights nor combined blocks")
            elif pf.multi_input:
                dz = [w[t].to(S[t][0].dtype) * S[t][0] for t in range(T)]
            elif len(grads._parts) == 1 and grads._blocks is not None and len(grads._blocks) == len(pf.maps):
                # the (T, *Z) stacks of these saliencies (built once for the Gramian): one contraction per map
                dz = [torch.tensordot(w.to(b.dtype), b, dims=1) for b in grads._blocks]
            else:
                wl = w.tolist()
                dz = []
                for m in range(len(pf.maps)):
                    acc = S[0][m] * wl[0]
                    for t in range(1, T):
                        acc.add_(S[t][m], alpha=wl[t])
                    dz.append(acc)
            if reg_dz is not None:
                dz = [a if b is None else a + b for a, b in zip(dz, reg_dz[k])]
            if len(grads._parts) > 1:
                dz = [d / len(grads._parts) for d in dz]
            dz_s = [d * scale for d in dz] if scale != 1.0 else dz
            pairs = list(zip(pf.maps, dz_s))
            with MapHooksHeld(pf.maps):  # hooks on the maps already shaped S_t: not run again on this VJP's root
                gz = _grads([z for z, _ in pairs], shared, grad_outputs=[g for _, g in pairs],
                            retain_graph=retain_graph)
            for j, g in enumerate(gz):
                if g is not None:
                    if g.requires_grad:  # autograd's outputs carry no graph here: no detach alias needed
                        g = g.detach()
                    if scale != 1.0:
                        g = g / scale
                    cur = local[j]
                    if cur is None:
                        local[j] = g
                    else:
                        cur.add_(g)
        # a parameter no micro-batch reaches keeps its .grad, as after loss.backward() (zeros would be a gradient:
        # AdamW decays such a parameter, momentum moves it); under data parallelism: one no rank's share reaches
        # (Dist.mean_list agrees on it)
        local_shared = local
    else:
        if decision.combined is not None:
            global_shared = list(decision.combined)
        elif decision.weights is None:  # apply_decision may be called without check_decision
            raise ConfigurationError(f"method '{name}' decided neither weights nor combined blocks")
        elif grads._flat is not None:
            # Σ_t w_t g_t as one product over the (T, P) matrix: a fresh flat vector (never a view of the
            # reused workspace), whose per-parameter views become the .grads
            flat_shared = combine_matrix(decision.weights, grads._flat)
            global_shared = split_flat(flat_shared, shared)
        elif grads._rows is not None:
            # the rows are fresh autograd outputs used nowhere else: combine them in place
            global_shared = combine_rows(decision.weights, grads._rows, inplace=True)
            grads._rows = None
        else:
            global_shared = combine_blocks(decision.weights, grads.jacobian_blocks())
        if reg_dz is not None:
            maps = grads._parts[0]["features"].maps
            reg_pairs = [(z, g) for z, g in zip(maps, reg_dz[0]) if g is not None]
            if reg_pairs:
                with MapHooksHeld(maps):
                    gr = _grads([z for z, _ in reg_pairs], shared, grad_outputs=[g for _, g in reg_pairs],
                                retain_graph=retain_graph)
                local_shared = list(zeros_if_none(gr, shared))
        if reg_shared is not None:
            local_shared = (list(reg_shared) if local_shared is None
                            else [a + b for a, b in zip(local_shared, reg_shared)])  # type: ignore[operator]

    # ---- heads -----------------------------------------------------------------------------
    hw = decision.head_weights.tolist() if decision.head_weights is not None else [1.0] * T
    head_g = _combine_heads(grads.head_rows, hw, len(heads), grads._head_index)
    if reg_heads is not None:
        head_g = [g if rh is None else (rh if g is None else g + rh) for g, rh in zip(head_g, reg_heads)]

    if dist is not None:
        n = len(shared)
        if not grads._heads_given:  # heads found from this rank's graph: the same list on every rank?
            dist.check_same_params(heads, "task-specific parameters (heads)")
        parts: list[Tensor | None] = [*(local_shared if local_shared is not None else [None] * n), *head_g]
        reduced: list[Tensor | None]
        if local_shared is not None:  # one flag per entry: a parameter one rank's share reaches is reduced
            reduced = dist.mean_list(parts, like=[*shared, *heads])
        else:  # only the heads are local: the shared entries are None on every rank
            reduced = [*parts[:n], *dist.mean_list(head_g, like=heads)]
        local_shared = reduced[:n] if local_shared is not None else None
        head_g = reduced[n:]
    shared_g: list[Tensor | None]
    if global_shared is not None and local_shared is not None:
        shared_g = [a if b is None else a + b for a, b in zip(global_shared, local_shared)]
    else:
        chosen = global_shared if global_shared is not None else local_shared
        assert chosen is not None  # the parameter level sets global_shared, the feature level local_shared
        shared_g = list(chosen)
    for i in grads._unreached:  # parameter level: no loss reaches it (zeros in the Jacobian); .grad left as it was
        shared_g[i] = None
    if shared and any(g is None for g in shared_g):  # unless a reentrant checkpoint hides it from autograd.grad
        refuse_reentrant_checkpoint(step_roots(grads))
    sparse_again(shared_g, shared, grads._sparse)  # parameter level: sparse per-task gradients, a sparse .grad
    others: list[Tensor] = []
    other_g: list[Tensor | None] = []
    if decision.extra_grads:  # global, unscaled gradients the method computed itself (adds_gradients)
        n_s, n_h = len(shared), len(heads)
        params, gs = _with_extras(list(shared) + list(heads), list(shared_g) + head_g, decision.extra_grads, 1.0)
        shared_g, head_g = gs[:n_s], gs[n_s:n_s + n_h]
        others, other_g = params[n_s + n_h:], gs[n_s + n_h:]
    if flat_shared is not None and local_shared is None and not decision.extra_grads:
        checked: list[Tensor] = [flat_shared]  # shared_g are its views: one read of the flat vector
    else:
        checked = [g for g in shared_g if g is not None]
    if not all_finite(checked + [g for g in head_g + other_g if g is not None]):
        return f"non-finite combined gradient from '{name}'; nothing was written into .grad"
    # one call: no two .grad share memory, and post-accumulate hooks run in backward()'s order across the groups
    _accumulate([*shared, *heads, *others], [*shared_g, *head_g, *other_g], scale, lambda: step_roots(grads))
    return ""


def step_roots(grads: TaskGradients) -> list[Tensor]:
    """The tensors a step's gradient is the gradient of: every micro-batch's task losses and the regularisers'
    total (the graph :func:`_accumulate` orders the post-accumulate hooks by)."""
    roots = [L for part in grads._parts for L in part.get("loss_list", ())]
    if grads._reg_total is not None:
        roots.append(grads._reg_total)
    return roots


def _weighted_sum_from_rows(grads: TaskGradients, decision: Decision, name: str) -> str:
    """Loss level, objective ``Σ_t w_t L_t`` whose per-task rows step 1 computed (``compute_gramian="param"``,
    :func:`~mtlens.engine.gradients.compute_task_gradients`'s ``weighted_sum``): its gradient written from them —
    ``Σ_t w_t g_t`` on the shared parameters, ``Σ_t w_t ∇_head L_t`` on the heads — with the weights in the
    dtype the objective multiplied the losses by; the same check and the same message as the objective's backward
    (docs/performance.md, "Monitoring")."""
    w = decision.weights
    if w is None:
        raise ConfigurationError(f"loss level needs weights from '{name}' to write Σ_t w_t g_t")
    w = w.to(grads.losses.dtype)
    shared, heads = grads.shared_params, grads.task_params
    checked: list[Tensor]
    if grads._flat is not None:
        flat = combine_matrix(w, grads._flat)
        shared_g: list[Tensor] = split_flat(flat, shared)
        checked = [flat]
    else:
        shared_g = combine_blocks(w, grads.jacobian_blocks())
        checked = list(shared_g)
    head_g = _combine_heads(grads.head_rows, w.tolist(), len(heads), grads._head_index)
    if not all_finite(checked + [g for g in head_g if g is not None]):
        return backward_problem(name, grads.losses)
    out: list[Tensor | None] = list(shared_g)
    for i in grads._unreached:  # no loss reaches it: the backward would not touch its .grad (None stays None)
        out[i] = None
    if grads._unreached:  # unless a reentrant checkpoint hides it from autograd.grad
        refuse_reentrant_checkpoint(step_roots(grads))
    _accumulate([*shared, *heads], [*out, *head_g], 1.0, grads._attached)
    return ""


def _combine_heads(head_rows: Sequence[Sequence[Tensor | None]], hw: Sequence[float], n: int,
                   index: Sequence[Sequence[int]] | None = None) -> list[Tensor | None]:
    """Per head parameter ``Σ_t h_t ∇L_t`` in task order (``None`` where no task reaches it).

    Each parameter's first contribution is ``r · h`` — a copy even at ``h = 1``: ``.grad`` must not alias
    ``head_rows`` (a caller of :func:`apply_decision` may keep the TaskGradients, and the next accumulation
    into ``.grad`` would write into it) — all of them in one multi-tensor ``_foreach_mul`` (2T single-tensor
    ops at T = 11 cost more than their data); later contributions are added in place, as before.
    ``index[t]``: the only entries of row t that can be set (the heads pass's own heads), so that the
    rows are not scanned whole (T × the number of head parameters: 3 200 at T = 40)."""
    head_g: list[Tensor | None] = [None] * n
    firsts: list[tuple[int, Tensor, float]] = []
    later: list[tuple[int, Tensor, float]] = []
    for t, row in enumerate(head_rows):
        for j in range(len(row)) if index is None else index[t]:
            r = row[j]
            if r is not None:
                (later if head_g[j] is not None else firsts).append((j, r, hw[t]))
                head_g[j] = r  # marks j as reached; replaced by the copy below
    if firsts:
        dense = [(j, r, h) for j, r, h in firsts if r.layout == torch.strided]
        for (j, _, _), g in zip(dense, torch._foreach_mul([r for _, r, _ in dense], [h for _, _, h in dense])
                                if dense else []):
            head_g[j] = g
        for j, r, h in firsts:
            if r.layout != torch.strided:  # sparse rows (nn.Embedding(sparse=True)): one op each
                head_g[j] = r * h
    for j, r, h in later:
        cur = head_g[j]
        assert cur is not None
        head_g[j] = cur.add_(r, alpha=h)
    return head_g


def _with_extras(params: Sequence[Tensor], gs: Sequence[Tensor | None], extras: Sequence[tuple[Tensor, Tensor]] | None,
                 scale: float) -> tuple[list[Tensor], list[Tensor | None]]:
    """Add a decision's ``extra_grads`` (× ``scale``) to the gradients ``gs`` of ``params``; parameters the
    step did not reach are appended with their extra gradient alone."""
    params, gs = list(params), list(gs)
    if not extras:
        return params, gs
    where = {id(p): i for i, p in enumerate(params)}
    for p, g in extras:
        g = g.detach()
        if scale != 1.0:
            g = g * scale
        i = where.get(id(p))
        if i is None:
            where[id(p)] = len(params)
            params.append(p)
            gs.append(g)
        else:
            cur = gs[i]
            gs[i] = g if cur is None else cur + g.to(cur.dtype)
    return params, gs
