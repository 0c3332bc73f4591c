"""Detect, in the user's own training loop, a call a stateful method needs and did not get.

Private module. Methods declare what the loop must do besides ``mtl_backward``
(``Method.user_calls``); this module lets them notice when it was not done, so that a loop
that forgets it raises an error naming the call instead of silently training another method:

* ``"parameters"`` (UW, IMTL-L): their learnable scalars must be in the optimiser. A global
  optimiser step post-hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) sees
  every ``optimizer.step()``: a step taken while the scalars hold a gradient, by an optimiser
  that does not contain them, is a miss.
* ``"after_step"`` (FAMO): a weighting call whose ``after_step`` never came, although an
  optimiser stepped in between, is a miss (gradient accumulation, with several weighting calls
  before one step, is not).
* ``"on_epoch_end"`` (DWA, STCH): counted in weighting calls; see :class:`EpochCalls`.

A single miss is tolerated (a loop may legitimately skip one step, e.g. after a non-finite
step); two in a row raise :class:`~mtlens.errors.ConfigurationError`. Optimisers the methods
own (FAMO's and GradNorm's internal Adam) are marked and ignored.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigurationError

#: Consecutive misses that raise (one miss is tolerated).
MISSES_TO_RAISE = 2

_watchers: weakref.WeakSet = weakref.WeakSet()
_lock = threading.Lock()
_handle = None


def mark_internal(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Mark an optimiser a method owns, so that its steps are not taken for the user's."""
    optimizer._mtlens_internal = True  # type: ignore[attr-defined]
    return optimizer


