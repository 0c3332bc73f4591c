"""The results store of a suite: one directory per run, named by its configuration hash, plus an index.

Layout (a contract with :mod:`mtlens.bench.report`; keys never change meaning)::

    DIR/suite.yaml            the resolved suite (after --set/--seeds/--root)
    DIR/index.json            {"format": "mtlens-bench-index", "version": 1, "suite": name, "runs": [entry, ...]}
    DIR/runs/<key>/           a multi-task run: the trainer's directory (config.yaml, results.json,
                              log.jsonl, checkpoint.pt, best.pt, baseline.json) + run.json
    DIR/baselines/<benchmark>-<task>-<key>/
                              a single-task baseline run (same files), listed in the index with kind "stl"
    DIR/report/               written by mtlens.bench.report.write_report(DIR)

Each index entry (also stored as ``run.json`` in the run's directory)::

    key        configuration hash (16 hex digits)
    label      "mgda (feature)", "ew + rep_mtl", "STL left"
    benchmark  the suite's benchmark entry
    method     method label ("stl" for baselines)
    level      "loss" | "param" | "feature"
    variant    "none" | "rep_mtl" | "rep_mtl_tsr" | "rep_mtl_csa" | another variant label
    seed       int
    kind       "mtl" | "stl"
    task       the task of an STL run, else null
    status     "pending" | "running" | "done" | "failed"
    attempts   how many times the run was started
    error      one line ("ExceptionType: message") of the last failure, else null
    traceback  the last failure's traceback, else null
    started, finished   ISO 8601 UTC times of the last attempt (null until then)
    wall_s     wall-clock seconds of the last attempt (null until it ended)
    results    path of results.json relative to DIR once done, else null
    dir        the run directory relative to DIR
    peak_memory_bytes, memory_kind
               peak memory of the last attempt: "cuda_max_allocated" (torch.cuda.max_memory_allocated)
               or "cpu_peak_rss" (the worker process's peak resident set, Linux VmHWM reset at the
               start of the run: includes the interpreter and libraries, so compare runs of one suite only)
    threads    torch intra-op threads the run used; executor: "local" | "ray"

Every file is written atomically (temporary file, fsync, ``os.replace``; :mod:`mtlens.storage`),
so a process killed at any instant leaves the previous or the new version; ``index.json`` and
``run.json`` carry a ``content_sha256`` key like every JSON file mtlens writes. A run counts as
done only when its ``results.json`` exists and its content hash verifies; a run found ``running``
when the store is opened was interrupted and is resumed from its checkpoint. One driver at a
time: the store holds :class:`mtlens.storage.DirectoryLock` on ``DIR`` while a suite runs (and
each trainer holds its run directory's).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError, IntegrityError
from ..storage import atomic_write_text, read_json, write_json

if TYPE_CHECKING:  # annotations only (suite imports this module)
    from ..storage import DirectoryLock
    from ..train.config import RunConfig
    from .suite import RunSpec

FORMAT = "mtlens-bench-index"
VERSION = 1
STATUSES = ("pending", "running", "done", "failed")
_NOT_IN_KEY = ("out_dir", "name", "baseline_cache")


def run_key(cfg: RunConfig, device_type: str) -> str:
    """Hash of everything that determines a run's result: the whole configuration except its
    name, output and baseline-cache paths, plus the mtlens version and the device type (cpu/cuda)."""
    from .. import __version__

    d = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_IN_KEY}
    if d["data"].get("root"):
        d["data"]["root"] = str(Path(d["data"]["root"]).expanduser().resolve())
    d["_mtlens"] = __version__
    d["_device"] = device_type
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_results(path: Path) -> dict[str, Any] | None:
    """A run's verified results.json, or None when absent, unreadable or corrupt (its content hash
    does not match): the run then counts as not done, and rerunning it reports the problem."""
    try:
        obj = read_json(path, required=False)
    except (OSError, IntegrityError):
        return None
    return obj if isinstance(obj, dict) and obj.get("format") == "mtlens-results" else None


class Store:
    """The directory of one suite's results (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self._lock: DirectoryLock | None = None
        self.entries: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.suite_name: str | None = None

    # -- locking -------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the store's exclusive lock (:class:`~mtlens.storage.DirectoryLock` on ``DIR``);
        :class:`~mtlens.errors.LockHeldError` naming the holder when another driver has it."""
        from ..storage import DirectoryLock, output_path_error

        lock = DirectoryLock(self.root, purpose=f"mtlens bench {self.suite_name or ''}".strip())
        try:
            lock.acquire()
        except OSError as exc:
            raise output_path_error(exc) from None
        self._lock = lock

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Store:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    # -- index -----------------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    def read_index(self) -> dict[str, Any] | None:
        p = self.index_path
        if not p.exists():
            return None
        try:
            obj = read_json(p, required=False)
        except IntegrityError as exc:
            raise IntegrityError(
                f"{exc}. The index only mirrors the run directories: delete it: the next run rebuilds it from "
                f"their run.json and results.json files ({p})"
            ) from None
        except OSError as exc:
            raise ConfigurationError(f"'{p}' cannot be read ({exc}); it is not an mtlens bench store") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ConfigurationError(f"'{p}' is not an mtlens bench index (format {obj.get('format')!r})")
        if obj.get("version") != VERSION:
            raise ConfigurationError(f"'{p}' has index version {obj.get('version')}; this mtlens reads {VERSION}")
        return obj

    def prepare(self, suite_name: str, suite_yaml: str, specs: Sequence[RunSpec]) -> None:
        """Write the resolved suite and the index of ``specs`` (a list of RunSpec), merging what an
        earlier invocation left: done runs stay done (when their results.json reads back), runs
        found ``running`` were interrupted and become ``pending``, failed ones keep their error
        until they are retried."""
        old = self.read_index()
        if old is None and (self.root / "suite.yaml").is_file():  # index deleted: the suite file still says whose
            import yaml

            try:
                prev_name = (yaml.safe_load((self.root / "suite.yaml").read_text()) or {}).get("name")
            except yaml.YAMLError:
                prev_name = None
            if prev_name and prev_name != suite_name:
                old = {"suite": prev_name}
        if old is not None and old.get("suite") != suite_name:
            raise ConfigurationError(
                f"'{self.root}' holds the results of suite '{old.get('suite')}', not '{suite_name}'; "
                "choose another --out"
            )
        previous = {e["key"]: e for e in (old or {}).get("runs", [])}
        self.suite_name = suite_name
        self.entries, self.order = {}, []
        for s in specs:
            e = {**s.entry(), "status": "pending", "attempts": 0, "error": None, "traceback": None,
                 "started": None, "finished": None, "wall_s": None, "results": None, "dir": s.relpath}
            prev = previous.get(s.key)
            on_disk = self._read_run_json(s.relpath)
            for src in (prev, on_disk):
                if src:
                    for k in ("attempts", "error", "traceback", "started", "finished", "wall_s", "status",
                              "peak_memory_bytes", "memory_kind", "threads", "executor"):
                        if k in src:
                            e[k] = src[k]
            res_path = self.root / s.relpath / "results.json"
            if read_results(res_path) is not None:
                e["status"] = "done"
                e["results"] = f"{s.relpath}/results.json"
                e["error"] = e["traceback"] = None
            elif e["status"] in ("done", "running"):
                e["status"] = "pending"  # interrupted (or its results vanished): run again, resuming
            self.entries[s.key] = e
            self.order.append(s.key)
        if not (self.root / "suite.yaml").is_file() or (self.root / "suite.yaml").read_text() != suite_yaml:
            atomic_write_text(self.root / "suite.yaml", suite_yaml)
        on_disk_runs = {s.key: self._read_run_json(s.relpath) for s in specs}
        for key in self.order:
            d = on_disk_runs.get(key)
            if d is None or {k: v for k, v in d.items() if k != "content_sha256"} != self.entries[key]:
                self._write_run_json(key)
        current = {"format": FORMAT, "version": VERSION, "suite": suite_name,
                   "runs": [self.entries[k] for k in self.order]}
        if old is None or {k: v for k, v in old.items() if k != "content_sha256"} != current:
            self.write_index()  # unchanged stores are not rewritten: a rerun of a finished suite writes nothing

    def _read_run_json(self, relpath: str) -> dict[str, Any] | None:
        try:
            obj = read_json(self.root / relpath / "run.json", required=False)
        except (OSError, IntegrityError):
            return None
        return obj if isinstance(obj, dict) else None

    def _write_run_json(self, key: str) -> None:
        e = self.entries[key]
        d = self.root / e["dir"]
        if d.exists() or e["status"] != "pending" or e["attempts"]:
            write_json(d / "run.json", e)

    def write_index(self) -> None:
        write_json(self.index_path, {"format": FORMAT, "version": VERSION, "suite": self.suite_name,
                                     "runs": [self.entries[k] for k in self.order]})

    def update(self, key: str, **fields: Any) -> dict[str, Any]:
        """Change a run's entry, then write its run.json and the index (both atomically)."""
        e = self.entries[key]
        unknown = set(fields) - set(e) - {"peak_memory_bytes", "memory_kind", "threads", "executor"}
        if unknown:
            raise KeyError(f"unknown run fields {sorted(unknown)}")
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {fields['status']!r}")
        e.update(fields)
        self._write_run_json(key)
        self.write_index()
        return e

    def run_dir(self, key: str) -> Path:
        return self.root / self.entries[key]["dir"]

    def results(self, key: str) -> dict[str, Any] | None:
        e = self.entries[key]
        return read_results(self.root / e["dir"] / "results.json")


def load_index(root: str | os.PathLike) -> dict[str, Any]:
    """The index of a finished (or partial) store, for readers such as the report."""
    idx = Store(root).read_index()
    if idx is None:
        raise ConfigurationError(f"'{root}' holds no index.json; run `mtlens bench SUITE --out {root}` first")
    return idx
