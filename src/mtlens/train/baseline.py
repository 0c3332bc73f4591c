"""Single-task (STL) baselines: trained by the same loop, cached by configuration, or read from a file.

``baseline: auto`` trains one single-task model per task with the run's data, model, optimiser,
schedule, epochs, batch size and seed (plain task loss: EW, no regulariser, no loss transform;
:meth:`RunConfig.for_stl`) — or reuses an earlier one: each STL run lives in
``<baseline_cache>/<benchmark>-<task>-<hash>``, the hash covering every setting that changes its
result (plus the mtlens version and the device type). A cache entry without ``results.json``
(a killed baseline run) is resumed from its checkpoint.

``baseline: PATH`` reads a JSON file: a ``baseline.json`` written by mtlens (``stl_task: all``
or ``baseline: auto`` runs), a ``results.json``, or a plain ``{task: {metric: value}}`` mapping
(taken as test metrics; model selection then cannot use Δp_task).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import ConfigurationError, IntegrityError, OutputPathError
from ..storage import DirectoryLock, atomic_write_text, output_path_error, read_json, write_json
from ..storage import _describe as describe_holder
from ..tasks.spec import get_benchmark
from .build import default_out_dir, resolve_device
from .checkpoint import CHECKPOINT_NAME
from .config import RunConfig, default_cache_dir
from .loop import TrainingLoop
from .records import RESULTS_NAME

if TYPE_CHECKING:
    from rich.console import Console

    from ..tasks.spec import BenchmarkSpec

_NOT_IN_KEY = ("out_dir", "name", "baseline_cache", "checkpoint", "monitor")


def stl_cache_key(stl_cfg: RunConfig, device_type: str) -> str:
    """Hash of what determines a single-task run's result (not paths, logging or checkpoint cadence)."""
    d = {k: v for k, v in stl_cfg.model_dump(mode="json").items() if k not in _NOT_IN_KEY}
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("log_every", "device")}
    d["data"] = {k: v for k, v in d["data"].items() if k != "num_workers"}
    if d["data"].get("root"):
        d["data"]["root"] = str(Path(d["data"]["root"]).expanduser().resolve())
    d["_mtlens"] = __version__
    d["_device"] = device_type
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _read_results(path: Path, *, required: bool = False) -> dict[str, Any]:
    """A JSON file, its content hash checked when present (always required for mtlens's own cache)."""
    try:
        return read_json(path, required=required)
    except OSError as exc:
        raise ConfigurationError(f"baseline file '{path}' cannot be read ({exc}); fix or delete it") from None


def train_stl(
    cfg: RunConfig,
    tasks: list[str],
    dirs: dict[str, Path],
    *,
    quiet: bool,
    console: Console | None,
    reuse: bool,
    wait: float = 0.0,
) -> dict[str, Any]:
    """Train (or reuse/resume) one STL run per task into ``dirs[task]``; return the combined baseline.

    Each ``dirs[task]`` is locked while it is read or trained; ``wait`` is how long to wait for a
    lock another process holds (``math.inf``: until it is free) before
    :class:`~mtlens.errors.LockHeldError`."""
    metrics: dict[str, dict[str, Any]] = {"val": {}, "test": {}}
    runs: dict[str, str] = {}
    device_type = resolve_device(cfg.train.device).type
    for t in tasks:
        d = dirs[t]
        res_path = d / RESULTS_NAME

        def waiting(holder, t=t, d=d):
            if console is not None and not quiet:
                console.print(f"[dim]STL baseline '{t}': waiting for {d}, in use by {describe_holder(holder)}[/]")

        # one writer per entry: a second run needing the same baseline waits for it, then reuses it
        try:
            lock = DirectoryLock(d, purpose=f"STL baseline {t}", timeout=wait, on_wait=waiting).acquire()
        except OSError as exc:
            raise output_path_error(exc, option="baseline_cache") from None
        try:
            if reuse and res_path.exists():
                try:
                    res = _read_results(res_path, required=True)
                except IntegrityError as exc:
                    raise IntegrityError(f"{exc}. To retrain this baseline, delete the directory '{d}'") from None
                if console is not None and not quiet:
                    console.print(f"[dim]STL baseline '{t}': reusing {d}[/]")
            else:
                stl = cfg.for_stl(t).model_copy(update={"out_dir": str(d)})
                stl = RunConfig.model_validate(stl.model_dump())
                resume = (d / CHECKPOINT_NAME).exists()
                if console is not None and not quiet:
                    console.print(f"[bold]STL baseline '{t}'[/]: {'resuming' if resume else 'training'} in {d}")
                res = TrainingLoop(stl, quiet=quiet, console=console).fit(resume=resume)
        finally:
            lock.release()
        for split in ("val", "test"):
            metrics[split][t] = res["metrics"][split][t]
        runs[t] = str(d)
    return {
        "kind": "stl-baseline",
        "benchmark": cfg.data.benchmark,
        "tasks": tasks,
        "device": device_type,
        "metrics": metrics,
        "runs": runs,
    }


