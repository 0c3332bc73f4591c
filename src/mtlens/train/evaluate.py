"""Evaluate saved weights (``best.pt``, ``checkpoint.pt`` or a run directory) on a split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..storage import read_json
from .checkpoint import WEIGHTS_FORMAT, load_checkpoint
from .config import RunConfig, format_validation_error


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "checkpoint.pt"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"run directory '{p}' holds neither best.pt nor checkpoint.pt; pass a weights file")
    return p


def load_model(path: str | Path):
    """The model stored in a weights/checkpoint file (built from the file's own config, no data loaded).

    Returns ``(model, file contents)``."""
    from ..tasks.spec import get_benchmark
    from .config import ModelConfig
    from .trainer import build_model

    file = _resolve(path)
    obj = load_checkpoint(file, expect=WEIGHTS_FORMAT)
    d = obj.get("config")
    if not isinstance(d, dict) or "data" not in d:
        raise CheckpointError(f"'{file}' carries no run configuration; it was not written by mtlens train")
    spec = get_benchmark(d["data"]["benchmark"])
    model_cfg = ModelConfig.model_validate(d.get("model") or {})
    # pretrained weights are about to be replaced by the file's: never download them here
    model_cfg = model_cfg.model_copy(update={"pretrained": False, "weights": None})
    model = build_model(_ModelOnly(model_cfg), spec, obj["tasks"])
    try:
        model.load_state_dict(obj["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"weights in '{file}' do not fit the model its config builds ({str(exc).splitlines()[0][:200]})"
        ) from None
    return model, obj


class _ModelOnly:
    """The part of a RunConfig that :func:`build_model` reads."""

    def __init__(self, model):
        self.model = model


def evaluate_checkpoint(
    path: str | Path, split: str = "test", *, overrides: list[str] | tuple[str, ...] = (), quiet: bool = True
) -> dict[str, Any]:
    """Rebuild the run's benchmark and model from the file's own config, load its weights, evaluate ``split``.

    ``overrides`` (``a.b=value``) adjust the stored config, e.g. ``data.root=/new/place`` or
    ``train.device=cpu``. Δ in the three conventions is added when the run directory holds a
    ``baseline.json`` with metrics of ``split``.

    Returns ``{"checkpoint", "epoch", "split", "metrics", "losses", "delta"}``.
    """
    from pydantic import ValidationError

    from ..errors import ConfigurationError
    from .config import apply_override
    from .trainer import Trainer

    file = _resolve(path)
    obj = load_checkpoint(file, expect=WEIGHTS_FORMAT)
    d = obj.get("config")
    if not isinstance(d, dict):
        raise CheckpointError(f"'{file}' carries no run configuration; it was not written by mtlens train")
    # the stored weights replace any pretrained backbone: never download or read those here
    d = {**d, "baseline": None, "model": {**(d.get("model") or {}), "pretrained": False, "weights": None}}
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
    trainer = Trainer(cfg, quiet=quiet, tensorboard=False)
    try:
        trainer.model.load_state_dict(obj["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"weights in '{file}' do not fit the model its config builds ({str(exc).splitlines()[0][:200]})"
        ) from None
    res = trainer.evaluate(split)
    delta = None
    bfile = file.parent / "baseline.json"
    if bfile.is_file():
        base = read_json(bfile)  # written by mtlens train: its content hash is checked
        if base.get("metrics", {}).get(split):
            trainer._baseline = base
            delta = trainer.deltas(res["metrics"], split)
    return {
        "checkpoint": str(file),
        "epoch": obj.get("epoch"),
        "split": split,
        "tasks": trainer.tasks,
        "metrics": res["metrics"],
        "losses": res["losses"],
        "delta": delta,
    }