def _on_optimizer_step(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:  # torch's hook signature
    if getattr(optimizer, "_mtlens_internal", False):
        return
    for w in list(_watchers):
        w.optimizer_stepped(optimizer)


def _watch(watcher: Any) -> None:
    global _handle
    with _lock:
        if _handle is None:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            _handle = register_optimizer_step_post_hook(_on_optimizer_step)
        _watchers.add(watcher)


class _Misses:
    """Consecutive misses of a required call: one is tolerated, ``MISSES_TO_RAISE`` in a row raise."""

    _misses = 0

    def _missed(self, missed: bool) -> bool:
        """Record one check; True (and the count reset) when the misses reach ``MISSES_TO_RAISE``."""
        self._misses = self._misses + 1 if missed else 0
        if self._misses >= MISSES_TO_RAISE:
            self._misses = 0
            return True
        return False


class ScalarsInOptimizer(_Misses):
    """Watches that the learnable scalars returned by ``get()`` are stepped by the user's optimiser."""

    def __init__(self, method: str, what: str, get: Callable[[], torch.Tensor | None]):
        self.method, self.what, self._get = method, what, get
        self._stepped_without = False
        self._included = False
        self._misses = 0
        _watch(self)

    def optimizer_stepped(self, optimizer: torch.optim.Optimizer) -> None:
        value = self._get()
        if value is None or value.grad is None:
            return  # nothing to update (no backward reached them since the last clear)
        if any(p is value for g in optimizer.param_groups for p in g["params"]):
            self._included = True
        else:
            self._stepped_without = True

    def check(self) -> None:
        """Call once per weighting call, before using the scalars."""
        missed = self._stepped_without and not self._included
        self._stepped_without = self._included = False
        if self._missed(missed):
            raise ConfigurationError(
                f"{self.method}: your optimiser stepped {MISSES_TO_RAISE} times without its learnable {self.what} "
                f"(method.parameters()), so '{self.method}' never learns its weights. Build the optimiser with them: "
                "torch.optim.Adam(list(model.parameters()) + method.parameters(), ...), creating the method with "
                "num_tasks=T so that they exist before the optimiser"
            )


class AfterStepCalls(_Misses):
    """Watches that ``after_step`` follows every optimiser step that used the method's weights (FAMO)."""

    def __init__(self, method: str, pending: Callable[[], bool]):
        self.method, self._pending = method, pending
        self._stepped = False
        self._misses = 0
        _watch(self)

    def optimizer_stepped(self, optimizer: torch.optim.Optimizer) -> None:
        if self._pending():
            self._stepped = True

    def weighting_call(self) -> None:
        """Call at the start of every weighting call."""
        missed = self._pending() and self._stepped
        self._stepped = False
        if self._missed(missed):
            raise ConfigurationError(
                f"{self.method}: after_step(new_losses) was not called after optimizer.step() for "
                f"{MISSES_TO_RAISE} steps in a row, so '{self.method}' does not learn its weights. After every "
                "optimizer.step(), compute the task losses of the updated model on the same batch (under "
                "torch.no_grad()) and call method.after_step(new_losses) (see the README's own-loop example)"
            )

    def after_step_called(self) -> None:
        self._stepped = False
        self._misses = 0


class EpochCalls:
    """Counts weighting calls between two per-epoch reports (DWA, STCH: ``on_epoch_end``; PIVRG:
    ``on_task_scores``).

    The epoch length is ``steps_per_epoch`` when given, else learnt from the first reported
    epoch. More than one call beyond it without the report raises. Without
    ``steps_per_epoch`` nothing can be checked before the first report: the first weighting
    call then warns once, saying how the method learns the epoch boundaries.
    """

    def __init__(self, method: str, steps_per_epoch: int | None, why: str,
                 report: str = "on_epoch_end(mean_losses)", what: str = "epoch-mean task losses"):
        self.method, self.steps_per_epoch, self.why = method, steps_per_epoch, why
        self.report, self.what = report, what
        self.calls = 0  # weighting calls since the last on_epoch_end
        self.learnt: int | None = None
        self._warned = False

    def weighting_call(self, active: bool = True) -> None:
        """Count one call; ``active=False`` once the method no longer needs the epochs (STCH after warm-up)."""
        self.calls += 1
        if not active:
            return
        limit = self.steps_per_epoch if self.steps_per_epoch is not None else self.learnt
        if limit is None:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"mtlens: '{self.method}' {self.why}: call method.{self.report} at the end of every "
                    f"epoch, and pass steps_per_epoch=len(loader) to create('{self.method}', ...) so that a missed "
                    "call raises an error",
                    UserWarning,
                    stacklevel=4,
                )
            return
        if self.calls > limit + (MISSES_TO_RAISE - 1):
            call = self.report.split("(")[0]
            raise ConfigurationError(
                f"{self.method}: {self.calls} weighting calls since the last {call}, for epochs of "
                f"{limit} steps: {self.report} was not called at the end of an epoch, so '{self.method}' "
                f"{self.why}. Call method.{call}({self.what}) after every epoch (see the README's "
                "own-loop example), or fix steps_per_epoch"
            )

    def epoch_ended(self) -> None:
        if self.learnt is None and self.calls > 0:
            self.learnt = self.calls
        self.calls = 0

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "learnt": self.learnt}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}  # checkpoints written before these counters existed
        self.calls = int(state.get("calls", 0))
        self.learnt = state.get("learnt")


class MetaStepCalls(_Misses):
    """Watches that ``meta_step`` precedes every weighting call of a bilevel method (Auto-Lambda, MOML).

    A weighting call (``combine``, the engine's step) with no ``meta_step`` since the previous one
    is a miss; :data:`MISSES_TO_RAISE` in a row raise :class:`ConfigurationError` naming the call
    (the method would otherwise train with frozen task weights)."""

    def __init__(self, method: str):
        self.method = method
        self._fresh = False
        self._misses = 0

    def meta_step_called(self) -> None:
        self._fresh = True
        self._misses = 0

    def weighting_call(self) -> None:
        missed = not self._fresh
        self._fresh = False
        if self._missed(missed):
            raise ConfigurationError(
                f"{self.method}: meta_step(lookahead) was not called before {MISSES_TO_RAISE} steps in a row, so "
                f"'{self.method}' never updates its task weights. Before every mtl_backward call, call "
                "method.meta_step(mtlens.engine.LookAhead(params, train_losses, val_losses, lr=...)) with closures "
                "returning the task losses on the step's batch and on an independent batch (the mtlens trainer "
                "does it; docs/methods.md, bilevel)"
            )
