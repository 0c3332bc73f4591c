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


# ---------------------------------------------------------------------------------------------
# one run's records: log.jsonl + TensorBoard, the live display, results.json
LOG_NAME = "log.jsonl"
RESULTS_NAME = "results.json"


def default_console(console: Any = None) -> Any:
    """``console``, or a ``rich.console.Console`` on stderr."""
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    return console


class RunLog:
    """A run's ``log.jsonl`` and TensorBoard scalars, opened for a fresh run or a resumed one.

    Args:
        out: the run directory.
        tensorboard: write TensorBoard scalars under ``out/tb``.
        global_step: the step the run starts (or resumes) from.
        jsonl_offset: the byte offset the checkpoint recorded (``0`` fresh; ``-1``: the log was lost
            at resume — a note line says so and the log starts anew).
        resume: the run continues from a checkpoint (TensorBoard purges the steps after it).
    """

    def __init__(self, out: Path, *, tensorboard: bool, global_step: int, jsonl_offset: int, resume: bool):
        self._jsonl: JsonlWriter | None = JsonlWriter(out / LOG_NAME)
        if jsonl_offset >= 0:
            self._jsonl.truncate(jsonl_offset)
        else:
            self._jsonl.write(
                {
                    "type": "note",
                    "global_step": global_step,
                    "note": "log.jsonl was missing at resume; the records before this step are lost",
                }
            )
        self._tb = Scalars(out / "tb" if tensorboard else None, purge_step=global_step + 1 if resume else None)

    def write(self, record: dict[str, Any], step: int, *, scalars: bool = True) -> None:
        """One JSONL line; its ``a/b`` keys (numbers) also as TensorBoard scalars at ``step``."""
        assert self._jsonl is not None, "the run log is closed"
        self._jsonl.write(record)
        if scalars:
            self._tb.add({k: v for k, v in record.items() if "/" in k and k != "selection/criterion"}, step)

    def offset(self) -> int:
        """The JSONL byte offset (recorded in checkpoints); 0 once closed."""
        return self._jsonl.offset() if self._jsonl is not None else 0

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._tb.close()
            self._jsonl = None


def step_record(record: Any, *, epoch: int, step: int, global_step: int, lr: float, step_s: float,
                grad_scale: float | None = None, world: int = 1, local_batch: int | None = None,
                diagnostics: dict[str, float] | None = None) -> dict[str, Any]:
    """The ``"step"`` line of a :class:`~mtlens.engine.StepRecord` (1-based epoch, step and global step)."""
    log: dict[str, Any] = {"type": "step", "epoch": epoch, "step": step, "global_step": global_step}
    log.update(record.to_dict(prefix="train/"))
    log["train/lr"] = lr
    log["time/step_s"] = step_s
    if grad_scale is not None:
        log["train/grad_scale"] = grad_scale
    if world > 1:
        log["train/world_size"] = float(world)
        log["train/local_batch"] = float(local_batch or 0)
    if record.skipped:
        log["reason"] = record.reason
    if diagnostics:
        log.update(diagnostics)
    return log


def epoch_record(*, epoch: int, global_step: int, lr: float, criterion: str, score: float, best_epoch: int,
                 train_loss: dict[str, float], val: dict[str, Any], deltas: dict[str, float] | None) -> dict[str, Any]:
    """The ``"epoch"`` line: epoch-mean train losses, validation losses, metrics and Δ, selection."""
    log: dict[str, Any] = {
        "type": "epoch",
        "epoch": epoch,
        "global_step": global_step,
        "lr": lr,
        "selection/criterion": criterion,
        "selection/score": score,
        "best_epoch": best_epoch,
    }
    log.update({f"train/epoch_loss/{t}": v for t, v in train_loss.items()})
    log.update({f"val/loss/{t}": v for t, v in val["losses"].items()})
    for t, ms in val["metrics"].items():
        log.update({f"val/{t}/{m}": v for m, v in ms.items()})
    if deltas:
        log.update({f"val/{k}": v for k, v in deltas.items()})
    return log


class Display:
    """Rich progress bar (epoch, step, losses, ETA) and one line per epoch; silent when ``console`` is None."""

    def __init__(self, label: str, console: Any, epochs: int, steps: int, *, epoch: int = 0, global_step: int = 0):
        self.label, self.epochs, self.steps = label, epochs, steps
        self._start = (epoch, global_step)
        self.progress: Any = None
        self.task_id: Any = None
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.fields[what]}[/] epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[losses]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )

    def __enter__(self) -> Display:
        if self.progress is not None:
            self.progress.__enter__()
            epoch, global_step = self._start
            self.task_id = self.progress.add_task(
                "train",
                total=self.epochs * self.steps,
                completed=global_step,
                what=self.label,
                epoch=epoch + 1,
                epochs=self.epochs,
                losses="",
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, start_step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, epoch=epoch + 1, completed=epoch * self.steps + start_step)

    def advance(self, record: Any) -> None:
        if self.progress is not None:
            losses = " ".join(f"{t}={float(v):.4g}" for t, v in zip(record.task_names, record.losses))
            self.progress.update(self.task_id, advance=1, losses=losses)

    def end_epoch(self, log: dict[str, Any], val: dict[str, Any]) -> None:
        if self.progress is None:
            return
        parts = []
        for t, ms in val["metrics"].items():
            parts.append(f"{t}: " + ", ".join(f"{m}={v:.4g}" for m, v in ms.items()))
        crit, score = log["selection/criterion"], log["selection/score"]
        shown = f"val_loss={-score:.4g}" if crit == "val_loss" else f"{crit}={score:.4g}"
        self.progress.console.print(
            f"[dim]{self.label}[/] epoch {log['epoch']}/{self.epochs}  val {'; '.join(parts)}  {shown}  "
            f"best={log['best_epoch']}"
        )
