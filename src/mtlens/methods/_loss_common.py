"""Helpers shared by the loss-level weightings: loss vectors, task counts, learnable scalars, internal Adam.

Private module (not auto-registered): UW and IMTL-L keep per-task learnable scalars that the
user's optimiser updates (parameters of the method module); FAMO, GradNorm, Auto-Lambda and MOML
keep a (T,) tensor trained by their own ``torch.optim.Adam`` (a buffer of the method module, the
Adam state its extra state). Both kinds are created lazily on the first call (on the losses'
device) or eagerly from ``num_tasks``, and round-trip through the module's ``state_dict()``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigurationError, NonFiniteError, ShapeError
from ._calls import ScalarsInOptimizer, mark_internal
from ._utils import check

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.protocols import Method


def float_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a method keeps its own state in: float32 at least (float16/bfloat16 are promoted)."""
    return torch.promote_types(dtype, torch.float32)


def check_num_tasks(num_tasks: int | None, method: str) -> int | None:
    is_int = isinstance(num_tasks, int) and not isinstance(num_tasks, bool)
    ok = num_tasks is None or (is_int and num_tasks >= 1)
    check(ok, f"{method}: num_tasks must be a positive integer (or None to infer it on the first call), "
              f"got {num_tasks!r}")
    return num_tasks


