"""Training: validated configuration, the trainer, single-task baselines, evaluation, checkpoints and records.

Five lines from Python::

    import mtlens
    from mtlens.train import load_config, run

    cfg = load_config(preset="quick-multimnist", overrides=["train.epochs=2"], out_dir="runs/demo")
    results = run(cfg)            # STL baselines (cached), MTL run, test of the best epoch
    print(results["metrics"]["test"], results["delta"]["test"])

The command line (``mtlens train``) is a thin layer over :func:`run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .baseline import ensure_baselines, load_baseline_file, resolve_baseline, stl_cache_key, train_all_stl
from .checkpoint import load_checkpoint
from .config import (
    RunConfig,
    apply_override,
    available_presets,
    default_cache_dir,
    format_validation_error,
    load_config,
    load_preset,
    validate_config,
)
from .evaluate import evaluate_checkpoint
from .loop import Callback, TrainingLoop
from .trainer import Trainer

if TYPE_CHECKING:
    from rich.console import Console


def run(
    config: RunConfig | dict[str, Any],
    *,
    resume: bool = False,
    quiet: bool = False,
    console: Console | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Run what ``config`` describes: an MTL run (training its ``auto`` baselines first), one STL
    run (``stl_task: <task>``) or all of them (``stl_task: all``). Returns the results dictionary
    (written to ``<out_dir>/results.json``; ``baseline.json`` for ``stl_task: all``)."""
    cfg = validate_config(config)
    if cfg.stl_task == "all":
        return train_all_stl(cfg, quiet=quiet, console=console, resume=resume)
    trainer = Trainer(cfg, quiet=quiet, console=console, callbacks=callbacks)
    return trainer.fit(resume=resume)


__all__ = [
    "Callback",
    "RunConfig",
    "Trainer",
    "TrainingLoop",
    "apply_override",
    "available_presets",
    "default_cache_dir",
    "ensure_baselines",
    "evaluate_checkpoint",
    "format_validation_error",
    "load_baseline_file",
    "load_checkpoint",
    "load_config",
    "load_preset",
    "resolve_baseline",
    "run",
    "stl_cache_key",
    "train_all_stl",
    "validate_config",
]
