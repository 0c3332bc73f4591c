"""The engine's entry into autograd: :func:`torch.autograd.grad` without its Python argument handling
where that handling decides nothing.

``torch.autograd.grad`` normalises its arguments, looks for ``__torch_function__`` overrides on every
output and input, validates or builds each ``grad_output`` (``_make_grads``, which imports two modules
and compares shapes symbolically on every call) and then calls ``_engine_run_backward``, which runs
autograd's C++ engine. Inside a training step, right after the forward, that Python costs ≈ 30 µs a
call warm and ≈ 90 µs cold (measured on the scaling study's conv workload: the same T backwards
either way, alternating, thread CPU clock; docs/performance.md, "Autograd's Python wrapper") — and
the engine calls autograd T to 2T + 1 times a step.

:func:`vjp` calls ``_engine_run_backward`` itself when the call is the plain case — every output and
input a tensor without a ``__torch_function__`` override (no subclass, no active mode), each
``grad_output`` either given with the output's shape and complexness or absent for a scalar
floating-point output that requires grad (then ``ones_like``, as ``_make_grads`` builds it) — and
:func:`torch.autograd.grad` otherwise (its checks, errors and overrides). The C++ engine receives the
same arguments either way, so the gradients are the same tensors, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NoReturn, cast

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge
from torch.overrides import has_torch_function

from ..errors import ConfigurationError, GraphFreedError

_run_backward: Callable[..., Any] | None
try:  # torch ≥ 2.3: the function torch.autograd.grad ends in (logging hooks, the context for device threads)
    from torch.autograd.graph import _engine_run_backward as _run_backward
except ImportError:  # pragma: no cover - older torch: the public path only
    _run_backward = None


def _usable() -> bool:
    """Whether ``_engine_run_backward`` takes torch.autograd.grad's arguments and returns its gradients (checked
    once on a two-parameter graph; a torch whose private signature changed gets the public path)."""
    if _run_backward is None:
        return False
    try:
        a = torch.tensor([1.0, 2.0], requires_grad=True)
        b = torch.tensor(3.0, requires_grad=True)
        y = (a * b).sum()
        got = _run_backward((y,), (torch.ones_like(y),), False, False, (a, b), True, accumulate_grad=False)
        return (isinstance(got, tuple) and len(got) == 2 and torch.equal(got[0], torch.tensor([3.0, 3.0]))
                and torch.equal(got[1], torch.tensor(3.0)))
    except Exception:  # pragma: no cover - a changed private API: the public path
        return False


_DONATED = "donated buffers"
_DOUBLE = "does not currently support double backward"
_FREED = "backward through the graph a second time"


def compile_error(exc: BaseException) -> ConfigurationError | None:
    """The engine's message for autograd's two refusals inside a ``torch.compile``'d module's backward, or ``None``
    for any other error (then re-raised as it is).

    * **Donated buffers** (torch ≥ 2.6, on by default): a compiled backward frees its saved tensors as it runs, so it
      runs once per forward. The per-task Jacobian (``level="param"``), a loss-level ``compute_gramian="param"`` and
      parameter-level regularisers differentiate the encoder once per task, with ``retain_graph=True``.
    * **Double backward**: aot_autograd's compiled functions have no second derivative; saliency regularisers
      (Rep-MTL) and ConsMTL differentiate ``S_t = ∂L_t/∂Z`` through the heads again (``create_graph=True``).

    The fixes are in docs/engine.md, "torch.compile"."""
    msg = str(exc)
    if _DONATED in msg:
        return ConfigurationError(
            "a torch.compile'd module's backward ran twice in one step: the per-task Jacobian (level='param', "
            "compute_gramian='param', parameter-level regularisers) differentiates the encoder once per task "
            "(retain_graph=True), which the compiled backward's donated buffers forbid. Fix: set "
            "torch._functorch.config.donated_buffer = False before the module's first compiled call; or pass "
            "features=Z with jacobian='batched' (one vmapped backward through the encoder); or use level='feature' "
            "(one backward through the encoder). See docs/engine.md, 'torch.compile'. Autograd said: "
            + msg.splitlines()[0]
        )
    if _DOUBLE in msg:
        return ConfigurationError(
            "a second derivative was asked through a torch.compile'd module (create_graph=True), which "
            "aot_autograd does not support: saliency regularisers (Rep-MTL) and ConsMTL differentiate "
            "S_t = ∂L_t/∂Z through the heads again, and parameter-level regularisers through the encoder. Fix: "
            "compile only what is differentiated once: the encoder (model.encoder = torch.compile(model.encoder)) "
            "with features=Z and eager heads, for saliency regularisers. See docs/engine.md, 'torch.compile'. "
            "Autograd said: " + msg.splitlines()[0]
        )
    return None


def freed_graph_error(exc: RuntimeError) -> GraphFreedError | None:
    """The engine's message for autograd's "Trying to backward through the graph a second time", or ``None`` for any
    other error. Autograd's own advice ("Specify retain_graph=True") names one cause of two; the other is a user's
    model that the step cannot see: a loss reaching the encoder's graph upstream of ``features`` around it (a head
    reading an encoder intermediate, or that intermediate's parameters left out of ``shared_params``), whose part of
    the graph the heads' backward frees before the step pushes ``Σ_t w_t S_t`` through the encoder."""
    msg = str(exc)
    if _FREED not in msg:
        return None
    return GraphFreedError(
        "autograd found part of the losses' graph already freed. Either these losses were differentiated before "
        "(mtl_backward frees the graph as loss.backward() does: run a new forward for every step, or pass "
        "retain_graph=True to the earlier call), or a task's loss reaches the encoder upstream of `features` by a "
        "route around them (a head reading an intermediate of the encoder, or the parameters before that "
        "intermediate left out of shared_params): the step differentiates the heads first, which frees that part. "
        "`features` must be the only route from the encoder to the losses (docs/engine.md, 'What happens at each "
        "level'): give the heads `features` only, or put every encoder parameter in shared_params. Autograd said: "
        + msg.splitlines()[0]
    )


