"""Files mtlens writes: atomic, sealed with a content hash, verified on read; directories locked by one writer.

Three building blocks, shared by the trainer (run directories, the single-task baseline cache)
and the benchmark store:

**Atomic writes** (:func:`atomic_write`): the bytes go to a temporary file ``.NAME.<random>.tmp``
in the same directory, are flushed and fsynced, and then :func:`os.replace` moves them over
``NAME``. A process killed at any instant leaves either the old or the new file, never a torn
one. A kill *between* creating and renaming the temporary file (``SIGKILL`` cannot be caught)
leaves the temporary file behind; :class:`DirectoryLock` removes such leftovers when it takes a
directory (no other writer can be using them then), and :func:`remove_stale_temps` does it on
demand.

**Content hashes** (:func:`seal`, :func:`verify`, :func:`save_torch`, :func:`load_torch`,
:func:`write_json`, :func:`read_json`): every dictionary mtlens stores carries the key
``content_sha256``, the SHA-256 of its *content* (:func:`content_digest`: every other key and
value, tensors by dtype, shape and raw bytes), computed when it is written and recomputed when
it is read. ``torch.load`` does not check the CRCs of the records inside a ``.pt`` archive, so a
flipped bit in a weight is otherwise loaded silently; here it raises :class:`~mtlens.errors.IntegrityError`
naming the file. Hashing the content, not the bytes, keeps the files ordinary ``torch.save`` /
JSON files (``torch.load`` and ``json.load`` read them as before) and makes the check
independent of how the serialiser lays the bytes out.

**Directory locks** (:class:`DirectoryLock`, :func:`lock_directory`): an exclusive
``fcntl.flock`` on ``DIR/.mtlens.lock``, held for the lifetime of the writer. The file records the
holder (pid, host, start time, command), so a second writer gets
:class:`~mtlens.errors.LockHeldError` naming it (or waits for it, with ``timeout``). The kernel
drops a ``flock`` when its process dies, however it dies, so a lock left by a killed process is
never "stale": the next writer simply takes it (and overwrites the holder record). The lock is
re-entrant within one thread of one process (a trainer inside a benchmark worker that already
holds the directory). ``flock`` is advisory and needs a file system that supports it (local
disks; NFSv4 and Lustre emulate it); where it is unsupported the error says so. The
well-known ``filelock`` package was considered: it truncates the lock file on every attempt,
which would erase the holder record that the error message needs, and is not re-entrant across
instances.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, cast

from .errors import IntegrityError, LockHeldError, MTLensError, OutputPathError

HASH_KEY = "content_sha256"
LOCK_NAME = ".mtlens.lock"
_TMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------------------------------------
# atomic writes
def _tmp_prefix(name: str) -> str:
    return f".{name}."


class _Recorder:
    """A file object that remembers the OSError its ``write`` raised (``torch.save`` turns it into a RuntimeError)."""

    def __init__(self, fh: IO):
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, mode: str, write: Callable[[IO[Any]], object]) -> None:
    """Call ``write`` on a temporary file (opened with ``mode``) next to ``path``, fsync, then ``os.replace``.

    Raises whatever ``write`` or the file system raises — an ``OSError`` carrying ``filename``
    for a missing, read-only or full destination, also when the writer (``torch.save``) wrapped
    it in another exception; the temporary file is removed on every error that Python sees."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=_TMP_SUFFIX, dir=path.parent)
    rec = None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; the file gets what open() would give it
        with os.fdopen(fd, mode) as fh:
            rec = _Recorder(fh)
            write(cast(IO[Any], rec))  # a file object by duck typing (write recorded, the rest delegated)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if rec is not None and rec.error is not None and exc is not rec.error:
            err = rec.error
            raise OSError(err.errno, err.strerror, str(path)) from exc
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, "w", lambda fh: fh.write(text))


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``directory``.

    Only call it while no other process writes there (e.g. holding its :class:`DirectoryLock`).
    Returns the removed paths."""
    d = Path(directory)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        if p.name.startswith(".") and p.name.endswith(_TMP_SUFFIX) and p.is_file() and p.name != LOCK_NAME:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------
# content hashes
def _feed(h: Any, o: Any) -> None:  # noqa: C901 - one branch per type
    import numpy as np
    import torch

    if o is None:
        h.update(b"N")
    elif isinstance(o, bool):
        h.update(b"B1" if o else b"B0")
    elif isinstance(o, int):
        s = str(o).encode()
        h.update(b"I%d:" % len(s) + s)
    elif isinstance(o, float):
        h.update(b"F" + struct.pack("<d", o))
    elif isinstance(o, str):
        s = o.encode("utf-8", "surrogatepass")
        h.update(b"S%d:" % len(s) + s)
    elif isinstance(o, (bytes, bytearray)):
        h.update(b"Y%d:" % len(o) + bytes(o))
    elif isinstance(o, torch.Tensor) and o.layout == torch.strided and not o.is_quantized and o.device.type != "meta":
        t = o.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(o.shape)}:".encode())
        if t.numel():
            # numpy's stubs declare the buffer protocol (__buffer__) only for Python >= 3.12
            h.update(memoryview(t.view(torch.uint8).numpy()))  # type: ignore[arg-type]
    elif isinstance(o, np.ndarray) and o.dtype != object:
        h.update(f"A{o.dtype.str}{o.shape}:".encode())
        h.update(memoryview(np.ascontiguousarray(o)).cast("B"))  # type: ignore[arg-type]  # as above
    elif isinstance(o, np.generic):
        h.update(f"G{o.dtype.str}:".encode() + o.tobytes())
    elif isinstance(o, Mapping):
        h.update(b"D%d:" % len(o))
        for k, v in o.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(o, (list, tuple)):
        h.update((b"L%d:" if isinstance(o, list) else b"U%d:") % len(o))
        for v in o:
            _feed(h, v)
    elif isinstance(o, (set, frozenset)):
        parts = sorted(content_digest(v) for v in o)
        h.update(b"E%d:" % len(parts) + "".join(parts).encode())
    else:  # other picklable objects: their pickle (deterministic for the plain types state dicts hold)
        h.update(f"P{type(o).__module__}.{type(o).__qualname__}:".encode())
        h.update(pickle.dumps(o, protocol=4))


def content_digest(obj: Any) -> str:
    """SHA-256 (hex) of a nested structure of dicts, lists, tuples, tensors, arrays and scalars.

    Dictionaries are hashed in insertion order (``torch.save``/``torch.load`` and ``json`` keep
    it); tensors by dtype, shape and raw bytes wherever they live (CUDA tensors are copied to the
    CPU), so a structure and its ``torch.load(..., map_location="cpu")`` round trip have the same
    digest."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def seal(payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` plus ``content_sha256`` = :func:`content_digest` of every other key."""
    body = {k: v for k, v in payload.items() if k != HASH_KEY}
    return {**body, HASH_KEY: content_digest(body)}


