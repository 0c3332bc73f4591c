"""Checkpoints written atomically, read back with specific errors, and the RNG states they carry.

A checkpoint is a ``torch.save`` dictionary with ``format = "mtlens-checkpoint"``. It is first
written to a temporary file in the same directory, flushed to disk and then moved over the old
one with :func:`os.replace`, so a run killed at any instant leaves either the previous or the
new checkpoint, never a truncated one. Every checkpoint and weights file carries
``content_sha256``, the hash of its content computed at write time and checked by
:func:`load_checkpoint` (:mod:`mtlens.storage`): a flipped bit raises
:class:`~mtlens.errors.IntegrityError` naming the file. Checkpoints are pickles (they carry method and RNG
state): load only files you trust.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, IntegrityError, OutputPathError
from ..storage import DirectoryLock, atomic_write, atomic_write_text, is_under, output_path_error, save_torch, verify

__all__ = [
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "FORMAT",
    "VERSION",
    "WEIGHTS_FORMAT",
    "RunFiles",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "capture_rng_state",
    "load_checkpoint",
    "locked_run_directory",
    "restore_rng_state",
    "seed_everything",
    "weights_payload",
]

FORMAT = "mtlens-checkpoint"
WEIGHTS_FORMAT = "mtlens-weights"
VERSION = 2  # 2: every file carries a content hash (content_sha256)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` (a dict) sealed with its content hash (:func:`mtlens.storage.save_torch`), atomically."""
    save_torch(obj, path)


def load_checkpoint(path: str | os.PathLike, *, expect: str = FORMAT, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint (a weights file with ``expect=WEIGHTS_FORMAT``); CheckpointError on any defect."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; start a fresh run (without --resume)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint '{path}' is truncated or corrupt ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160]}); "
            "delete it and restart the run from scratch, or restore an intact copy"
        ) from None
    if isinstance(obj, dict) and "content_sha256" in obj:
        verify(obj, path)  # before anything in it is trusted, the format fields included
    formats = (expect,) if expect != WEIGHTS_FORMAT else (WEIGHTS_FORMAT, FORMAT)
    if not isinstance(obj, dict) or obj.get("format") not in formats:
        raise CheckpointError(
            f"'{path}' is not an mtlens {'checkpoint' if expect == FORMAT else 'weights file'} "
            f"(format={obj.get('format') if isinstance(obj, dict) else type(obj).__name__!r}); "
            "pass a checkpoint.pt or best.pt written by `mtlens train`"
        )
    if obj.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has format version {obj.get('version')}, this mtlens reads version "
            f"{VERSION}; "
            "evaluate it with the mtlens version that wrote it"
        )
    try:
        verify(obj, path)
    except IntegrityError as exc:
        raise IntegrityError(f"checkpoint {exc}") from None
    return obj


# ---------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and python RNG states."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True: the MT19937 tuple
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# a run directory's checkpoint and best-epoch files
CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"


def weights_payload(config: dict[str, Any], tasks: list[str], model: torch.nn.Module, **extra: Any) -> dict[str, Any]:
    """A weights file's content: format, version, the run's config (as JSON), tasks, model state, ``extra``."""
    return {
        "format": WEIGHTS_FORMAT,
        "version": VERSION,
        "config": config,
        "tasks": list(tasks),
        "model": model.state_dict(),
        **extra,
    }


class RunFiles:
    """The files of a run directory that hold state: ``checkpoint.pt`` (latest, atomic) and the best
    epoch's weights (``best-eNNNN.pt`` while training, ``best.pt`` once the run is finished).

    Only the best file named by the run's progress is kept: :meth:`cleanup_best` removes the others
    (a run killed between writing a new best file and its checkpoint leaves one stale file, removed
    at resume)."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def save(self, state: dict[str, Any]) -> Path:
        """Write the checkpoint atomically (sealed with its content hash)."""
        atomic_torch_save(state, self.checkpoint)
        return self.checkpoint

    def load(self) -> dict[str, Any]:
        """Read the checkpoint (CheckpointError / IntegrityError naming the file on any defect)."""
        return load_checkpoint(self.checkpoint)

    def best_file(self, epoch: int | None = None) -> Path:
        """``best-eNNNN.pt`` of a 1-based epoch while training; ``best.pt`` (``epoch=None``) at the end."""
        return self.out_dir / (BEST_NAME if epoch is None else f"best-e{epoch:04d}.pt")

    def save_weights(self, payload: dict[str, Any], path: Path) -> None:
        atomic_torch_save(payload, path)

    def load_weights(self, name: str) -> dict[str, Any]:
        return load_checkpoint(self.out_dir / name, expect=WEIGHTS_FORMAT)

    def cleanup_best(self, keep: str | None) -> None:
        """Remove every ``best-e*.pt`` but ``keep``."""
        for p in self.out_dir.glob("best-e*.pt"):
            if p.name != keep:
                p.unlink(missing_ok=True)


@contextmanager
def locked_run_directory(out: Path, purpose: str, *, scratch_of: Path | None = None,
                         resume: bool = False) -> Iterator[None]:
    """Hold a run directory for the duration of the block.

    The directory is locked (:class:`mtlens.storage.DirectoryLock`: a second writer gets
    :class:`~mtlens.errors.LockHeldError` naming the holder); an output-path problem under it (a
    file in the way, read-only, disk full) becomes one :class:`~mtlens.errors.OutputPathError`.
    With ``scratch_of`` (a non-main rank of a data-parallel run), ``out`` is this rank's scratch
    directory instead: a copy of ``scratch_of`` when resuming, removed at the end, never locked."""
    if scratch_of is not None:
        try:
            if resume:
                shutil.copytree(scratch_of, out, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.lock", ".lock*", "tb"))
            yield
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return
    try:
        lock = DirectoryLock(out, purpose=purpose).acquire()
    except OSError as exc:
        raise output_path_error(exc) from None
    try:
        yield
    except OSError as exc:
        if isinstance(exc, OutputPathError) or not is_under(exc.filename, out):
            raise
        raise output_path_error(exc) from None
    finally:
        lock.release()