FAST = _usable()
"""Whether :func:`vjp` may call autograd's engine directly on this torch (else always the public path)."""


def raise_translated(exc: RuntimeError) -> NoReturn:
    """Raise :func:`compile_error`'s or :func:`freed_graph_error`'s translation of ``exc`` (from it), or ``exc`` itself
    when neither has one: the one ``except RuntimeError`` body of every call into autograd (zero cost unless autograd
    raised)."""
    err: Exception | None = compile_error(exc) or freed_graph_error(exc)
    if err is None:
        raise exc
    raise err from exc


def backward_into_grad(output: Tensor, retain_graph: bool = False) -> None:
    """``output.backward(retain_graph=retain_graph)`` for a real floating-point scalar ``output``: autograd's
    ``AccumulateGrad`` writes every leaf's ``.grad`` (its layout contract, its own copies). In the plain case
    (see the module docstring) autograd's C++ engine is called directly, with the ``grad_output`` that
    ``torch.autograd.backward`` would make (ones); otherwise ``torch.autograd.backward`` itself.

    Raises:
        ConfigurationError: :func:`compile_error`'s translation of a ``torch.compile``'d backward's refusal.
        GraphFreedError: part of the graph was already freed (:func:`freed_graph_error`'s message).
        RuntimeError: autograd's own errors.
    """
    try:
        if FAST and not has_torch_function((output,)):
            assert _run_backward is not None  # FAST
            _run_backward((output,), (torch.ones_like(output, memory_format=torch.preserve_format),), retain_graph,
                          False, (), allow_unreachable=True, accumulate_grad=True)
        else:
            torch.autograd.backward(output, retain_graph=retain_graph)
    except RuntimeError as exc:
        raise_translated(exc)