def verify(obj: Any, path: str | os.PathLike, *, required: bool = True) -> Any:
    """Check the ``content_sha256`` of a loaded dictionary; return it unchanged.

    Raises:
        IntegrityError: the recomputed digest differs (the file was corrupted or edited after it
            was written), or ``required`` and the dictionary carries none.
    """
    if not isinstance(obj, Mapping) or HASH_KEY not in obj:
        if required:
            raise IntegrityError(
                f"'{path}' carries no content hash ({HASH_KEY}): it was not written by this mtlens version or "
                "was edited. Restore the file written by mtlens, or re-create it (re-run, or delete it and resume)"
            )
        return obj
    body = {k: v for k, v in obj.items() if k != HASH_KEY}
    if content_digest(body) != obj[HASH_KEY]:
        raise IntegrityError(
            f"'{path}' is corrupt: its content does not match the hash recorded when it was written "
            "(a flipped bit on disk or in transfer, or an edit). Restore an intact copy, or delete it and "
            "re-create it (re-run, or resume from an intact checkpoint)"
        )
    return obj


def save_torch(payload: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` the :func:`seal`-ed ``payload`` to ``path`` atomically."""
    import torch

    sealed = seal(payload)
    atomic_write(path, "wb", lambda fh: torch.save(sealed, fh))


def load_torch(path: str | os.PathLike, *, map_location: Any = "cpu", required: bool = True) -> dict[str, Any]:
    """``torch.load`` a file written by :func:`save_torch` (pickles: trusted files only) and :func:`verify` it.

    Raises:
        IntegrityError: missing or mismatched content hash.
        OSError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError: unreadable file
            (callers turn these into their own error naming the file).
    """
    import torch

    obj = torch.load(path, map_location=map_location, weights_only=False)
    return verify(obj, path, required=required)


def _json_canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _json_clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf: "nan", "inf", "-inf"
    if isinstance(v, Mapping):
        return {str(k) if not isinstance(k, str) else k: _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    return v


def json_digest(obj: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of ``obj`` without ``content_sha256``."""
    body = {k: v for k, v in obj.items() if k != HASH_KEY}
    return hashlib.sha256(_json_canonical(body).encode()).hexdigest()


def write_json(path: str | os.PathLike, obj: Mapping[str, Any], *, indent: int | None = 2) -> dict[str, Any]:
    """Write a JSON object atomically with ``content_sha256`` (:func:`json_digest`) as its last key.

    Non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has none).
    Returns the object as written (cleaned, with its hash)."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"write_json stores JSON objects (dicts), got {type(obj).__name__}")
    body = json.loads(_json_canonical(_json_clean({k: v for k, v in obj.items() if k != HASH_KEY})))
    body = {str(k): body[str(k)] for k in obj if k != HASH_KEY}  # keep the caller's key order in the file
    sealed = {**body, HASH_KEY: json_digest(body)}
    atomic_write_text(path, json.dumps(sealed, indent=indent, allow_nan=False) + "\n")
    return sealed


def read_json(path: str | os.PathLike, *, required: bool = True) -> Any:
    """Read a JSON file and check its ``content_sha256`` (when ``required``, or whenever present).

    Raises:
        IntegrityError: unparsable JSON, a mismatched hash, or (``required``) no hash.
        FileNotFoundError / OSError: the file cannot be read.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IntegrityError(
            f"'{path}' is not valid JSON ({exc.msg} at line {exc.lineno}); it is truncated or corrupt. "
            "Restore an intact copy, or delete it and re-create it"
        ) from None
    if not isinstance(obj, dict) or HASH_KEY not in obj:
        if required:
            verify(obj, path, required=True)
        return obj
    if json_digest(obj) != obj[HASH_KEY]:
        raise IntegrityError(
            f"'{path}' is corrupt: its content does not match the hash recorded when it was written "
            "(a flipped bit on disk or in transfer, or an edit). Restore an intact copy, or delete it and "
            "re-create it"
        )
    return obj


def jsonl_line_digest(prev: str, body: Mapping[str, Any]) -> str:
    """The chained hash of one JSONL record: SHA-256 of ``prev`` (the previous line's hash, ``""``
    for the first line), a newline and the canonical JSON of ``body`` (without ``content_sha256``).

    Chaining makes a deleted, inserted or reordered line detectable, not only an edited one."""
    clean = {k: v for k, v in body.items() if k != HASH_KEY}
    return hashlib.sha256((prev + "\n" + _json_canonical(clean)).encode()).hexdigest()


def seal_jsonl_line(prev: str, body: Mapping[str, Any]) -> tuple[str, str]:
    """``(line, digest)``: the JSON text (no newline) of ``body`` with its chained ``content_sha256``
    as the last key (non-finite floats as strings), and that digest (the next line's ``prev``)."""
    clean = json.loads(_json_canonical(_json_clean({k: v for k, v in body.items() if k != HASH_KEY})))
    clean = {str(k): clean[str(k)] for k in body if k != HASH_KEY}
    digest = jsonl_line_digest(prev, clean)
    return json.dumps({**clean, HASH_KEY: digest}, allow_nan=False), digest


def read_jsonl_verified(path: str | os.PathLike, *, stop_at: int | None = None,
                        allow_torn_tail: bool = False) -> tuple[list[dict[str, Any]], str]:
    """Read a JSONL file written with :func:`seal_jsonl_line` and verify its hash chain.

    Args:
        path: the file.
        stop_at: read only the first ``stop_at`` bytes (a checkpointed offset; must fall at the
            end of a line).
        allow_torn_tail: skip an unparsable *last* line (a writer killed mid-line) instead of raising.

    Returns:
        ``(records, last_digest)``: the records without their hash key, and the hash of the last
        line (``""`` for an empty file) from which a writer continues the chain.

    Raises:
        IntegrityError: an unparsable line, a line without a hash, or a hash that does not follow
            from the previous lines — naming the file and the line number.
    """
    data = Path(path).read_bytes()
    if stop_at is not None:
        if stop_at > len(data):
            raise IntegrityError(f"'{path}' is shorter ({len(data)} bytes) than the recorded offset {stop_at}; "
                                 "the file was modified. Restart the run from scratch in a new directory")
        data = data[:stop_at]
        if data and not data.endswith(b"\n"):
            raise IntegrityError(f"'{path}': the recorded offset {stop_at} does not fall at the end of a line; "
                                 "the file was modified. Restart the run from scratch in a new directory")
    lines = data.decode("utf-8", errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    records: list[dict[str, Any]] = []
    prev = ""
    for i, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if allow_torn_tail and i == len(lines):
                break
            raise IntegrityError(f"'{path}' line {i} is not valid JSON: the file is truncated or corrupt. "
                                 "Restore an intact copy, or resume the run from its checkpoint") from None
        if not isinstance(obj, dict) or HASH_KEY not in obj:
            raise IntegrityError(f"'{path}' line {i} carries no content hash ({HASH_KEY}): the file was not "
                                 "written by this mtlens version or was edited")
        if jsonl_line_digest(prev, obj) != obj[HASH_KEY]:
            raise IntegrityError(f"'{path}' line {i} is corrupt: it does not match the hash chain recorded when "
                                 "it was written (an edited, deleted, inserted or reordered line, or a flipped "
                                 "bit). Restore an intact copy, or resume the run from its checkpoint")
        prev = obj[HASH_KEY]
        records.append({k: v for k, v in obj.items() if k != HASH_KEY})
    return records, prev


# ---------------------------------------------------------------------------------------------
# directory locks
_registry_guard = threading.Lock()
_held: dict[str, dict[str, Any]] = {}  # realpath -> {"pid", "thread", "fd", "count", "info"}


def _describe(info: Mapping[str, Any] | None) -> str:
    if not info:
        return "another process (its holder record is not written yet)"
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    what = f", {info['purpose']}" if info.get("purpose") else ""
    return f"pid {info.get('pid')} on host {info.get('host')}, since {when}{what}"


def read_lock_holder(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The holder record of ``directory``'s lock file (``None`` when absent or unreadable).

    The record stays in the file after its holder exits; only a failed acquisition proves that
    the holder is alive."""
    try:
        text = (Path(directory) / LOCK_NAME).read_text(encoding="utf-8")
        info = json.loads(text)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


class DirectoryLock:
    """Exclusive, re-entrant (per thread) lock of a directory for one writer's lifetime.

    >>> run = Path(tempfile.mkdtemp()) / "demo"
    >>> with DirectoryLock(run, purpose="mtlens train") as lock:  # another process would get LockHeldError
    ...     _ = (run / "notes.txt").write_text("one writer at a time")
    ...     lock.held, read_lock_holder(run)["purpose"]
    (True, 'mtlens train')
    >>> lock.held
    False

    Args:
        directory: the directory to lock (created when missing). The lock file is
            ``directory/.mtlens.lock``.
        purpose: a few words recorded for the holder message (e.g. ``"mtlens train"``).
        timeout: seconds to wait for a held lock: ``0`` fails at once, ``math.inf`` waits forever.
        on_wait: called once with the holder record when the lock is held and ``timeout > 0``
            (e.g. to print "waiting for ...").
        clean_temps: remove leftover temporary files of killed atomic writes once the lock is
            taken (:func:`remove_stale_temps`).

    Raises (from :meth:`acquire` / ``__enter__``):
        LockHeldError: another process (or another thread of this one) holds the lock; the message
            names the holder (pid, host, start time, purpose) and the fix.
        MTLensError: the file system does not support ``flock``.
        OSError: the directory cannot be created or the lock file opened (a path under a file, a
            read-only location); the exception keeps its ``filename``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        purpose: str = "",
        timeout: float = 0.0,
        on_wait: Callable[[dict[str, Any] | None], None] | None = None,
        clean_temps: bool = True,
        poll_s: float = 0.1,
    ):
        self.directory = Path(directory)
        self.purpose = purpose
        self.timeout = float(timeout)
        self.on_wait = on_wait
        self.clean_temps = clean_temps
        self.poll_s = poll_s
        self._key: str | None = None

    @property
    def path(self) -> Path:
        """The lock file."""
        return self.directory / LOCK_NAME

    @property
    def held(self) -> bool:
        """Whether this lock object currently holds the lock."""
        return self._key is not None

    def acquire(self) -> DirectoryLock:
        """Take the lock (see the class docstring for errors); re-entrant within one thread."""
        import fcntl

        if self._key is not None:
            raise RuntimeError(f"DirectoryLock of '{self.directory}' is already acquired by this object")
        self.directory.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.directory)
        me = (os.getpid(), threading.get_ident())
        with _registry_guard:
            entry = _held.get(key)
            if entry is not None and entry["pid"] != me[0]:  # inherited through fork: not ours
                _held.pop(key)
                entry = None
            if entry is not None:
                if entry["thread"] == me[1]:
                    entry["count"] += 1
                    self._key = key
                    return self
                raise LockHeldError(
                    f"'{self.directory}' is locked by another thread of this process ({_describe(entry['info'])}); "
                    "one writer per directory: wait for it to finish or use another directory"
                )
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        deadline = time.monotonic() + self.timeout
        announced = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise MTLensError(
                            f"cannot lock '{self.path}' ({os.strerror(exc.errno or 0)}): this file system does not "
                            "support flock. Put runs, caches and bench stores on a local disk (or NFSv4)"
                        ) from None
                holder = self._holder_record()
                if time.monotonic() >= deadline:
                    raise LockHeldError(
                        f"'{self.directory}' is in use by {_describe(holder)}; two writers would mix their "
                        "files. Wait for that process to finish (or stop it), or use another directory"
                    )
                if not announced and self.on_wait is not None:
                    self.on_wait(holder)
                announced = True
                time.sleep(min(self.poll_s, max(deadline - time.monotonic(), 0.0)))
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "purpose": self.purpose,
                "argv": sys.argv[:8],
            }
            data = json.dumps(info).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing drops the flock if it was taken
            raise
        with _registry_guard:
            _held[key] = {"pid": me[0], "thread": me[1], "fd": fd, "count": 1, "info": info}
        self._key = key
        if self.clean_temps:
            remove_stale_temps(self.directory)
        return self

    def _holder_record(self) -> dict[str, Any] | None:
        for _ in range(5):  # the holder writes its record right after it takes the lock
            info = read_lock_holder(self.directory)
            if info is not None:
                return info
            time.sleep(0.02)
        return None

    def release(self) -> None:
        """Give the lock back (the outermost release of a re-entrant lock closes the file)."""
        key, self._key = self._key, None
        if key is None:
            return
        with _registry_guard:
            entry = _held.get(key)
            if entry is None or entry["pid"] != os.getpid():
                return
            entry["count"] -= 1
            if entry["count"] > 0:
                return
            _held.pop(key)
        os.close(entry["fd"])  # the holder record stays, harmless: the flock is what counts

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DirectoryLock({str(self.directory)!r}, held={self.held})"


@contextlib.contextmanager
def lock_directory(directory: str | os.PathLike, **kwargs: Any) -> Iterator[DirectoryLock]:
    """``with lock_directory(path, purpose=..., timeout=...):`` — :class:`DirectoryLock` as a context manager."""
    lock = DirectoryLock(directory, **kwargs)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------
# output path problems, in one line
def _first_file_ancestor(p: Path) -> Path | None:
    for a in [p, *p.parents]:
        if a.exists():
            return a if not a.is_dir() else None
    return None


def output_path_error(exc: OSError, *, option: str = "--out") -> OutputPathError:
    """An :class:`~mtlens.errors.OutputPathError` naming the path of ``exc`` and the fix for its cause.

    Covers a file where a directory is needed (``option`` is a file, or lies under one), no
    permission / read-only file system, and a full disk or quota."""
    path = Path(exc.filename) if exc.filename else None
    reason = exc.strerror or str(exc)
    code = exc.errno
    if path is not None and code in (errno.EEXIST, errno.ENOTDIR):
        blocker = _first_file_ancestor(path)
        if blocker is not None and blocker == path:
            msg = f"'{path}' is a file, not a directory; give {option} a directory path (or move the file away)"
        elif blocker is not None:
            msg = f"cannot create '{path}': '{blocker}' is a file, not a directory; give {option} a path not under it"
        else:
            msg = f"cannot create '{path}' ({reason}); give {option} a directory path"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        msg = (
            f"cannot write '{path}' ({reason}): the location is read-only; give {option} a writable directory "
            "or fix its permissions"
        )
    elif code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        msg = (
            f"cannot write '{path}' ({reason}): the disk is full; free space (or move the run to another disk) "
            "and continue with --resume"
        )
    else:
        msg = f"cannot write '{path}' ({reason}); check {option} and the file system"
    return OutputPathError(code, msg, str(path) if path is not None else None)


def is_under(path: str | os.PathLike | None, directory: str | os.PathLike) -> bool:
    """Whether ``path`` is ``directory`` or inside it (textually, after making both absolute)."""
    if path is None:
        return False
    p, d = Path(os.path.abspath(path)), Path(os.path.abspath(directory))
    return p == d or d in p.parents
