"""What a run writes while it trains: JSONL lines, TensorBoard scalars, environment facts.

``log.jsonl`` has one JSON object per line, each with ``"type"``: ``"step"`` (every
``train.log_every`` steps and on every monitored step: losses, task weights, learning rate,
step time, diagnostics) or ``"epoch"`` (epoch-mean train losses, validation metrics and losses,
selection score). Every line carries a chained ``content_sha256`` (the SHA-256 of the previous
line's hash and the line's canonical JSON, :func:`mtlens.storage.seal_jsonl_line`), so that an
edited, deleted or reordered line or a flipped bit is detected when the file is read. The
writer reports its byte offset so that a resumed run truncates the lines written after its
checkpoint (verifying the chain up to there) and the file ends up as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..storage import read_jsonl_verified, seal_jsonl_line


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(_clean(obj), allow_nan=False, **kw)


class JsonlWriter:
    """Append-only, hash-chained JSONL file; :meth:`truncate` cuts it back to a checkpointed offset.

    Raises:
        IntegrityError: appending to (or truncating) an existing file whose hash chain does not verify.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existing = self.path.is_file() and self.path.stat().st_size > 0
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._prev: str | None = None if existing else ""  # the chain's last hash, read lazily

    def write(self, record: dict[str, Any]) -> None:
        if self._prev is None:  # appending to an existing file: continue its (verified) chain
            self._fh.flush()
            self._prev = read_jsonl_verified(self.path)[1]
        line, self._prev = seal_jsonl_line(self._prev, record)
        self._fh.write(line + "\n")

    def flush(self) -> None:
        self._fh.flush()

    def offset(self) -> int:
        self._fh.flush()
        return self._fh.tell()

    def truncate(self, offset: int) -> None:
        self._fh.flush()
        size = self.path.stat().st_size
        if offset > size:
            from ..errors import CheckpointError

            raise CheckpointError(
                f"'{self.path}' is shorter ({size} bytes) than the checkpoint recorded ({offset}); the run "
                "directory was modified. Restart the run from scratch in a new --out directory"
            )
        self._prev = read_jsonl_verified(self.path, stop_at=offset)[1]
        self._fh.truncate(offset)
        self._fh.seek(offset)

    def close(self) -> None:
        self._fh.close()


def read_jsonl(path: str | os.PathLike, *, allow_torn_tail: bool = False) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` written by :class:`JsonlWriter`, its hash chain verified.

    ``allow_torn_tail`` skips an unparsable last line (a run killed while writing it).

    Raises:
        IntegrityError: a line that is not JSON, carries no hash or breaks the chain (file and
            line number named).
    """
    return read_jsonl_verified(path, allow_torn_tail=allow_torn_tail)[0]


class Scalars:
    """TensorBoard scalars (``torch.utils.tensorboard``); a no-op when disabled."""

    def __init__(self, log_dir: str | os.PathLike | None, purge_step: int | None = None):
        self._w = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._w = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def add(self, values: dict[str, Any], step: int) -> None:
        if self._w is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                self._w.add_scalar(k, float(v), step)

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the git checkout holding mtlens (``+dirty`` when modified), or None."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded in results.json."""
    import numpy
    import torch

    from .. import __version__

    env: dict[str, Any] = {
        "mtlens": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env
