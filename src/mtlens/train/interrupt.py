"""Ctrl-C that is never lost: a SIGINT remembered until the training loop acts on it.

Python turns SIGINT into ``KeyboardInterrupt`` at the next bytecode boundary of the main thread. When that
boundary is inside a callback Python calls on its own — a weakref callback of the import machinery
(``_get_module_lock.<locals>.cb``), a ``__del__`` — the exception is printed as "Exception ignored in ..." and
dropped, and the run goes on as if the key had not been pressed (seen on a run interrupted while it imported its
modules). :func:`catching` installs a handler that records the signal *and* raises as usual; :func:`check`, called by
the training loop before every step, raises ``KeyboardInterrupt`` for a signal whose first raise was dropped (and
the "Exception ignored" traceback of that dropped raise is not printed: it is acted on).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_pending = threading.Event()
_deferring = 0  # depth of :func:`deferred` blocks (main thread only)


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a SIGINT arrived under :func:`catching` and was not acted on yet.

    Raises:
        KeyboardInterrupt: a Ctrl-C is pending (it is then cleared)."""
    if _pending.is_set():
        _pending.clear()
        raise KeyboardInterrupt


@contextmanager
def catching() -> Iterator[None]:
    """Within the block, a SIGINT is remembered (for :func:`check`) and raises ``KeyboardInterrupt`` as Python's
    default handler does. Only in the main thread (elsewhere, and when SIGINT is ignored or has another handler, it
    does nothing). The previous handler is restored and any pending signal forgotten on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:  # ignored (a background job) or the user's own: leave it
        yield
        return

    def handler(*_: Any) -> None:
        _pending.set()
        if not _deferring:  # inside deferred(): raised when the block ends
            raise KeyboardInterrupt

    hook = sys.unraisablehook

    def unraisable(info: Any) -> None:  # the dropped KeyboardInterrupt: acted on by check(), not a traceback
        if info.exc_type is KeyboardInterrupt and _pending.is_set():
            return
        hook(info)

    _pending.clear()
    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook
        _pending.clear()


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block (a checkpoint being written), a SIGINT under :func:`catching` is remembered and raised as
    ``KeyboardInterrupt`` when the block ends, not in the middle of it: a Ctrl-C during ``torch.save`` used to
    raise inside the zip writer's ``write``, whose cleanup then failed with ``RuntimeError: unexpected pos``, so the
    run ended with that traceback and exit status 1 instead of the interrupted run's message and 130 (the
    checkpoint itself was safe: written atomically). Nests; outside :func:`catching` it changes nothing.

    Raises:
        KeyboardInterrupt: at the end of the block, for a SIGINT that arrived inside it."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring:
        check()