def vjp(
    outputs: Tensor | GradientEdge | Sequence[Tensor | GradientEdge],
    inputs: Tensor | GradientEdge | Sequence[Tensor | GradientEdge],
    grad_outputs: Tensor | Sequence[Tensor | None] | None = None,
    retain_graph: bool = False,
    create_graph: bool = False,
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph or create_graph, create_graph,
    allow_unused=True)``: the same gradients (a tuple, ``None`` for an input the outputs do not reach) and,
    outside the plain case described in the module docstring, the same call. An output may be a
    :class:`~torch.autograd.graph.GradientEdge` (a stacked loss vector's entry point) when its ``grad_output``
    is given with the edge's shape (checked on the node's input metadata, as ``_make_grads`` does).

    Raises:
        ConfigurationError: a ``torch.compile``'d module's backward was asked for what it cannot do (run twice with
            its donated buffers, or a second derivative): :func:`compile_error`'s message, naming the fix.
        GraphFreedError: part of the graph was already freed (:func:`freed_graph_error`'s message, naming both causes).
        RuntimeError: autograd's own errors (an input that does not require grad, ...).
    """
    try:  # zero cost unless autograd raises (Python ≥ 3.11)
        outs = (outputs,) if isinstance(outputs, (Tensor, GradientEdge)) else tuple(outputs)
        ins = (inputs,) if isinstance(inputs, (Tensor, GradientEdge)) else tuple(inputs)
        keep = retain_graph or create_graph
        if FAST and ins and outs and all(isinstance(t, Tensor) for t in ins):
            t_ins = cast(tuple[Tensor, ...], ins)
            if grad_outputs is None:
                gos: tuple[Tensor | None, ...] = (None,) * len(outs)
            else:
                gos = (grad_outputs,) if isinstance(grad_outputs, Tensor) else tuple(grad_outputs)
            tensors = tuple(o for o in outs if isinstance(o, Tensor))
            if len(gos) == len(outs) and not has_torch_function(tensors + t_ins):
                made: list[Tensor] = []
                for o, g in zip(outs, gos):
                    if isinstance(o, GradientEdge):  # a stacked loss vector's entry point: its grad_output is given
                        if not isinstance(g, Tensor) or has_torch_function((g,)):
                            break
                        meta = o.node._input_metadata[o.output_nr]
                        if meta.is_nested_tensor or torch.Size(meta.shape) != g.shape or \
                                meta.dtype.is_complex != g.is_complex():
                            break
                        made.append(g)
                    elif not isinstance(o, Tensor):
                        break
                    elif g is None:
                        if not (o.requires_grad and o.numel() == 1 and o.is_floating_point()):
                            break
                        made.append(torch.ones_like(o, memory_format=torch.preserve_format))
                    elif (isinstance(g, Tensor) and g.shape == o.shape and g.is_complex() == o.is_complex()
                          and not has_torch_function((g,))):
                        made.append(g)
                    else:
                        break
                else:
                    assert _run_backward is not None  # FAST
                    return tuple(_run_backward(outs, tuple(made), keep, create_graph, t_ins, True,
                                               accumulate_grad=False))
        return torch.autograd.grad(cast(Any, outs), cast(Any, ins), grad_outputs=grad_outputs, retain_graph=keep,
                                   create_graph=create_graph, allow_unused=True)
    except RuntimeError as exc:
        raise_translated(exc)


class MapHooksHeld:
    """Hold back the tensor hooks of the shared maps ``Z`` (``Z.register_hook``) while a VJP starts FROM them — the
    encoder's backward of ``Σ_t w_t S_t``, or of one task's ``S_t`` (its row of the Jacobian) — and put them back
    after, in their order. ``S_t`` is the gradient autograd delivered at ``Z`` in task t's own backward, the hooks
    already applied to it, as ``loss.backward()`` applies them once to the gradient arriving at ``Z``; run again on
    the encoder VJP's root they applied twice (a hook scaling by 0.5 made MGDA's one-task update a quarter of the
    plain gradient). ``Z.retain_grad()`` is not such a hook (it still sees every backward through ``Z``). Built only
    where some map has hooks (one attribute read per map decides)."""

    __slots__ = ("held",)

    def __init__(self, maps: Sequence[Tensor]) -> None:
        self.held = [(h, list(h.items())) for h in (z._backward_hooks for z in maps) if h]

    def __enter__(self) -> None:
        for h, _ in self.held:
            h.clear()

    def __exit__(self, *exc: object) -> None:
        for h, items in self.held:
            h.update(items)
