"""Executors: where the runs of a suite train.

* :class:`LocalExecutor` — in the driver process (``workers=1``), or ``N`` worker processes
  (``spawn``; each with ``threads`` torch intra-op threads, ``N × threads ≤ cores`` by default;
  each worker dies with the driver, so a killed suite leaves no orphans).
* :class:`RayExecutor` — each run is a Ray task asking for the suite's ``resources`` (CPUs, GPUs);
  ``address`` joins an existing cluster (default: a local Ray started for this suite). No shared
  file system is assumed: the task receives the run directory's files (a checkpoint to resume
  from) and returns its files, which the driver writes into its store atomically.

An executor has ``capacity`` (how many runs may be in flight), ``submit(job)`` and
``wait()`` (block until at least one run ended; return ``[(job, outcome)]``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigurationError, MissingDependencyError
from ..storage import DirectoryLock, atomic_write
from .worker import execute, init_worker, set_threads


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _broken(job: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """Outcome of a run whose worker died (killed, out of memory, segfault)."""
    import traceback

    from .store import now

    if isinstance(exc, BrokenProcessPool):
        # which process died is not known: every run in flight on the pool is lost with it
        error = ("worker lost: a worker process died while this run was in flight (killed by a signal: out of memory, "
                 "SIGKILL, or a crash; the other runs in flight were lost with it); rerun the same command to retry "
                 "it from its last checkpoint, with fewer --workers if memory ran out")
    else:
        error = f"worker lost: {type(exc).__name__}: {' '.join(str(exc).split())}"
    return {"key": job["key"], "status": "failed", "started": None, "finished": now(), "wall_s": None,
            "error": error[:2000], "traceback": "".join(traceback.format_exception(exc))[-20000:],
            "error_type": type(exc).__name__}


def _block_sigint() -> Any:
    """Block SIGINT in this thread (returns the previous mask, or None where signals cannot be masked).

    A process started while it is blocked inherits the mask through fork and exec, so a Ctrl-C that reaches the
    whole process group while a worker interpreter starts cannot kill it half-way through its imports (with a
    "Fatal Python error" traceback on the terminal); the worker then ignores SIGINT for good (:func:`init_worker`),
    and the driver alone acts on it. A SIGINT for the driver that arrives meanwhile stays pending and is
    delivered when the mask is restored."""
    import signal
    import threading

    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    except KeyboardInterrupt:  # a Ctrl-C handled inside the call (it checks signals after masking): the mask is
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # set but never returned; unblock, then stop
        raise


def _restore_sigmask(previous: Any) -> None:
    import signal

    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class LocalExecutor:
    """Sequential in this process (``workers=1``) or ``workers`` spawned processes."""

    name = "local"

    def __init__(self, workers: int = 1, threads: int | None = None, plugins: list[str] | None = None):
        if workers < 1:
            raise ConfigurationError(f"--workers must be ≥ 1, got {workers}")
        if threads is not None and threads < 1:
            raise ConfigurationError(f"--threads must be ≥ 1, got {threads}; leave it out for cores ÷ workers")
        cores = available_cores()
        self.workers = workers
        self.threads = threads or max(1, cores // workers)
        self.capacity = workers
        self.plugins = list(plugins or [])
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[Future, dict[str, Any]] = {}
        self._done: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def start(self) -> None:
        if self.workers > 1:
            import multiprocessing as mp

            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=mp.get_context("spawn"),
                initializer=init_worker,
                initargs=(self.threads, self.plugins),
            )
        else:
            set_threads(self.threads)

    def submit(self, job: dict[str, Any]) -> None:
        job = {**job, "threads": self.threads}
        if self._pool is None:
            self._done.append((job, execute(job)))
            return
        mask = _block_sigint()  # the pool starts its worker processes here (see _block_sigint)
        try:
            try:
                future = self._pool.submit(execute, job)
            except BrokenProcessPool:  # a worker died while no run was in flight on it (kill -9 of an idle one)
                self._restart()
                assert self._pool is not None
                future = self._pool.submit(execute, job)
            self._futures[future] = job
        finally:
            _restore_sigmask(mask)

    def wait(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        if self._done:
            done, self._done = self._done, []
            return done
        if not self._futures:
            return []
        finished, _ = futures_wait(list(self._futures), return_when=FIRST_COMPLETED)
        out = []
        broken = False
        for f in finished:
            job = self._futures.pop(f)
            try:
                out.append((job, f.result()))
            except KeyboardInterrupt:  # the driver's Ctrl-C, landing here: the suite stops (never a "failed" run)
                raise
            except BaseException as exc:  # noqa: BLE001 - the worker process died
                broken = broken or isinstance(exc, BrokenProcessPool)
                out.append((job, _broken(job, exc)))
        if broken:
            # A dead worker breaks the whole pool: every run still in flight on it is lost, and the pool takes no
            # more work. Record them as failed and start a fresh pool, so that the other runs of the suite go on.
            for f, job in list(self._futures.items()):
                self._futures.pop(f)
                out.append((job, _broken(job, BrokenProcessPool("the process pool broke"))))
            self._restart()
        return out

    def _restart(self) -> None:
        """A fresh pool in place of a broken one."""
        self._kill_workers()
        self.start()

    def _kill_workers(self) -> None:
        """Stop the pool at once: SIGKILL its processes (each run's files are written atomically and it resumes
        from its last checkpoint), then drop it without waiting for the runs in flight."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.join(timeout=5)
        self._futures.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def abort(self) -> None:
        """The suite was interrupted (Ctrl-C) or failed: stop the runs in flight now rather than waiting for
        them to finish (hours for a real run); a rerun resumes them from their last checkpoint."""
        self._kill_workers()


