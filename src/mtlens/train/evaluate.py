"""Evaluate saved weights (``best.pt``, ``checkpoint.pt`` or a run directory) on a split.

Evaluation builds what it needs and nothing else: the benchmark's data and loaders, and the model
from the file's own model section (:func:`~mtlens.train.build.build_model`) — no optimiser, method,
baseline or training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from ..errors import CheckpointError, ConfigurationError
from ..storage import read_json
from ..tasks.spec import get_benchmark
from .build import build_model, resolve_device
from .checkpoint import WEIGHTS_FORMAT, load_checkpoint
from .config import ModelConfig, RunConfig, apply_override, format_validation_error
from .evaluator import BaselineComparison, TaskEvaluator, evaluate
from .forward import TaskForward
from .loaders import eval_loaders

__all__ = ["evaluate_checkpoint", "load_model"]


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "checkpoint.pt"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"run directory '{p}' holds neither best.pt nor checkpoint.pt; pass a weights file")
    return p


def _load_weights(model: torch.nn.Module, obj: dict[str, Any], file: Path) -> None:
    try:
        model.load_state_dict(obj["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"weights in '{file}' do not fit the model its config builds ({str(exc).splitlines()[0][:200]})"
        ) from None


def _without_pretrained(model: dict[str, Any] | None) -> dict[str, Any]:
    # the stored weights replace any pretrained backbone: never download or read those here
    return {**(model or {}), "pretrained": False, "weights": None}


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model stored in a weights/checkpoint file (built from the file's own config, no data loaded).

    Returns ``(model, file contents)``."""
    file = _resolve(path)
    obj = load_checkpoint(file, expect=WEIGHTS_FORMAT)
    d = obj.get("config")
    if not isinstance(d, dict) or "data" not in d:
        raise CheckpointError(f"'{file}' carries no run configuration; it was not written by mtlens train")
    spec = get_benchmark(d["data"]["benchmark"])
    model = build_model(ModelConfig.model_validate(_without_pretrained(d.get("model"))), spec, obj["tasks"])
    _load_weights(model, obj, file)
    return model, obj


def evaluate_checkpoint(
    path: str | Path,
    split: str = "test",
    *,
    overrides: list[str] | tuple[str, ...] = (),
    quiet: bool = True,  # noqa: ARG001 - accepted as in 0.1.0; the evaluator prints nothing since the trainer split
) -> dict[str, Any]:
    """Rebuild the run's benchmark and model from the file's own config, load its weights, evaluate ``split``.

    ``overrides`` (``a.b=value``) adjust the stored config, e.g. ``data.root=/new/place`` or
    ``train.device=cpu``. Δ in the three conventions is added when the run directory holds a
    ``baseline.json`` with metrics of ``split``.

    Returns ``{"checkpoint", "epoch", "split", "tasks", "metrics", "losses", "delta"}``.
    """
    file = _resolve(path)
    obj = load_checkpoint(file, expect=WEIGHTS_FORMAT)
    d = obj.get("config")
    if not isinstance(d, dict):
        raise CheckpointError(f"'{file}' carries no run configuration; it was not written by mtlens train")
    d = {**d, "baseline": None, "model": _without_pretrained(d.get("model"))}
    if isinstance(d.get("train"), dict) and d["train"].get("selection") == "delta_p_task":
        d["train"] = {**d["train"], "selection": "auto"}
    for o in overrides:
        d = apply_override(d, o)
    try:
        cfg = RunConfig.model_validate(d)
    except ValidationError as exc:
        raise ConfigurationError(
            f"the configuration stored in '{file}' does not validate: " + format_validation_error(exc)
        ) from None
    if cfg.stl_task == "all":
        raise ConfigurationError(f"'{file}' was written by an stl_task=all run; evaluate one of its stl-<task> runs")
    spec = get_benchmark(cfg.data.benchmark)
    tasks = [cfg.stl_task] if cfg.stl_task else list(spec.task_names)
    device = resolve_device(cfg.train.device)
    datasets = spec.datasets(root=cfg.data.root, seed=cfg.train.seed, **cfg.data.options)
    if split not in datasets:
        raise ConfigurationError(f"split '{split}' does not exist; choose one of {sorted(datasets)}")
    spec = spec.bound(datasets)
    model = build_model(cfg.model, spec, tasks).to(device)
    _load_weights(model, obj, file)
    loaders = eval_loaders(datasets[split], tasks, spec.multi_input, cfg.train.eval_batch_size or cfg.train.batch_size,
                           cfg.data.num_workers, device.type == "cuda", split)
    forward = TaskForward(model, spec, tasks, spec.multi_input, device, cfg.train.amp)
    res = evaluate(forward, loaders, TaskEvaluator(spec, tasks))
    delta = None
    bfile = file.parent / "baseline.json"
    if bfile.is_file():
        base = read_json(bfile)  # written by mtlens train: its content hash is checked
        if base.get("metrics", {}).get(split):
            delta = BaselineComparison(spec, tasks, base).deltas(res["metrics"], split)
    return {
        "checkpoint": str(file),
        "epoch": obj.get("epoch"),
        "split": split,
        "tasks": tasks,
        "metrics": res["metrics"],
        "losses": res["losses"],
        "delta": delta,
    }
