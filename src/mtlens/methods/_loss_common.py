"""Helpers shared by the loss-level weightings: loss vectors, task counts, learnable scalars, internal Adam.

Private module (not auto-registered): UW and IMTL-L keep per-task learnable scalars that the
user's optimiser updates; FAMO and GradNorm keep a (T,) tensor trained by their own Adam. Both
kinds are created lazily on the first call (on the losses' device) or eagerly from
``num_tasks``, and round-trip through ``state_dict()``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigurationError, NonFiniteError, ShapeError
from ._calls import ScalarsInOptimizer, mark_internal
from ._utils import check


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
    """Remembers the number of tasks a stateful method was first used with and refuses another."""

    def __init__(self, method: str, num_tasks: int | None = None):
        self.method = method
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


def _device_of(device: str | torch.device | None, method: str) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(f"{method}: device={device!r} is not a valid torch device") from exc


class LearnableScalars:
    """Per-task learnable scalars (``requires_grad``) that the user's optimiser updates.

    Created eagerly when ``num_tasks`` is given (on ``device``, float32), otherwise on the first
    call on the losses' device (float32 at least) with a warning, because an optimiser built
    before that call does not contain them. Either way, :meth:`check` (called by the method at
    every objective) raises :class:`ConfigurationError` when the user's optimiser stepped twice
    in a row without them (:class:`~mtlens.methods._calls.ScalarsInOptimizer`).
    """

    def __init__(self, method: str, key: str, init: float, num_tasks: int | None, device=None,
                 what: str | None = None):
        self.method, self.key, self.init = method, key, float(init)
        self.device = _device_of(device, method)
        self.value: Tensor | None = None
        if num_tasks is not None:
            self.value = torch.full((num_tasks,), self.init, dtype=torch.float32,
                                    device=self.device or torch.device("cpu"), requires_grad=True)
        elif device is not None:
            raise ConfigurationError(
                f"{method}: device={device!r} only applies with num_tasks (eager creation); without "
                "num_tasks the scalars are created on the losses' device at the first call"
            )
        self._watch = ScalarsInOptimizer(method, what or key, lambda: self.value)

    def check(self) -> None:
        """Raise when the user's optimiser keeps stepping without these scalars (see the class docstring)."""
        self._watch.check()

    def parameters(self) -> list[Tensor]:
        return [] if self.value is None else [self.value]

    def get(self, losses: Tensor) -> Tensor:
        T = losses.shape[0]
        if self.value is None:
            self.value = torch.full((T,), self.init, dtype=float_dtype(losses.dtype), device=losses.device,
                                    requires_grad=True)
            warnings.warn(
                f"mtlens: '{self.method}' created its {T} learnable {self.key} on the first call; add "
                f"method.parameters() to your optimiser now, or pass num_tasks={T} to create them before "
                "building the optimiser",
                UserWarning,
                stacklevel=4,
            )
        if self.value.shape[0] != T:
            raise ShapeError(f"{self.method}: has {self.value.shape[0]} {self.key} but got {T} losses")
        if self.value.device != losses.device:
            raise ConfigurationError(
                f"{self.method}: its {self.key} live on {self.value.device} but the losses on "
                f"{losses.device}; "
                f"pass device='{losses.device}' together with num_tasks (or omit num_tasks to create them "
                "on the first call)"
            )
        return self.value

    def log_values(self, prefix: str) -> dict[str, float]:
        """``{f"{prefix}/{t}": value_t}``; empty before the scalars exist."""
        if self.value is None:
            return {}
        return {f"{prefix}/{i}": float(v) for i, v in enumerate(self.value.detach().cpu())}

    def state_dict(self) -> dict[str, Any]:
        return {self.key: None if self.value is None else self.value.detach().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.key not in state:
            raise CheckpointError(f"{self.method}: state has no '{self.key}' (keys: {sorted(state)})")
        stored = state[self.key]
        if stored is None:
            if self.value is not None:
                raise CheckpointError(
                    f"{self.method}: the checkpoint was saved before the {self.key} existed")
            return
        stored = torch.as_tensor(stored)
        if self.value is None:
            device = self.device or stored.device
            self.value = stored.detach().clone().to(device=device, dtype=float_dtype(stored.dtype))
            self.value.requires_grad_(True)
            return
        if stored.shape != self.value.shape:
            raise CheckpointError(
                f"{self.method}: checkpoint {self.key} have shape {tuple(stored.shape)}, this object "
                f"{tuple(self.value.shape)}"
            )
        with torch.no_grad():  # in place: the user's optimiser keeps its reference
            self.value.copy_(stored)


def learnable_scalars_init(method: str, key: str, what: str, init: float, num_tasks: int | None,
                           device: str | None) -> tuple[dict[str, Any], LearnableScalars]:
    """Validate the ``(init, num_tasks, device)`` hyper-parameters of UW / IMTL-L.

    Returns the method's ``_hparams`` and its :class:`LearnableScalars` (stored under ``key``);
    ``what`` names the scalars in the error message (e.g. ``"log-variance"``).
    """
    check(isinstance(init, (int, float)) and math.isfinite(init),
          f"{method}: init (initial {what}) must be a finite number, got {init!r}")
    check_num_tasks(num_tasks, method)
    hparams = {"init": float(init), "num_tasks": num_tasks, "device": None if device is None else str(device)}
    return hparams, LearnableScalars(method, key, init, num_tasks, device, what=f"{what}s")


class InternalAdam:
    """A (T,) tensor trained by the method's own Adam; value and Adam state round-trip via state_dict."""

    def __init__(self, method: str, key: str, lr: float, weight_decay: float, init: float):
        self.method, self.key = method, key
        self.lr, self.weight_decay, self.init = lr, weight_decay, float(init)
        self.value: Tensor | None = None
        self.opt: torch.optim.Adam | None = None

    def ensure(self, T: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        if self.value is None:
            self._create(torch.full((T,), self.init, dtype=float_dtype(dtype), device=device))
        if self.value.shape[0] != T:
            raise ShapeError(f"{self.method}: has {self.value.shape[0]} {self.key} but got {T} losses")
        return self.value

    def _create(self, value: Tensor) -> None:
        self.value = value.detach().clone().requires_grad_(True)
        self.opt = mark_internal(torch.optim.Adam([self.value], lr=self.lr, weight_decay=self.weight_decay))

    def step(self, grad: Tensor) -> None:
        assert self.value is not None and self.opt is not None
        self.value.grad = grad.detach().to(device=self.value.device, dtype=self.value.dtype)
        self.opt.step()
        self.value.grad = None

    def state_dict(self) -> dict[str, Any]:
        if self.value is None:
            return {self.key: None, f"{self.key}_optimizer": None}
        return {self.key: self.value.detach().clone(),
                f"{self.key}_optimizer": copy.deepcopy(self.opt.state_dict())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in (self.key, f"{self.key}_optimizer"):
            if k not in state:
                raise CheckpointError(f"{self.method}: state has no '{k}' (keys: {sorted(state)})")
        stored = state[self.key]
        if stored is None:
            self.value, self.opt = None, None
            return
        stored = torch.as_tensor(stored)
        device = self.value.device if self.value is not None else stored.device
        self._create(stored.to(device))
        self.opt.load_state_dict(copy.deepcopy(state[f"{self.key}_optimizer"]))


def require_keys(state: Mapping[str, Any], keys: Sequence[str], method: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{method}: state lacks {missing} (got keys {sorted(state)}); it was not "
                              f"saved by '{method}'.state_dict()")


def clone_opt(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()