# ---------------------------------------------------------------------------------------------
def _read_tree(root: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
                files[str(p.relative_to(root))] = p.read_bytes()
    return files


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` under ``root`` atomically one by one: everything else first, then the
    checkpoint, then results.json — so a driver killed mid-copy leaves a run that resumes."""
    last = ("checkpoint.pt", "results.json")
    order = sorted(files, key=lambda n: (n in last, last.index(n) if n in last else 0, n))
    root.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(root, purpose="mtlens bench (copying a run back from Ray)"):
        for name in order:
            data = files[name]
            atomic_write(root / name, "wb", _writer(data))


def _writer(data: bytes) -> Callable[[IO[Any]], object]:
    return lambda fh: fh.write(data)


def ray_run(job: dict[str, Any], files: dict[str, bytes]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Body of the Ray task: materialise the run directory in a temporary folder, train, return its files."""
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="mtlens-ray-"))
    try:
        run_dir = tmp / "run"
        run_dir.mkdir()
        _write_tree(run_dir, files)
        job = {**job, "config": {**job["config"], "out_dir": str(run_dir)}}
        outcome = execute(job)
        back = _read_tree(run_dir)
        back.pop("run.json", None)
        return outcome, back
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class RayExecutor:
    """Each run is a Ray task; files travel with the task (no shared file system assumed)."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, cpus: float = 1, gpus: float = 0,
                 plugins: list[str] | None = None, init_kwargs: dict[str, Any] | None = None):
        try:
            import ray
        except ImportError as exc:
            raise MissingDependencyError(
                "the Ray executor needs the optional package 'ray', which is not installed. Install it with: "
                "pip install 'mtlens[ray]'"
            ) from exc
        self.ray = ray
        self.address, self.cpus, self.gpus = address, cpus, gpus
        self.threads = max(1, int(cpus))
        self.plugins = list(plugins or [])
        self.init_kwargs = dict(init_kwargs or {})
        self.workers = workers
        self.capacity = workers or 0
        self._refs: dict[Any, dict[str, Any]] = {}
        self._started_ray = False

    def start(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            kw = dict(self.init_kwargs)
            kw.setdefault("include_dashboard", False)
            kw.setdefault("log_to_driver", False)
            if self.address:
                ray.init(address=self.address, **kw)
            else:
                if self.workers:
                    kw.setdefault("num_cpus", int(self.workers * self.cpus))
                ray.init(**kw)
            self._started_ray = True
        if not self.capacity:
            total = ray.cluster_resources().get("CPU", 1)
            self.capacity = max(1, int(total // self.cpus))
        self._remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(ray_run)

    def submit(self, job: dict[str, Any]) -> None:
        job = {**job, "threads": self.threads, "plugins": self.plugins}
        files = _read_tree(Path(job["config"]["out_dir"]))
        files.pop("run.json", None)
        self._refs[self._remote.remote(job, files)] = job

    def wait(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        if not self._refs:
            return []
        ready, _ = self.ray.wait(list(self._refs), num_returns=1)
        out = []
        for ref in ready:
            job = self._refs.pop(ref)
            try:
                outcome, files = self.ray.get(ref)
            except KeyboardInterrupt:  # the driver's Ctrl-C, landing here: the suite stops (never a "failed" run)
                raise
            except BaseException as exc:  # noqa: BLE001 - the task or its node died
                out.append((job, _broken(job, exc)))
                continue
            _write_tree(Path(job["config"]["out_dir"]), files)
            out.append((job, outcome))
        return out

    def abort(self) -> None:
        self.close()

    def close(self) -> None:
        for ref in list(self._refs):
            self.ray.cancel(ref, force=True)
        self._refs.clear()
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False
