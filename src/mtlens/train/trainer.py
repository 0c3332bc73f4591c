"""The trainer: resolve a run's single-task baseline, then run its :class:`~mtlens.train.loop.TrainingLoop`.

``baseline: auto`` trains (or reuses from the cache) one single-task run per task
(:mod:`mtlens.train.baseline`, with the plain :class:`~mtlens.train.loop.TrainingLoop`);
``baseline: PATH`` reads a file. Both happen before the run's own loop is built, so they cannot
change its random state: the loop seeds everything after its data is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .baseline import resolve_baseline
from .build import is_main_process
from .config import RunConfig, validate_config
from .loop import Callback, TrainingLoop
from .records import default_console

__all__ = ["Callback", "Trainer"]


class Trainer(TrainingLoop):
    """Train, validate, select, test and record one run (multi-task, or single-task with ``stl_task``).

    >>> from mtlens.train import Trainer, load_config
    >>> cfg = load_config("quick-multimnist", overrides=["train.epochs=1"])
    >>> results = Trainer(cfg).fit()  # trains the run and its single-task baselines  # doctest: +SKIP
    >>> results["metrics"]["test"]  # test metrics of the selected epoch, per task  # doctest: +SKIP
    {'left': {'acc': 94.1}, 'right': {'acc': 87.3}}

    Args:
        config: a :class:`RunConfig` (or its dictionary).
        baseline: resolved baseline ``{"source", "metrics": {"val": ..., "test": ...}}``; by
            default it comes from ``config.baseline`` (``auto`` trains or reuses STL baselines, on
            rank 0 only when data-parallel), resolved here, before the loop is built.
        quiet: no progress bar and no per-epoch lines.
        callbacks: :class:`Callback` objects.
        console: a ``rich.console.Console`` for progress output (default: stderr).
        tensorboard: write TensorBoard scalars under ``tb/``.
    """

    def __init__(
        self,
        config: RunConfig | Mapping[str, Any],
        *,
        baseline: dict[str, Any] | None = None,
        quiet: bool = False,
        callbacks: Sequence[Callback] = (),
        console: Any = None,
        tensorboard: bool = True,
    ):
        cfg = validate_config(config if isinstance(config, RunConfig) else dict(config))
        if baseline is None and cfg.baseline is not None and cfg.stl_task != "all" and is_main_process(cfg):
            console = default_console(console)
            baseline = resolve_baseline(cfg, quiet=quiet, console=console)
        super().__init__(cfg, baseline=baseline, quiet=quiet, callbacks=callbacks, console=console,
                         tensorboard=tensorboard)
