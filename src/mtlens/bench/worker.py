"""One run of a suite, executed inside a worker (the driver itself, a worker process, or a Ray task).

:func:`execute` never raises for a failing run: it returns the error line and the traceback, so
that one broken configuration never stops the others. It resumes the run from
``checkpoint.pt`` when the run directory holds one (a run interrupted by a kill, or a failed run
being retried), else starts it fresh.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def set_threads(threads: int) -> None:
    """Torch intra-op threads of this process (inter-op left alone once work has started)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when its parent (the driver) dies, so a killed suite leaves no orphans."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - no libc: the worker then exits when its pipe closes
        pass


def _leave_sigint_to_the_driver() -> None:
    """Ignore SIGINT in a local worker process: a Ctrl-C reaches the whole process group, and the driver acts
    on it by stopping its workers (an idle worker would otherwise print a KeyboardInterrupt traceback, and a
    busy one record its run as failed). The worker started with SIGINT blocked (the driver blocks it while
    it starts them); once ignored it is unblocked, which discards one that arrived meanwhile."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def init_worker(threads: int, plugins: list[str]) -> None:
    """Initializer of local worker processes."""
    _die_with_parent()
    _leave_sigint_to_the_driver()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    set_threads(threads)
    from .suite import import_plugins

    import_plugins(plugins)


class _PeakMemory:
    """Peak memory of the run: CUDA's max allocated bytes, or the process's peak resident set on
    Linux (``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``)."""

    def __init__(self, device_type: str):
        self.cuda = device_type == "cuda"

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc):
        return False

    def read(self) -> tuple[int | None, str | None]:
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "cpu_peak_rss"
        except OSError:
            pass
        return None, None


def execute(job: dict[str, Any]) -> dict[str, Any]:
    """Train one run described by ``job`` and report how it went.

    ``job``: ``{"key", "config": RunConfig dump with out_dir set, "baseline": resolved baseline or
    None, "threads": int, "tensorboard": bool, "plugins": [module, ...]}``.

    Returns ``{"key", "status": "done"|"failed", "error", "traceback", "started", "finished",
    "wall_s", "resumed", "peak_memory_bytes", "memory_kind", "threads"}``.
    """
    from .store import now

    started, t0 = now(), time.perf_counter()
    out: dict[str, Any] = {"key": job["key"], "started": started, "threads": job.get("threads"),
                           "resumed": False, "peak_memory_bytes": None, "memory_kind": None}
    try:
        from ..train import Trainer
        from ..train.build import resolve_device
        from ..train.checkpoint import CHECKPOINT_NAME
        from .suite import import_plugins

        import_plugins(job.get("plugins", []))
        if job.get("threads"):
            set_threads(job["threads"])
        cfg = job["config"]
        run_dir = Path(cfg["out_dir"])
        resume = (run_dir / CHECKPOINT_NAME).exists()
        out["resumed"] = resume
        trainer = Trainer(cfg, baseline=job.get("baseline"), quiet=True, tensorboard=bool(job.get("tensorboard")))
        with _PeakMemory(resolve_device(trainer.cfg.train.device).type) as mem:
            trainer.fit(resume=resume)
        out["peak_memory_bytes"], out["memory_kind"] = mem.read()
        out.update(status="done", error=None, traceback=None)
    except BaseException as exc:  # noqa: BLE001 - a failing run is recorded, never propagated
        if isinstance(exc, KeyboardInterrupt):
            raise
        msg = " ".join(str(exc).split())
        out.update(status="failed", error=f"{type(exc).__name__}: {msg}"[:2000],
                   traceback=traceback.format_exc()[-20000:], error_type=type(exc).__name__)
    out["finished"] = now()
    out["wall_s"] = time.perf_counter() - t0
    return out
