"""The engine's data-parallel tests' process plumbing, in one place: a free port, the two-process spawn (with
its known abort after the results), and a worker's exit.

Workers write their results to a file before leaving; the spawning test reads them back."""

from __future__ import annotations

import os
import socket
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the gloo rendezvous's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int, results: list[Path]) -> None:
    """``mp.spawn(fn, args, nprocs)``. Now and then, only under the whole suite, both ranks were killed by SIGABRT
    ("terminate called without an active exception") as the processes ended, after every result was written:
    results written before that stand (a partial file fails where it is read); a rank that died earlier fails
    here."""
    try:
        mp.spawn(fn, args=args, nprocs=nprocs, join=True)
    except mp.ProcessExitedException as exc:
        if not all(p.exists() for p in results):
            raise
        warnings.warn(f"a data-parallel worker ended abnormally after writing its results: {exc}", stacklevel=2)


def leave() -> None:
    """A worker's exit once its results are written: both ranks leave the group together (a rank tearing gloo down
    while its peer still sends aborted the process now and then), then exit without the interpreter's teardown
    (the aborts above were seen there: a thread still joinable when its owner is destroyed)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
