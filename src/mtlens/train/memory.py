"""Peak memory of a training loop, for the benchmark's "memory relative to EW" column.

What is measured (``results.json`` → ``timings.peak_memory``):

* **CUDA**: ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats`` at
  the start of training (tensor memory of this process on that device; the caching allocator's
  reserved-but-unused blocks are not counted).
* **CPU (Linux)**: the process's peak resident set size ``VmHWM`` from ``/proc/self/status``,
  after resetting it by writing ``5`` to ``/proc/self/clear_refs`` at the start of training
  (Linux ≥ 4.0, ``Documentation/filesystems/proc.rst``). The kernel updates the high-water mark
  when memory is unmapped, so memory an allocator hands back with ``madvise`` and no unmap may
  escape it: on CPU the figure is a lower bound of the true peak. ``resource.getrusage``'s ``ru_maxrss``
  cannot be reset, so a process that trained something bigger before (a baseline, an earlier
  run of the same worker) would hide this run's peak; the reset avoids that. Before the reset
  the C heap's free memory is returned to the system (glibc ``malloc_trim``; ``heap_trimmed``
  says whether it could be), otherwise memory freed by earlier work would be reused unseen and
  training would appear to add nothing.
* elsewhere (macOS, Windows, a kernel that refuses the reset) nothing is measured:
  ``peak_bytes`` is ``None`` and ``reason`` says why — never a made-up number.

``peak_bytes`` is the peak during training (steps and the per-epoch validation; DataLoader
worker processes are not included); ``start_bytes`` is what was resident when training began
(model, data already loaded), so ``peak_bytes - start_bytes`` is what training added. Compare
runs of one suite only (same data, model and process layout).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _trim_heap() -> bool:
    """Return the C heap's free memory to the system (glibc ``malloc_trim(0)``); False where unavailable.

    Without it, memory freed by whatever ran before (an earlier run of the same worker, a baseline)
    stays resident and is reused, and this run's training would appear to add nothing."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)  # returns whether memory was released; either way the heap is trimmed
        return True
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Measure the peak memory between :meth:`start` and :meth:`stop` on ``device``.

    >>> m = PeakMemory(torch.device("cpu"))
    >>> m.start()
    >>> x = torch.ones(10**6)  # 4 MB
    >>> r = m.stop()
    >>> r["peak_bytes"] >= r["start_bytes"], r["source"]  # on Linux
    (True, 'linux VmHWM after clear_refs')
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._start: int | None = None
        self._reason: str | None = None
        self._trimmed = False

    def start(self) -> None:
        self._start, self._reason = None, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = int(torch.cuda.memory_allocated(self.device))
            return
        if self.device.type != "cpu":
            self._reason = f"peak memory is not measured on device type '{self.device.type}'"
            return
        if not sys.platform.startswith("linux"):
            self._reason = f"peak CPU memory needs Linux's /proc/self/clear_refs (platform: {sys.platform})"
            return
        self._trimmed = _trim_heap()
        try:
            _CLEAR_REFS.write_text("5")
        except OSError as exc:
            self._reason = f"could not reset the peak RSS through /proc/self/clear_refs ({exc})"
            return
        hwm = _status_kib("VmHWM")  # just reset: the resident set now
        if hwm is None:
            self._reason = "no VmHWM in /proc/self/status"
            return
        self._start = hwm * 1024

    def stop(self) -> dict[str, Any]:
        """``{"peak_bytes", "start_bytes", "source"}``, or ``peak_bytes=None`` and ``reason``."""
        if self._start is None:
            return {
                "peak_bytes": None,
                "start_bytes": None,
                "source": None,
                "reason": self._reason or "PeakMemory.start() was not called",
            }
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = int(torch.cuda.max_memory_allocated(self.device))
            return {"peak_bytes": peak, "start_bytes": self._start, "source": "cuda max_memory_allocated"}
        hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
        if hwm is None:
            return {"peak_bytes": None, "start_bytes": None, "source": None, "reason": "no VmHWM in /proc/self/status"}
        # the kernel's RSS counters are per-CPU batched, so two readings can disagree by a few pages:
        # the peak is at least the start and the current resident set
        peak = max(hwm * 1024, (rss or 0) * 1024, self._start)
        return {
            "peak_bytes": peak,
            "start_bytes": self._start,
            "source": "linux VmHWM after clear_refs",
            "heap_trimmed": self._trimmed,
        }


__all__ = ["PeakMemory"]
