"""The multi-task backward engine: per-task losses in, ``.grad`` on every parameter out.

Usable in any training loop::

    record = mtl_backward(losses, features=z, shared_params=encoder.parameters(),
                          method=mtlens.methods.create("upgrad"), level="param")
    optimizer.step()

Levels
------
* ``"param"``: per-task gradients w.r.t. the shared parameters, kept as per-parameter blocks
  with a leading task dimension (never flattened into one long vector). When ``features`` is
  given the heads are differentiated once per task (giving the saliencies ``S_t = ∂L_t/∂Z``)
  and each ``g_t`` is the encoder's vector-Jacobian product with ``S_t``.
* ``"feature"`` (the fast gradient surrogate): the method combines the saliencies; exactly one
  encoder backward pushes the combined ``∂L/∂Z`` into the shared parameters.
* Loss-level methods: one backward of the weighted sum; no per-task gradients unless a
  regulariser or diagnostic asks for them.

Task-specific parameters (the heads, found from the graph between the losses and ``features``
unless given) receive the gradient of the weighted task losses ``Σ_t w_t L_t`` at every level.

Nothing is written into ``.grad`` until every gradient of the step is known to be finite.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigurationError, NonFiniteError, ShapeError
from .gramian import combine_blocks, combine_rows, gramian_from_blocks, gramian_from_rows, stack_rows
from .graph import find_leaves
from .protocols import GramianWeighting, JacobianAggregator, LossWeighting, Method, Regularizer, check_loss_transform
from .record import StepRecord

LOG_EPS = 1e-8
JACOBIAN_MODES = ("loop", "batched")
NONFINITE_POLICIES = ("raise", "skip")
LOSS_TRANSFORMS = ("none", "log")


@dataclass
class _Counters:
    skipped_steps: int = 0


counters = _Counters()
"""Process-wide count of steps skipped under ``nonfinite="skip"`` (also in each record)."""


def transform_losses(losses: Tensor, transform: str | None) -> Tensor:
    """Apply a loss transform: ``"none"`` or ``"log"`` (``log(L_t + 1e-8)``, DB-MTL / Rep-MTL)."""
    if transform in (None, "none"):
        return losses
    if transform == "log":
        return torch.log(losses + LOG_EPS)
    raise ConfigurationError(f"unknown loss_transform {transform!r}; choose one of {LOSS_TRANSFORMS}")


def _normalise_losses(losses, task_names) -> tuple[list[str], list[Tensor]]:
    if isinstance(losses, Mapping):
        names = list(losses.keys())
        values = list(losses.values())
        if task_names is not None and list(task_names) != names:
            raise ConfigurationError(f"task_names {list(task_names)} do not match the losses' keys {names}")
    elif isinstance(losses, Tensor):
        values = list(losses.reshape(-1).unbind(0))
        names = list(task_names) if task_names is not None else [f"task{i}" for i in range(len(values))]
    else:
        values = list(losses)
        names = list(task_names) if task_names is not None else [f"task{i}" for i in range(len(values))]
    if len(values) == 0:
        raise ConfigurationError("mtl_backward got no losses")
    if len(names) != len(values):
        raise ConfigurationError(f"{len(names)} task names for {len(values)} losses")
    for n, v in zip(names, values):
        if not isinstance(v, Tensor) or v.numel() != 1:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ShapeError(f"loss of task '{n}' must be a scalar tensor, got {shape}; reduce it with .mean()")
        if not v.requires_grad:
            raise ConfigurationError(
                f"loss of task '{n}' does not require grad: it was computed without a graph "
                "(torch.no_grad?) or from detached tensors"
            )
    return names, [v.reshape(()) for v in values]


def _describe_nonfinite(names: Sequence[str], values: Tensor) -> str:
    bad = [f"'{n}'={float(v)}" for n, v in zip(names, values) if not torch.isfinite(v)]
    return ", ".join(bad)


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    ts = [t for t in tensors if t is not None]
    if not ts:
        return True
    # A sum propagates NaN and ±inf and is the cheapest full read (an inf-norm is ~15x slower on
    # CPU); it can only false-alarm when a finite tensor sums past the dtype's range.
    sums = torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in ts])
    return bool(torch.isfinite(sums).all())


def _grads(outputs, inputs, grad_outputs=None, retain_graph=True, create_graph=False, batched=False):
    return torch.autograd.grad(
        outputs,
        inputs,
        grad_outputs=grad_outputs,
        retain_graph=retain_graph or create_graph,
        create_graph=create_graph,
        allow_unused=True,
        is_grads_batched=batched,
    )


def _zeros_if_none(gs, like):
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(gs, like)]


def _accumulate(params: Sequence[Tensor], grads: Sequence[Tensor | None], scale: float = 1.0) -> None:
    for p, g in zip(params, grads):
        if g is None:
            continue
        g = g.detach()
        if scale != 1.0:
            g = g * scale
        if p.grad is None:
            p.grad = g.to(p.dtype)
        else:
            p.grad.add_(g.to(p.grad.dtype))


def mtl_backward(
    losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
    *,
    method: Method,
    features: Tensor | Sequence[Tensor] | None = None,
    shared_params: Iterable[Tensor] | None = None,
    level: str | None = None,
    regularizers: Sequence[Regularizer] = (),
    task_params: Iterable[Tensor] | None = None,
    task_names: Sequence[str] | None = None,
    loss_transform: str | None = None,
    jacobian: str = "loop",
    keep_saliencies: bool = False,
    compute_gramian: bool = False,
    nonfinite: str = "raise",
    grad_scaler=None,
    grad_norm_params: Sequence[Tensor] | None = None,
    retain_graph: bool = False,
) -> StepRecord:
    """Turn per-task losses into gradients on every parameter, through ``method``.

    Args:
        losses: per-task scalar losses, a ``{task: loss}`` mapping (preferred) or a sequence.
            A single stacked vector also works but is slower at the gradient levels: each entry's
            backward then runs through every task's head.
        method: a method object from :func:`mtlens.methods.create`.
        features: the shared representation ``Z`` the heads consumed (attached to the
            encoder's graph), or one tensor per task for multi-input benchmarks. Required at
            feature level and by saliency regularisers; at parameter level it lets the engine
            differentiate the heads once per task and the encoder by vector-Jacobian products.
            It must be the only route from the shared parameters to the losses.
        shared_params: the encoder's parameters. Required by gradient-level methods.
        level: ``"param"`` or ``"feature"`` for gradient methods (default ``"param"``). A
            loss-level method takes ``None`` (or ``"param"``, which only sets where
            ``compute_gramian`` measures); ``"feature"`` with one is an error.
        regularizers: e.g. ``[create("rep_mtl")]``; their gradients are added after aggregation.
        task_params: task-specific parameters; found from the graph when omitted.
        loss_transform: ``"none"`` or ``"log"``; methods that prescribe one (DB-MTL) set it.
        jacobian: ``"loop"`` (one VJP per task; safe with BatchNorm and RNNs) or
            ``"batched"`` (one vmapped VJP, ``is_grads_batched``). See docs/benchmarks.md.
        keep_saliencies: store ``S_t`` in the record (free whenever the heads pass runs).
        compute_gramian: with a loss-level method, also compute per-task gradients and the
            Gramian for diagnostics (at ``level``; from the saliencies when features are given
            and no level is set).
        nonfinite: ``"raise"`` (default) raises :class:`NonFiniteError`; ``"skip"`` warns,
            counts, writes nothing and returns a record with ``skipped=True``.
        grad_scaler: a ``torch.amp.GradScaler`` for float16 autocast: pass *unscaled* losses;
            the engine scales them, decides on unscaled gradients, writes scaled gradients
            (so ``scaler.step(optimizer); scaler.update()`` work as usual) and on overflow
            writes nothing and backs the scale off.
        grad_norm_params: parameters on which loss-level methods that need per-task gradient
            norms (GradNorm) measure them; default: the last shared weight with ndim ≥ 2.
        retain_graph: keep the graph after the final backward.

    Returns:
        a :class:`StepRecord`.
    """
    names, loss_list = _normalise_losses(losses, task_names)
    T = len(loss_list)
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

    # ---- level and method family ------------------------------------------------------------
    is_loss_method = isinstance(method, LossWeighting)
    if is_loss_method:
        if level == "feature":
            raise ConfigurationError(
                f"'{method.name}' is a loss-level method: it weights losses, not gradients, so "
                "level='feature' has no meaning for it. Drop level (one backward of the weighted "
                "sum), or choose a gradient method for the feature level (e.g. mgda, aligned_mtl)."
            )
        if level not in (None, "param"):
            raise ConfigurationError(f"level={level!r}; choose 'param' or 'feature'")
    elif isinstance(method, (GramianWeighting, JacobianAggregator)):
        level = level or "param"
        if level not in ("param", "feature"):
            raise ConfigurationError(f"level={level!r}; choose 'param' or 'feature'")
        if level not in method.levels:
            raise ConfigurationError(
                f"'{method.name}' supports level(s) {method.levels}, not '{level}'"
                + (" (it is defined on the representation)" if method.levels == ("feature",) else "")
            )
    else:
        raise ConfigurationError(f"'{method.name}' ({type(method).__name__}) is not a usable method family")

    multi_input = features is not None and not isinstance(features, Tensor)
    feats: list[Tensor] = [] if features is None else ([features] if not multi_input else list(features))
    if multi_input and len(feats) != T:
        raise ShapeError(f"multi-input features: got {len(feats)} tensors for {T} tasks (one per task)")
    for f in feats:
        if not isinstance(f, Tensor) or not f.requires_grad:
            raise ConfigurationError(
                "features must be the encoder output the heads consumed, attached to the graph "
                "(requires_grad=True); do not pass a detached copy"
            )
    for r in regularizers:
        if r.uses not in ("saliency", "param"):
            raise ConfigurationError(f"regulariser '{r.name}' uses {r.uses!r}; expected 'saliency' or 'param'")
    needs_saliency_reg = [r for r in regularizers if r.uses == "saliency"]
    level_regs = [r for r in regularizers if r.uses == "param"]
    if (level == "feature" or needs_saliency_reg or keep_saliencies) and not feats:
        what = "level='feature'" if level == "feature" else (
            f"regulariser '{needs_saliency_reg[0].name}'" if needs_saliency_reg else "keep_saliencies=True"
        )
        raise ConfigurationError(f"{what} needs features=Z (the shared representation the heads consumed)")
    shared = list(shared_params) if shared_params is not None else None
    if shared is not None:
        shared = [p for p in shared if p.requires_grad]
    if not is_loss_method and not shared:
        raise ConfigurationError(f"gradient method '{method.name}' needs shared_params (the encoder's parameters)")
    if level_regs and not shared:
        raise ConfigurationError(
            f"regulariser '{level_regs[0].name}' works on parameter-level gradients and needs shared_params"
        )

    # ---- loss transform -----------------------------------------------------------------
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

    raw = torch.stack(loss_list)
    raw_detached = raw.detach()
    if not bool(torch.isfinite(raw_detached).all()):
        msg = (
            f"non-finite task loss: {_describe_nonfinite(names, raw_detached)}. Nothing was written "
            "into .grad. Check the inputs/targets of that task, lower the learning rate, or pass "
            "nonfinite='skip' to skip such steps with a warning."
        )
        return _nonfinite(msg, nonfinite, names, raw_detached, level or "loss")
    if transform == "log" and bool((raw_detached < 0).any()):
        raise ConfigurationError(
            "loss_transform='log' needs non-negative losses; got "
            + ", ".join(f"'{n}'={float(v)}" for n, v in zip(names, raw_detached) if v < 0)
        )
    # Per-task objective losses are kept as separate tensors: differentiating one entry of a
    # stacked vector would run every task's head backward (with zeros) for each task.
    obj_items = [transform_losses(L, transform) for L in loss_list]
    obj = torch.stack(obj_items)
    scale = 1.0
    if grad_scaler is not None and grad_scaler.is_enabled():
        grad_scaler.scale(obj.detach())  # initialises the scaler's scale tensor
        scale = float(grad_scaler.get_scale())
    obj_scaled = [o * scale for o in obj_items] if scale != 1.0 else obj_items

    # ---- task-specific parameters --------------------------------------------------------
    shared_ids = {id(p) for p in shared} if shared else set()
    if task_params is not None:
        heads = [p for p in task_params if p.requires_grad and id(p) not in shared_ids]
    elif feats:
        heads = find_leaves(loss_list, stop_at=feats)
        leaked = [p for p in heads if id(p) in shared_ids]
        if leaked:
            raise ConfigurationError(
                f"{len(leaked)} shared parameter(s) reach the losses without passing through "
                "features: features must be the only route from the encoder to the losses"
            )
    else:
        heads = [p for p in find_leaves(loss_list) if id(p) not in shared_ids]
    method_params = [p for p in method.parameters() if p.requires_grad]
    mp_ids = {id(p) for p in method_params}
    heads = [p for p in heads if id(p) not in mp_ids]

    record = StepRecord(
        task_names=names, losses=raw_detached, objective_losses=obj.detach(), level=level or "loss"
    )

    if is_loss_method:
        return _loss_level_step(
            record, method, names, loss_list, raw, obj, obj_items, obj_scaled, scale, feats, shared, heads,
            method_params, regularizers, needs_saliency_reg, level_regs, level, transform,
            keep_saliencies, compute_gramian, nonfinite, grad_scaler, grad_norm_params, jacobian,
            retain_graph, multi_input,
        )
    return _gradient_level_step(
        record, method, names, loss_list, obj, obj_scaled, scale, feats, shared, heads, regularizers,
        needs_saliency_reg, level_regs, level, transform, nonfinite, grad_scaler, jacobian,
        retain_graph, multi_input,
    )


# --------------------------------------------------------------------------------------------
def _nonfinite(msg, policy, names, losses, level, grad_scaler=None, overflow=False) -> StepRecord:
    if overflow and grad_scaler is not None:
        grad_scaler.update(float(grad_scaler.get_scale()) * grad_scaler.get_backoff_factor())
        rec = StepRecord(task_names=list(names), losses=losses, objective_losses=losses, level=level)
        rec.skipped, rec.reason = True, "grad_scaler overflow"
        return rec
    if policy == "raise":
        raise NonFiniteError(msg)
    counters.skipped_steps += 1
    warnings.warn(f"mtlens: step skipped ({counters.skipped_steps} so far): {msg}", RuntimeWarning, stacklevel=3)
    rec = StepRecord(task_names=list(names), losses=losses, objective_losses=losses, level=level)
    rec.skipped, rec.reason = True, msg
    return rec


def _stack_saliencies(sal: list[Tensor], names: Sequence[str]) -> Tensor:
    shapes = {tuple(s.shape) for s in sal}
    if len(shapes) != 1:
        detail = ", ".join(f"'{n}': {tuple(s.shape)}" for n, s in zip(names, sal))
        raise ShapeError(
            "multi-input saliencies are paired positionally (sample b of every task's batch forms "
            f"location b), so every task's batch must have the same shape; got {detail}. Use equal "
            "per-task batch sizes (drop_last=True)."
        )
    return torch.stack(sal)


def _saliencies(loss_list, feats, multi_input, create_graph, retain=True) -> list[Tensor]:
    """S_t = ∂L_t/∂Z for each task (heads backward only)."""
    out = []
    for t, L in enumerate(loss_list):
        z = feats[t] if multi_input else feats[0]
        (s,) = _grads(L, [z], retain_graph=retain, create_graph=create_graph)
        out.append(s if s is not None else torch.zeros_like(z))
    return out


def _regularizer_terms(regs, blocks, obj_detached) -> tuple[Tensor | None, dict[str, float]]:
    total = None
    values: dict[str, float] = {}
    for r in regs:
        term, logged = r.loss(blocks, obj_detached)
        if not torch.isfinite(term.detach()):
            raise NonFiniteError(
                f"regulariser '{r.name}' returned a non-finite penalty ({float(term)}); nothing was "
                "written into .grad"
            )
        total = term if total is None else total + term
        values.update({f"{r.name}/{k}": float(v) for k, v in logged.items()})
        values[f"{r.name}/total"] = float(term.detach())
    return total, values


def _encoder_vjp(feats, shared, grad_outputs, create_graph=False, retain=True):
    """One encoder backward: ∂(Σ ⟨Z, dZ⟩)/∂θ_s."""
    pairs = [(z, g) for z, g in zip(feats, grad_outputs) if g is not None]
    gs = _grads([z for z, _ in pairs], shared, grad_outputs=[g for _, g in pairs],
                retain_graph=retain, create_graph=create_graph)
    return _zeros_if_none(gs, shared)


def _param_jacobian(loss_obj_list, feats, shared, multi_input, saliencies, jacobian, create_graph, as_rows=False):
    """Per-task shared-parameter gradients: blocks (T, *shape) per parameter, or (``as_rows``, loop
    mode only) per-task lists of per-parameter gradients, which spares the stacking copy."""
    T = len(loss_obj_list)
    if feats:
        if jacobian == "batched" and not multi_input and not create_graph:  # one vmapped VJP
            gs = _grads(feats[0], shared, grad_outputs=torch.stack(saliencies), batched=True)
            blocks = [g if g is not None else torch.zeros((T, *p.shape), dtype=p.dtype, device=p.device)
                      for g, p in zip(gs, shared)]
        else:
            rows = []
            for t in range(T):
                z = feats[t] if multi_input else feats[0]
                rows.append(_grads(z, shared, grad_outputs=saliencies[t], create_graph=create_graph))
            if as_rows:
                return [_zeros_if_none(r, shared) for r in rows]
            blocks = stack_rows(rows, shared)
        return blocks
    rows = [_grads(L, shared, create_graph=create_graph) for L in loss_obj_list]
    if as_rows:  # without features there is only the per-task loop
        return [_zeros_if_none(r, shared) for r in rows]
    return stack_rows(rows, shared)


def _heads_pass(loss_list, feats, heads, multi_input, create_graph):
    """One backward per task through its head: the saliency ``S_t`` and the head gradients."""
    if not feats:
        return None, _head_rows(loss_list, heads)
    sal, rows = [], []
    for t, L in enumerate(loss_list):
        z = feats[t] if multi_input else feats[0]
        gs = _grads(L, [z] + heads, create_graph=create_graph)
        sal.append(gs[0] if gs[0] is not None else torch.zeros_like(z))
        rows.append(list(gs[1:]))  # None where the task does not reach the parameter
    return sal, rows


def _head_rows(loss_obj_list, heads) -> list[list[Tensor]]:
    if not heads:
        return [[] for _ in loss_obj_list]
    return [list(_grads(L, heads)) for L in loss_obj_list]


def _raw_saliencies(sal_obj, raw, transform, scale):
    """Saliencies of the raw losses from those of the objective losses, keeping the graph.

    ``∂ log(L+ε)/∂Z = (∂L/∂Z)/(L+ε)``, so ``∂L/∂Z = ∂obj/∂Z · (L+ε)``: exact, no extra backward."""
    out = []
    for t, s in enumerate(sal_obj):
        if scale != 1.0:
            s = s / scale
        if transform == "log":
            s = s * (raw[t] + LOG_EPS)
        out.append(s)
    return out


def _loss_level_step(
    record, method, names, loss_list, raw, obj, obj_items, obj_scaled, scale, feats, shared, heads, method_params,
    regularizers, sal_regs, param_regs, level, transform, keep_saliencies, compute_gramian, nonfinite,
    grad_scaler, grad_norm_params, jacobian, retain_graph, multi_input,
):
    grad_norms = None
    if getattr(method, "needs_grad_norms", False):
        params = list(grad_norm_params) if grad_norm_params is not None else None
        if params is None:
            if not shared:
                raise ConfigurationError(f"'{method.name}' needs shared_params to measure per-task gradient norms")
            weights_2d = [p for p in shared if p.ndim >= 2]
            params = [weights_2d[-1] if weights_2d else shared[-1]]
        norms = []
        for L in obj_scaled:
            gs = _zeros_if_none(_grads(L, params), params)
            norms.append(torch.sqrt(sum((g.detach().double() ** 2).sum() for g in gs)) / scale)
        grad_norms = torch.stack(norms).to(raw.dtype)
        if not bool(torch.isfinite(grad_norms).all()):
            return _nonfinite(
                f"non-finite per-task gradient norms {grad_norms.tolist()} for '{method.name}'",
                nonfinite, names, record.losses, record.level, grad_scaler, overflow=scale != 1.0,
            )

    sal = None
    if sal_regs or keep_saliencies or (compute_gramian and feats and level is None):
        sal = _saliencies(loss_list, feats, multi_input, create_graph=bool(sal_regs))
        record.saliencies = _stack_saliencies([s.detach() for s in sal], names)
    pblocks = None
    if param_regs or (compute_gramian and (level == "param" or not feats)):
        if not shared:
            raise ConfigurationError("parameter-level per-task gradients need shared_params")
        obj_list = obj_items
        s_obj = _saliencies(obj_list, feats, multi_input, bool(param_regs)) if feats else None
        pblocks = _param_jacobian(obj_list, feats, shared, multi_input, s_obj, "loop" if param_regs else jacobian,
                                  bool(param_regs))
    if compute_gramian:
        if pblocks is not None:
            record.gramian = gramian_from_blocks([b.detach() for b in pblocks])
            record.level = "param"
        else:
            record.gramian = gramian_from_blocks([record.saliencies])
            record.level = "feature"

    objective, w = method.combine(obj, grad_norms=grad_norms)
    record.weights = w.detach().to(torch.float64)
    reg_total = None
    if sal_regs:
        reg_total, values = _regularizer_terms(sal_regs, [_stack_saliencies(sal, names)], obj.detach())
        record.regularizer_values.update(values)
    if param_regs:
        p_total, values = _regularizer_terms(param_regs, pblocks, obj.detach())
        record.regularizer_values.update(values)
        reg_total = p_total if reg_total is None else reg_total + p_total
    total = objective if reg_total is None else objective + reg_total
    if scale != 1.0:
        total = total * scale

    params = find_leaves([total])
    gs = _grads(total, params, retain_graph=retain_graph)
    if not _all_finite(gs):
        return _nonfinite(
            f"non-finite gradient in the backward of '{method.name}' (losses {record.losses.tolist()}); "
            "nothing was written into .grad",
            nonfinite, names, record.losses, record.level, grad_scaler, overflow=scale != 1.0,
        )
    _accumulate(params, gs)
    record.method_values.update(method.log_values())
    return record


def _gradient_level_step(
    record, method, names, raw, obj, obj_scaled, scale, feats, shared, heads, regularizers, sal_regs,
    param_regs, level, transform, nonfinite, grad_scaler, jacobian, retain_graph, multi_input,
):
    T = len(names)
    obj_list = obj_scaled
    create = bool(sal_regs) or bool(param_regs)
    # heads pass: saliencies of the objective losses; task-specific gradients
    sal, head_rows = _heads_pass(obj_list, feats, heads, multi_input, create)

    # Gramian weightings at parameter level in loop mode keep per-task rows (no stacking copy)
    use_rows = (level == "param" and isinstance(method, GramianWeighting) and not param_regs
                and (jacobian == "loop" or not feats or multi_input))
    if level == "feature":
        blocks = [_stack_saliencies(sal, names)]
    else:
        blocks = _param_jacobian(obj_list, feats, shared, multi_input, sal, "loop" if param_regs else jacobian,
                                 bool(param_regs), as_rows=use_rows)
    reg_total = None
    if sal_regs:
        sal_raw = _raw_saliencies(sal, raw, transform, scale)
        reg_total, values = _regularizer_terms(sal_regs, [_stack_saliencies(sal_raw, names)], obj.detach())
        record.regularizer_values.update(values)
    if param_regs:
        pblocks = blocks if level == "param" else _param_jacobian(obj_list, feats, shared, multi_input, sal, "loop",
                                                                   True)
        pblocks = [b / scale for b in pblocks] if scale != 1.0 else pblocks
        p_total, values = _regularizer_terms(param_regs, pblocks, obj.detach())
        record.regularizer_values.update(values)
        reg_total = p_total if reg_total is None else reg_total + p_total

    if use_rows:
        dblocks = [[g.detach() / scale if scale != 1.0 else g.detach() for g in row] for row in blocks]
    else:
        dblocks = [b.detach() / scale if scale != 1.0 else b.detach() for b in blocks]
    if scale != 1.0:
        head_rows = [[None if g is None else g / scale for g in row] for row in head_rows]
    if sal is not None and len({tuple(s.shape) for s in sal}) == 1:
        # the record holds ∂L_t/∂Z of the RAW losses (the loss transform and scaler undone exactly)
        record.saliencies = torch.stack(
            _raw_saliencies([s.detach() for s in sal], [r.detach() for r in raw], transform, scale))
    # diag(G) = Σ g_t² in float64 is finite iff every per-task gradient is: a free check
    G = gramian_from_rows(dblocks) if use_rows else gramian_from_blocks(dblocks)
    if not bool(torch.isfinite(G.diagonal()).all()):
        bad = [n for n, v in zip(names, G.diagonal().tolist()) if not math.isfinite(v)]
        return _nonfinite(
            f"non-finite gradient of task(s) {bad} at level '{level}' (losses {record.losses.tolist()}); "
            "nothing was written into .grad. A loss may be finite while its gradient overflows: lower the "
            "learning rate or check the inputs.",
            nonfinite, names, record.losses, level, grad_scaler, overflow=scale != 1.0,
        )
    record.gramian = G

    if isinstance(method, GramianWeighting):
        w = method.weights(G, obj.detach())
        w = torch.as_tensor(w, dtype=torch.float64, device=G.device).reshape(-1)
        if w.shape[0] != T or not bool(torch.isfinite(w).all()):
            raise NonFiniteError(
                f"method '{method.name}' returned weights {w.tolist()} for a Gramian with diagonal "
                f"{G.diagonal().tolist()}; nothing was written into .grad"
            )
        record.weights = w
        # the rows are fresh autograd outputs used nowhere else: combine them in place
        combined = combine_rows(w, dblocks, inplace=True) if use_rows else combine_blocks(w, dblocks)
        head_w = torch.as_tensor(method.head_weights(w), dtype=torch.float64).reshape(-1)
        if head_w.shape[0] != T or not bool(torch.isfinite(head_w).all()):
            raise NonFiniteError(f"method '{method.name}' returned head weights {head_w.tolist()}")
    else:
        if level == "feature" and multi_input:
            raise ConfigurationError(
                f"'{method.name}' combines the Jacobian itself; at feature level it needs one shared "
                "representation, but this benchmark has one per task (multi-input). Use level='param'."
            )
        if getattr(method, "needs_features", False):  # e.g. GradDrop's batch form needs sign(Z)
            combined, head_w = method.aggregate(dblocks, obj.detach(), features=feats[0].detach())
        else:
            combined, head_w = method.aggregate(dblocks, obj.detach())
        head_w = torch.as_tensor(head_w, dtype=torch.float64).reshape(-1)
        if not _all_finite(combined) or not bool(torch.isfinite(head_w).all()):
            raise NonFiniteError(f"method '{method.name}' produced a non-finite update; nothing was written")
        lw = getattr(method, "last_weights", None)
        record.weights = None if lw is None else torch.as_tensor(lw, dtype=torch.float64)

    # ---- regulariser gradients (added after aggregation) ------------------------------------
    reg_shared = reg_heads = reg_dz = None
    if reg_total is not None:
        if param_regs:
            gs = _grads(reg_total, list(shared) + heads)
            reg_shared = _zeros_if_none(gs[: len(shared)], shared)
            reg_heads = list(gs[len(shared):])
        else:
            gs = _grads(reg_total, feats + heads)
            reg_dz = _zeros_if_none(gs[: len(feats)], feats)
            reg_heads = list(gs[len(feats):])

    # ---- shared parameters ------------------------------------------------------------------
    if level == "feature":
        if multi_input:
            dz = [record.weights[t].to(feats[t].dtype) * dblocks[0][t] for t in range(T)]
        else:
            dz = [combined[0]]
        if reg_dz is not None:
            dz = [a + b.detach() for a, b in zip(dz, reg_dz)]
        if scale != 1.0:
            dz = [d * scale for d in dz]
        shared_g = [g / scale for g in _encoder_vjp(feats, shared, dz, retain=retain_graph)] if scale != 1.0 \
            else _encoder_vjp(feats, shared, dz, retain=retain_graph)
    else:
        shared_g = combined
        if reg_dz is not None:
            extra = _encoder_vjp(feats, shared, [g.detach() for g in reg_dz])
            shared_g = [a + b for a, b in zip(shared_g, extra)]
        if reg_shared is not None:
            shared_g = [a + b.detach() for a, b in zip(shared_g, reg_shared)]

    hw = head_w.tolist()
    head_g: list[Tensor | None] = []
    for j in range(len(heads)):
        g = None
        for t in range(T):
            r = head_rows[t][j]
            if r is not None:
                r = r.detach()
                g = r * hw[t] if g is None else g.add_(r, alpha=hw[t])
        if reg_heads is not None and reg_heads[j] is not None:
            g = reg_heads[j].detach() if g is None else g + reg_heads[j].detach()
        head_g.append(g)
    if not _all_finite(list(shared_g) + [g for g in head_g if g is not None]):
        return _nonfinite(
            f"non-finite combined gradient from '{method.name}'; nothing was written into .grad",
            nonfinite, names, record.losses, level, grad_scaler, overflow=scale != 1.0,
        )
    _accumulate(shared, shared_g, scale)
    _accumulate(heads, head_g, scale)
    record.method_values.update(method.log_values())
    return record
