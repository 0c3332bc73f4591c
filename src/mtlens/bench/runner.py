"""Run a suite into a results store: schedule baselines before the runs that need them, skip what
is done, resume what was interrupted, retry what failed, and never let one failure stop the rest.

>>> from collections import Counter
>>> from mtlens.bench import expand, load_suite, run_suite
>>> suite = load_suite("quick")
>>> specs = expand(suite, device_type="cpu")  # what run_suite runs: multi-task runs and their baselines
>>> len(specs), Counter(s.kind for s in specs)
(73, Counter({'mtl': 66, 'stl': 7}))
>>> summary = run_suite(suite, "bench/quick", workers=2)  # trains all 73 runs: minutes  # doctest: +SKIP
>>> summary.counts  # doctest: +SKIP
{'done': 73}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ..registry import plugin_modules
from .store import Store, now, read_results
from .suite import RunSpec, Suite, expand, resolved_yaml

if TYPE_CHECKING:  # the executors are imported when a suite runs (Ray is optional)
    from .executors import LocalExecutor, RayExecutor

#: Failures that concern a benchmark's data rather than one run: every other run of the same
#: benchmark entry would fail the same way, so they are marked failed without starting.
_DATA_ERRORS = ("DataError",)


@dataclass
class SuiteSummary:
    """What :func:`run_suite` did: the store, the counts, and the runs started/failed this time."""

    out: Path
    suite: str
    counts: dict[str, int]
    skipped: int  # done before this invocation
    ran: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


def device_type_for(suite: Suite, gpus: float) -> str:
    """The device type that goes into run keys: what ``train.device`` resolves to on the workers."""
    import torch

    devices = {str(suite.base.get("train", {}).get("device", "auto"))}
    for o in suite.set:
        if o.replace(" ", "").startswith("train.device="):
            devices = {o.split("=", 1)[1].strip()}
    if devices == {"cpu"}:
        return "cpu"
    if devices == {"cuda"} or gpus > 0:
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"


def probe_data(suite: Suite, specs: list[RunSpec]) -> None:
    """Load the data of every benchmark entry marked ``probe: true`` once, on the driver, so that a
    missing or malformed data directory fails at once with the loader's own message."""
    from ..errors import DataError, MissingDependencyError, MTLensError
    from ..tasks.spec import get_benchmark

    for bkey, entry in suite.benchmarks.items():
        if not entry.probe:
            continue
        spec = next((s for s in specs if s.benchmark == bkey), None)
        if spec is None:
            continue
        cfg = spec.config
        try:
            get_benchmark(cfg.data.benchmark).datasets(root=cfg.data.root, seed=cfg.train.seed, **cfg.data.options)
        except (MTLensError, OSError) as exc:
            cls = MissingDependencyError if isinstance(exc, MissingDependencyError) else DataError
            raise cls(f"suite '{suite.name}', benchmark '{bkey}': its data cannot be loaded: "
                      f"{' '.join(str(exc).split())}") from None


def _baseline(store: Store, spec: RunSpec, by_key: dict[str, RunSpec]) -> dict[str, Any]:
    metrics: dict[str, dict[str, Any]] = {"val": {}, "test": {}}
    runs, tasks = {}, []
    for k in spec.deps:
        dep = by_key[k]
        res = store.results(k)
        if res is None:  # pragma: no cover - the scheduler only releases runs whose deps are done
            raise ConfigurationError(f"baseline run '{dep.label}' ({k}) has no results")
        task = dep.task
        if task is None:  # pragma: no cover - baselines are single-task runs
            raise ConfigurationError(f"baseline run '{dep.label}' ({k}) names no task")
        for split in ("val", "test"):
            metrics[split][task] = res["metrics"][split][task]
        runs[task] = dep.relpath
        tasks.append(task)
    return {"kind": "stl-baseline", "source": "suite", "benchmark": spec.config.data.benchmark, "tasks": tasks,
            "metrics": metrics, "runs": runs}