def check_int(name: str, value: int, lo: int, method: str) -> int:
    check(isinstance(value, int) and not isinstance(value, bool) and value >= lo,
          f"{method}: {name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def as_vector(values: Tensor | Sequence | Mapping, method: str, what: str) -> Tensor:
    """A detached 1-D float tensor from a tensor, a sequence of scalars or a ``{task: value}`` mapping."""
    if isinstance(values, Mapping):
        values = list(values.values())
    if isinstance(values, Tensor):
        v = values.detach().reshape(-1)
    else:
        items = list(values)
        if not items:
            raise ShapeError(f"{method}: {what} is empty")
        v = torch.stack([torch.as_tensor(x).detach().reshape(()) for x in items])
    if not v.is_floating_point():
        v = v.to(torch.get_default_dtype())
    if v.numel() == 0:
        raise ShapeError(f"{method}: {what} is empty")
    if not bool(torch.isfinite(v).all()):
        raise NonFiniteError(f"{method}: {what} contains non-finite values {v.tolist()}")
    return v


class TaskCount:
    """Remembers the number of tasks a stateful method was first used with and refuses another.

    ``num_tasks`` given to the constructor binds it from the start; otherwise the first call binds it, and a
    state saved before that call (``{"num_tasks": None}``: the engine's snapshot of a first step) unbinds it
    again when loaded, so that a failed first step leaves the method as it was (docs/reliability.md)."""

    def __init__(self, method: str, num_tasks: int | None = None):
        self.method = method
        self.given = num_tasks  # the constructor's: a loaded "not bound yet" state goes back to it
        self.T = num_tasks

    def bind(self, T: int) -> int:
        if self.T is None:
            self.T = int(T)
        elif self.T != T:
            raise ShapeError(
                f"{self.method}: built for {self.T} tasks but got {T} losses; a stateful method object "
                "serves one task set, create a new one for a different set of tasks"
            )
        return self.T

    def state_dict(self) -> dict[str, Any]:
        return {"num_tasks": self.T}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        T = state["num_tasks"]
        if self.T is not None and T is not None and T != self.T:
            raise CheckpointError(f"{self.method}: the state is for {T} tasks, this object for {self.T}")
        self.T = int(T) if T is not None else self.given


def _device_of(device: str | torch.device | None, method: str) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(f"{method}: device={device!r} is not a valid torch device") from exc


class LearnableScalars:
    """Per-task learnable scalars: a ``torch.nn.Parameter`` of the method named ``key``, updated by
    the user's optimiser (``method.parameters()``).

    Created eagerly when ``num_tasks`` is given (on ``device``, float32), otherwise on the first
    call on the losses' device (float32 at least) with a warning, because an optimiser built
    before that call does not contain them. Either way, :meth:`check` (called by the method at
    every objective) raises :class:`ConfigurationError` when the user's optimiser stepped twice
    in a row without them (:class:`~mtlens.methods._calls.ScalarsInOptimizer`).
    """

    def __init__(self, method: Method, key: str, init: float, num_tasks: int | None,
                 device: str | torch.device | None = None,
                 what: str | None = None):
        self._method, self.name, self.key, self.init = method, method.name, key, float(init)
        dev = _device_of(device, self.name)
        value = None
        if num_tasks is not None:
            value = torch.nn.Parameter(torch.full((num_tasks,), self.init, dtype=torch.float32,
                                                  device=dev or torch.device("cpu")))
        elif device is not None:
            raise ConfigurationError(
                f"{self.name}: device={device!r} only applies with num_tasks (eager creation); without "
                "num_tasks the scalars are created on the losses' device at the first call"
            )
        method.register_parameter(key, value)
        self._watch = ScalarsInOptimizer(self.name, what or key, lambda: self.value)

    @property
    def value(self) -> torch.nn.Parameter | None:
        return self._method._parameters[self.key]

    def check(self) -> None:
        """Raise when the user's optimiser keeps stepping without these scalars (see the class docstring)."""
        self._watch.check()

    def get(self, losses: Tensor) -> Tensor:
        T = losses.shape[0]
        value = self.value
        if value is None:
            value = torch.nn.Parameter(torch.full((T,), self.init, dtype=float_dtype(losses.dtype),
                                                  device=losses.device))
            self._method.register_parameter(self.key, value)
            warnings.warn(
                f"mtlens: '{self.name}' created its {T} learnable {self.key} on the first call; add "
                f"method.parameters() to your optimiser now, or pass num_tasks={T} to create them before "
                "building the optimiser",
                UserWarning,
                stacklevel=4,
            )
        if value.shape[0] != T:
            raise ShapeError(f"{self.name}: has {value.shape[0]} {self.key} but got {T} losses")
        if value.device != losses.device:
            raise ConfigurationError(
                f"{self.name}: its {self.key} live on {value.device} but the losses on "
                f"{losses.device}; "
                f"pass device='{losses.device}' together with num_tasks (or omit num_tasks to create them "
                "on the first call)"
            )
        return value

    def log_values(self, prefix: str) -> dict[str, float]:
        """``{f"{prefix}/{t}": value_t}``; empty before the scalars exist."""
        if self.value is None:
            return {}
        return {f"{prefix}/{i}": v for i, v in enumerate(self.value.detach().cpu().tolist())}


def learnable_scalars(method: Method, key: str, what: str, init: float, num_tasks: int | None,
                      device: str | None) -> LearnableScalars:
    """Validate the ``(init, num_tasks, device)`` hyper-parameters of UW / IMTL-L and register their
    :class:`LearnableScalars` on ``method`` (parameter ``key``); ``what`` names the scalars in the
    error messages (e.g. ``"log-variance"``)."""
    check(isinstance(init, (int, float)) and math.isfinite(init),
          f"{method.name}: init (initial {what}) must be a finite number, got {init!r}")
    check_num_tasks(num_tasks, method.name)
    return LearnableScalars(method, key, init, num_tasks, device, what=f"{what}s")


class InternalOptimizer:
    """A (T,) tensor trained by the method's own ``torch.optim`` optimiser (FAMO's logits, GradNorm's
    weights, IMTL's log-scales): ``torch.optim.Adam`` (default) or, with ``kind="sgd"``, plain
    ``torch.optim.SGD``.

    The tensor is a buffer of the method named ``key`` — in its ``state_dict()``, not in
    ``method.parameters()``, since the user's optimiser must not step it; list this helper in the
    method's ``state_attrs`` and the optimiser's state (``Optimizer.state_dict()``) is saved with it.
    """

    def __init__(self, method: Method, key: str, lr: float, weight_decay: float, init: float, kind: str = "adam"):
        self._method, self.key, self.kind = method, key, kind
        self.lr, self.weight_decay, self.init = lr, weight_decay, float(init)
        self.opt: torch.optim.Optimizer | None = None
        method.register_buffer(key, None)

    @property
    def value(self) -> Tensor | None:
        return self._method._buffers[self.key]

    def ensure(self, T: int, device: torch.device, dtype: torch.dtype, init: float | None = None) -> Tensor:
        """The tensor, created on the first call with every entry ``init`` (default: the constructor's)."""
        value = self.value
        if value is None:
            value = torch.full((T,), self.init if init is None else float(init), dtype=float_dtype(dtype),
                               device=device)
            self._method.register_buffer(self.key, value)
            self._build()
        if value.shape[0] != T:
            raise ShapeError(f"{self._method.name}: has {value.shape[0]} {self.key} but got {T} losses")
        return value

    def _build(self) -> None:
        value = self.value
        assert value is not None
        value.requires_grad_(True)
        if self.kind == "sgd":
            self.opt = mark_internal(torch.optim.SGD([value], lr=self.lr, weight_decay=self.weight_decay))
        else:
            self.opt = mark_internal(torch.optim.Adam([value], lr=self.lr, weight_decay=self.weight_decay))

    def step(self, grad: Tensor) -> None:
        value = self.value
        assert value is not None and self.opt is not None
        value.grad = grad.detach().to(device=value.device, dtype=value.dtype)
        self.opt.step()
        value.grad = None

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.opt is None else self.opt.state_dict()

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Called after the buffer was loaded: rebuild the Adam on it and load its state."""
        if (state is None) != (self.value is None):
            raise CheckpointError(f"{self._method.name}: the state has {self.key} "
                                  f"{'without' if state is None else 'but no'} optimiser state")
        if state is None:
            self.opt = None
            return
        self._build()
        assert self.opt is not None
        self.opt.load_state_dict(dict(state))


def require_keys(state: Mapping[str, Any], keys: Sequence[str], method: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{method}: state lacks {missing} (got keys {sorted(state)}); it was not "
                              f"saved by '{method}'.state_dict()")


def clone_opt(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()