def ensure_baselines(cfg: RunConfig, *, quiet: bool = False, console: Console | None = None) -> dict[str, Any]:
    """STL baselines of every task of ``cfg``'s benchmark, from the cache or trained now."""
    spec = get_benchmark(cfg.data.benchmark)
    cache = Path(cfg.baseline_cache).expanduser() if cfg.baseline_cache else default_cache_dir()
    device_type = resolve_device(cfg.train.device).type
    dirs = {t: cache / f"{spec.name}-{t}-{stl_cache_key(cfg.for_stl(t), device_type)}" for t in spec.task_names}
    base = train_stl(cfg, list(spec.task_names), dirs, quiet=quiet, console=console, reuse=True, wait=math.inf)
    base["source"] = "auto"
    base["cache"] = str(cache)
    return base


def load_baseline_file(path: str | Path, spec: BenchmarkSpec, tasks: list[str]) -> dict[str, Any]:
    """Read and check a baseline JSON file (see the module docstring for the accepted shapes)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigurationError(
            f"baseline file '{p}' does not exist; use baseline=auto, or write one with "
            "`mtlens train ... --set stl_task=all` (its baseline.json)"
        )
    obj = _read_results(p)
    if (
        isinstance(obj, dict)
        and isinstance(obj.get("metrics"), dict)
        and ("val" in obj["metrics"] or "test" in obj["metrics"])
    ):
        metrics = {k: obj["metrics"][k] for k in ("val", "test") if obj["metrics"].get(k)}
    elif isinstance(obj, dict) and ("val" in obj or "test" in obj):
        metrics = {k: obj[k] for k in ("val", "test") if obj.get(k)}
    elif isinstance(obj, dict):
        metrics = {"test": obj}
    else:
        raise ConfigurationError(f"baseline file '{p}' must hold a JSON object")
    for split, m in metrics.items():
        for t in tasks:
            if t not in m:
                raise ConfigurationError(
                    f"baseline file '{p}' has no {split} metrics of task '{t}' (it has {sorted(m)}); "
                    "every task "
                    f"of '{spec.name}' needs one"
                )
            missing = [k for k in spec.tasks[t].metrics if k not in m[t]]
            if missing:
                raise ConfigurationError(f"baseline file '{p}': {split} metrics of '{t}' lack {missing}")
            metrics[split][t] = {k: float(m[t][k]) for k in spec.tasks[t].metrics}
        metrics[split] = {t: metrics[split][t] for t in tasks}
    if "test" not in metrics:
        raise ConfigurationError(f"baseline file '{p}' has no test metrics")
    return {"kind": "stl-baseline", "source": str(p), "metrics": metrics}


def resolve_baseline(cfg: RunConfig, *, quiet: bool = False, console: Console | None = None) -> dict[str, Any] | None:
    """The baseline ``cfg.baseline`` names: None, ``auto`` (:func:`ensure_baselines`) or a file
    (:func:`load_baseline_file`)."""
    if cfg.baseline is None:
        return None
    if cfg.baseline == "auto":
        return ensure_baselines(cfg, quiet=quiet, console=console)
    spec = get_benchmark(cfg.data.benchmark)
    return load_baseline_file(cfg.baseline, spec, list(spec.task_names))


def train_all_stl(cfg: RunConfig, *, quiet: bool = False, console: Console | None = None,
                  resume: bool = False) -> dict[str, Any]:
    """``stl_task: all``: one STL run per task in ``out_dir/stl-<task>``, then ``out_dir/baseline.json``."""
    spec = get_benchmark(cfg.data.benchmark)
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg)
    try:
        lock = DirectoryLock(out, purpose="mtlens train stl_task=all").acquire()
    except OSError as exc:
        raise output_path_error(exc) from None
    try:
        if not resume and (out / "baseline.json").exists():
            raise ConfigurationError(f"'{out}' already holds STL baselines; use --resume or another --out")
        atomic_write_text(out / "config.yaml", cfg.to_yaml())  # lets `mtlens train --out DIR --resume` continue
        base_cfg = RunConfig.model_validate({**cfg.model_dump(), "stl_task": None})
        dirs = {t: out / f"stl-{t}" for t in spec.task_names}
        base = train_stl(base_cfg, list(spec.task_names), dirs, quiet=quiet, console=console, reuse=resume)
        base["source"] = str(out / "baseline.json")
        write_json(out / "baseline.json", base)
    except OSError as exc:
        if isinstance(exc, OutputPathError):
            raise
        raise output_path_error(exc) from None
    finally:
        lock.release()
    return base