def run_suite(
    suite: Suite,
    out: str | Path,
    *,
    executor: str = "local",
    workers: int | None = None,
    threads: int | None = None,
    address: str | None = None,
    ray_init: dict[str, Any] | None = None,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> SuiteSummary:
    """Run every run of ``suite`` not yet done in the store ``out``.

    Args:
        suite: a validated :class:`Suite` (:func:`mtlens.bench.load_suite`).
        out: the store directory (created; see :mod:`mtlens.bench.store`).
        executor: ``"local"`` or ``"ray"``.
        workers: local worker processes (1 = in this process), or the Ray runs in flight. Default
            (None): local: ``cores // resources.cpus`` when the suite's runs ask for no GPU (each
            worker then has ``resources.cpus`` threads), else 1 (one run at a time on the GPU);
            Ray: as many as the cluster's CPUs allow.
        threads: torch intra-op threads per local worker (default cores // workers).
        address: Ray cluster address (``ray start --head`` prints it); default a local Ray.
        progress: called as ``progress(event, entry)`` with event ``"start"``, ``"done"``, ``"failed"``.

    Returns a :class:`SuiteSummary`. Failures of single runs are recorded in the store, never raised.

    Raises:
        ConfigurationError: invalid suite, missing data roots, or a store in use / of another suite.
    """
    t0 = time.perf_counter()
    if executor == "local" and address:  # used to be ignored: the suite then ran on this machine alone
        raise ConfigurationError(f"--address {address}: joining a Ray cluster needs --executor ray")
    if executor == "ray" and threads is not None:  # used to be ignored
        raise ConfigurationError(
            "--threads is for the local executor; a Ray run uses resources.cpus threads "
            f"(--set resources.cpus={threads})"
        )
    if executor == "local":
        from .executors import LocalExecutor, available_cores

        if workers is None:
            per_run = max(1, int(suite.resources.cpus))
            workers = 1 if suite.resources.gpus > 0 else max(1, available_cores() // per_run)

        ex: Any = LocalExecutor(workers=workers, threads=threads, plugins=plugin_modules(suite.plugins))
        gpus = 0.0
    elif executor == "ray":
        from .executors import RayExecutor

        ex = RayExecutor(address=address, workers=workers, cpus=suite.resources.cpus,
                         gpus=suite.resources.gpus, plugins=plugin_modules(suite.plugins), init_kwargs=ray_init)
        gpus = suite.resources.gpus
    else:
        raise ConfigurationError(f"--executor: got '{executor}'; allowed values: local, ray")
    specs = expand(suite, device_type=device_type_for(suite, gpus))
    probe_data(suite, specs)
    by_key = {s.key: s for s in specs}
    store = Store(out)
    with store:
        store.prepare(suite.name, resolved_yaml(suite), specs)
        skipped = sum(1 for k in store.order if store.entries[k]["status"] == "done")
        todo = [k for k in store.order if store.entries[k]["status"] != "done"]
        summary = SuiteSummary(out=store.root, suite=suite.name, counts={}, skipped=skipped)
        if todo:
            ex.start()
            try:
                _schedule(store, ex, todo, by_key, suite, summary, progress)
            except BaseException:  # Ctrl-C or an error of the driver: stop the runs in flight, don't wait for them
                ex.abort()
                raise
            ex.close()
        summary.counts = {s: sum(1 for e in store.entries.values() if e["status"] == s)
                          for s in ("done", "failed", "pending", "running") if
                          any(e["status"] == s for e in store.entries.values())}
    summary.wall_s = time.perf_counter() - t0
    return summary


def _schedule(store: Store, ex: LocalExecutor | RayExecutor, todo: list[str], by_key: dict[str, RunSpec],
              suite: Suite, summary: SuiteSummary, progress: Callable[[str, dict[str, Any]], None] | None) -> None:
    waiting = list(todo)  # not yet submitted, in index order (baselines first)
    inflight = 0
    bad_data: dict[str, str] = {}  # benchmark entry -> error of its data

    def fail_unstarted(key: str, error: str) -> None:
        e = store.update(key, status="failed", error=error, traceback=None, started=None, finished=now(),
                         wall_s=None, results=None)
        summary.failed.append(e)
        if progress:
            progress("failed", e)

    while waiting or inflight:
        # release runs whose baselines are done; fail those whose baselines failed
        still = []
        for key in waiting:
            spec = by_key[key]
            if spec.benchmark in bad_data:
                fail_unstarted(key, f"not run: the data of benchmark '{spec.benchmark}' is missing or broken "
                                    f"({bad_data[spec.benchmark]})")
                continue
            dep_status = [store.entries[d]["status"] for d in spec.deps]
            if any(s == "failed" for s in dep_status):
                failed = [by_key[d].label for d in spec.deps if store.entries[d]["status"] == "failed"]
                fail_unstarted(key, f"not run: its single-task baseline(s) {failed} (seed {spec.seed}) failed; "
                                    "see their errors, fix the cause and rerun the suite")
                continue
            if inflight < ex.capacity and all(s == "done" for s in dep_status):
                e = store.update(key, status="running", attempts=store.entries[key]["attempts"] + 1, started=now(),
                                 finished=None, wall_s=None, executor=ex.name)
                if progress:
                    progress("start", e)
                job: dict[str, Any] = {
                    "key": key,
                    "config": {**spec.config.model_dump(mode="json"), "out_dir": str(store.run_dir(key))},
                    "baseline": _baseline(store, spec, by_key) if spec.deps else None,
                    "tensorboard": suite.tensorboard,
                    "plugins": plugin_modules(suite.plugins),  # and $MTLENS_PLUGINS (--plugin): Ray workers too
                }
                store.run_dir(key).mkdir(parents=True, exist_ok=True)
                ex.submit(job)
                inflight += 1
                summary.ran.append(key)
            else:
                still.append(key)
        waiting = still
        if not inflight:
            if waiting:  # pragma: no cover - dependencies always come earlier in the order
                raise RuntimeError(f"suite scheduler stalled with {len(waiting)} runs waiting")
            break
        for job, outcome in ex.wait():
            inflight -= 1
            key = job["key"]
            spec = by_key[key]
            extra = {k: outcome.get(k) for k in ("peak_memory_bytes", "memory_kind", "threads") if k in outcome}
            if outcome["status"] == "done" and read_results(store.run_dir(key) / "results.json") is not None:
                e = store.update(key, status="done", error=None, traceback=None, started=outcome["started"] or
                                 store.entries[key]["started"], finished=outcome["finished"],
                                 wall_s=outcome["wall_s"], results=f"{store.entries[key]['dir']}/results.json",
                                 **extra)
                if progress:
                    progress("done", e)
            else:
                error = outcome.get("error") or "the run reported success but wrote no readable results.json"
                e = store.update(key, status="failed", error=error, traceback=outcome.get("traceback"),
                                 finished=outcome["finished"], wall_s=outcome["wall_s"], results=None, **extra)
                summary.failed.append(e)
                if outcome.get("error_type") in _DATA_ERRORS:
                    bad_data[spec.benchmark] = error
                if progress:
                    progress("failed", e)
