"""One validated configuration per training run: pydantic models, YAML presets, ``--set`` overrides.

A run is described by a :class:`RunConfig` (every section forbids unknown keys). Build one with
:func:`load_config`, which merges a preset (``src/mtlens/train/presets/*.yaml``), a YAML file and
``a.b=value`` overrides (values parsed as YAML), validates it, checks the method's
hyper-parameters by constructing it (:func:`mtlens.methods.create`) and the combination of
method, level, regularisers and loss transform by a dry run of the engine on a toy problem —
so an impossible combination fails before any data is loaded, with the engine's own message.
Every validation failure becomes one :class:`~mtlens.errors.ConfigurationError` line naming the
key and the allowed values.

>>> cfg = load_config(preset="quick-multimnist", overrides=["train.epochs=1"])
>>> cfg.method.name, cfg.regularizers[0].name, cfg.train.epochs
('ew', 'rep_mtl', 1)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import types
import typing
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from importlib.abc import Traversable

    from ..engine.protocols import Method, Regularizer

LEVEL_CHOICES = ("param", "feature")
SELECTION_CHOICES = ("auto", "delta_p_task", "val_loss", "last")
Diagnostic = Literal["fd", "tsr_entropy", "gds", "gms", "grad_norms", "cond"]
DIAGNOSTIC_CHOICES: tuple[Diagnostic, ...] = typing.get_args(Diagnostic)


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got the boolean {v!r}")
    return v


# Strict scalars: `--set train.batch_size=true` must not become 1, nor `--set optim.lr=.inf` a learning
# rate. Integers accept only integers; floats accept numbers and numeric strings (YAML reads `1e-3`
# as a string) but never booleans, and (model-wide allow_inf_nan=False) never NaN or ±inf.
Int = StrictInt
Float = Annotated[float, BeforeValidator(_no_bool)]
Bool = StrictBool


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    """Which benchmark, where its files are, and how to load it."""

    benchmark: str = Field(description="benchmark name (see `mtlens datasets`)")
    root: str | None = Field(None, description="data directory (benchmarks without bundled data)")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="benchmark options (data_seed, split_seed, sizes; see `mtlens datasets`)",
    )
    num_workers: Int = Field(0, ge=0, description="DataLoader worker processes")


class ModelConfig(_Section):
    """Model preset of :func:`mtlens.models.create` and its arguments."""

    preset: str | None = Field(None, description="model preset; default: the benchmark's default_model")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of the preset")
    pretrained: Bool = Field(False, description="ImageNet-pretrained backbone (needs network or a weights file)")
    weights: str | None = Field(None, description="local backbone weights file (implies pretrained)")


class MethodConfig(_Section):
    """The multi-task method (``mtlens methods``) and the gradient level it works at."""

    name: str = "ew"
    hparams: dict[str, Any] = Field(default_factory=dict)
    level: Literal["param", "feature"] | None = Field(
        None, description="gradient level; None = the engine default (param for gradient methods)"
    )


class RegularizerConfig(_Section):
    """A regulariser added to the method's objective, e.g. ``rep_mtl``."""

    name: str
    hparams: dict[str, Any] = Field(default_factory=dict)


class OptimConfig(_Section):
    """Optimiser. Method parameters (UW's log-variances, ...) get their own group without weight decay."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Float = Field(1e-4, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    momentum: Float = Field(0.0, ge=0, description="sgd only")
    nesterov: Bool = Field(False, description="sgd only")
    betas: tuple[Float, Float] = Field((0.9, 0.999), description="adam/adamw only, each in [0, 1)")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"optim.betas must be two numbers in [0, 1) (Adam's moment decays), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _sgd_only(self) -> OptimConfig:
        if self.name != "sgd" and (self.momentum != 0 or self.nesterov):
            raise ValueError(f"optim.momentum/optim.nesterov apply to sgd only, not '{self.name}'")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("optim.nesterov needs optim.momentum > 0")
        return self


class ScheduleConfig(_Section):
    """Learning-rate schedule, stepped once per epoch."""

    name: Literal["none", "step", "cosine", "plateau"] = "none"
    step_size: Int = Field(100, ge=1, description="step: epochs between decays")
    gamma: Float = Field(0.5, gt=0, description="step: decay factor; plateau: factor (Nash-MTL QM9: 0.7)")
    eta_min: Float = Field(0.0, ge=0, description="cosine: final learning rate (T_max = epochs)")
    patience: Int = Field(5, ge=0, description="plateau: epochs without a better selection score before a decay")
    min_lr: Float = Field(0.0, ge=0, description="plateau: lower bound of the learning rate (Nash-MTL QM9: 1e-5)")


class TrainConfig(_Section):
    """Loop settings."""

    epochs: Int = Field(10, ge=1)
    batch_size: Int = Field(32, ge=1)
    eval_batch_size: Int | None = Field(None, ge=1, description="default: batch_size")
    seed: Int = 0
    device: Literal["cpu", "cuda", "auto"] = "auto"
    amp: Literal["off", "bf16", "fp16"] = "off"
    max_steps_per_epoch: Int | None = Field(None, ge=1, description="cap on steps per epoch (quick runs)")
    jacobian: Literal["loop", "batched"] = "loop"
    compile: str = Field(
        "off", description="torch.compile the encoder with this backend ('inductor', 'aot_eager', ...; 'off': "
        "eager); the heads stay eager (docs/engine.md, 'torch.compile')")
    nonfinite: Literal["raise", "skip"] = "raise"
    log_every: Int = Field(1, ge=1, description="write a JSONL/TensorBoard step record every k steps")
    update_every: Int = Field(
        1, ge=1, description="reuse a gradient method's weights for k steps (one backward of the weighted sum "
        "between decisions; Nash-MTL's paper uses this to cut cost); Jacobian aggregators refuse k > 1")
    distributed: Bool = Field(
        False, description="data-parallel training over the processes torchrun starts (each takes an equal "
        "share of every batch; the update equals the single-process one on the whole batch)")
    selection: Literal["auto", "delta_p_task", "val_loss", "last"] = Field(
        "auto",
        description="best-epoch criterion on the val split: auto = delta_p_task against the baseline's "
        "val metrics when a baseline is given, else val_loss",
    )


class MonitorConfig(_Section):
    """Diagnostics (:class:`mtlens.diagnose.SaliencyMonitor`) measured every ``every`` steps; 0 = off.

    On monitored steps a loss-level method's engine call also keeps the saliencies and computes
    the Gramian (at ``level``); gradient-level methods record both at their own level anyway."""

    every: Int = Field(0, ge=0)
    diagnostics: list[Diagnostic] = Field(default_factory=lambda: list(DIAGNOSTIC_CHOICES))
    level: Literal["param", "feature"] = Field(
        "param", description="level of the Gramian for loss-level methods (gradient methods: their own level)"
    )
    fd_temperature: Float = Field(0.0, ge=0, description="FD temperature (0 = plain L1 normalisation)")


class CheckpointConfig(_Section):
    """Checkpointing: always at each epoch end, and every ``every_steps`` steps when > 0."""

    every_steps: Int = Field(0, ge=0)


class RunConfig(_Section):
    """The complete, validated description of one training run."""

    name: str | None = Field(None, description="run name (the preset's name by default)")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    regularizers: list[RegularizerConfig] = Field(default_factory=list)
    loss_transform: Literal["none", "log"] | None = Field(
        None, description="none/log; None = the method's prescription or none"
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    stl_task: str | None = Field(
        None, description="single-task baseline mode: a task name, or 'all' for one model per task"
    )
    baseline: str | None = Field(
        None, description="'auto' (train or reuse cached STL baselines) or a path to a baseline/results JSON"
    )
    baseline_cache: str | None = Field(
        None, description="cache of STL baselines; default $MTLENS_CACHE_DIR or ~/.cache/mtlens/baselines"
    )
    out_dir: str | None = Field(None, description="output directory of the run")

    @model_validator(mode="after")
    def _semantics(self) -> RunConfig:
        _check_semantics(self)
        return self

    # -- derived configurations ------------------------------------------------------------
    def for_stl(self, task: str) -> RunConfig:
        """The single-task baseline run of ``task``: the plain task loss (EW, no regulariser, no
        loss transform, no diagnostics), everything else (data, model, optimiser, schedule,
        epochs, seed) unchanged."""
        return RunConfig.model_validate(stl_settings({**self.model_dump(), "stl_task": task, "out_dir": None}))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def digest(self, *, exclude: tuple[str, ...] = ("out_dir", "name")) -> str:
        """A stable hash of the configuration (without the given top-level keys)."""
        d = {k: v for k, v in self.model_dump(mode="json").items() if k not in exclude}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
def method_kwargs(name: str, hparams: dict[str, Any], num_tasks: int, device: str, seed: int,
                  steps_per_epoch: int | None = None) -> dict[str, Any]:
    """The constructor arguments the trainer gives method ``name``: the user's ``hparams`` plus, when
    the constructor accepts them and the user left them out, ``num_tasks`` and ``device`` (so that
    learnable per-task scalars exist, on the right device, before the optimiser is built),
    ``seed`` = the run's ``train.seed`` (so that random methods — RLW, PCGrad, ... — draw the same
    numbers in every run of the same configuration) and ``steps_per_epoch`` (DWA, STCH check their
    ``on_epoch_end`` calls with it). Decided from the constructor's signature, never from the
    method's name."""
    from ..methods import defaults

    accepted = defaults(name)
    out = dict(hparams)
    for key, value in (("num_tasks", num_tasks), ("device", device), ("seed", seed),
                       ("steps_per_epoch", steps_per_epoch)):
        if value is not None and key in accepted and key not in out:
            out[key] = value
    return out


def stl_settings(d: dict[str, Any]) -> dict[str, Any]:
    """A raw config switched to single-task baseline training (``stl_task`` must be set): EW on the
    plain task loss, no regularisers, no loss transform, no diagnostics, no baseline."""
    out = copy.deepcopy(d)
    out["method"] = {"name": "ew", "hparams": {}, "level": None}
    out["regularizers"] = []
    out["loss_transform"] = None
    out["baseline"] = None
    monitor = dict(out.get("monitor") or {})
    monitor["every"] = 0
    out["monitor"] = monitor
    train = dict(out.get("train") or {})
    if train.get("selection") == "delta_p_task":
        train["selection"] = "auto"
    train["update_every"] = 1
    train["distributed"] = False  # baselines are trained in one process (rank 0)
    out["train"] = train
    return out


def _check_semantics(cfg: RunConfig) -> None:
    """Cross-field checks that need the registries (benchmark tasks, methods, the engine)."""
    from ..methods import create, get
    from ..tasks.spec import get_benchmark

    spec = get_benchmark(cfg.data.benchmark)
    if spec.needs_root and cfg.data.root is None:
        raise ValueError(
            f"data.root: benchmark '{spec.name}' has no bundled data; set data.root=PATH. {spec.source}".strip()
        )
    unknown_opts = sorted(k for k in cfg.data.options if k not in spec.options)
    if unknown_opts:
        raise ValueError(
            f"data.options: benchmark '{spec.name}' has no option(s) {unknown_opts}; allowed: "
            + (", ".join(f"{k} (default {v!r})" for k, v in spec.options.items()) or "none")
        )
    if cfg.model.preset is not None or cfg.model.kwargs:
        from .. import models

        preset = cfg.model.preset or spec.default_model
        try:
            allowed_kw = models.options(preset)
        except ConfigurationError as exc:
            raise ValueError(f"model.preset: {exc}") from None
        bad = sorted(k for k in cfg.model.kwargs if k not in allowed_kw)
        if bad:
            raise ValueError(
                f"model.kwargs: preset '{preset}' has no option(s) {bad}; allowed: "
                + (", ".join(f"{k} (default {v!r})" for k, v in allowed_kw.items()) or "none")
            )
    if cfg.stl_task is not None and cfg.stl_task != "all" and cfg.stl_task not in spec.tasks:
        raise ValueError(
            f"stl_task: '{cfg.stl_task}' is not a task of '{spec.name}'; allowed: "
            + ", ".join(repr(t) for t in [*spec.tasks, "all"])
        )
    if cfg.stl_task is not None and cfg.baseline is not None:
        raise ValueError("baseline: a single-task (stl_task) run is itself a baseline; remove baseline")
    stl = cfg.stl_task is not None
    if stl and (cfg.method.name != "ew" or cfg.regularizers or cfg.loss_transform not in (None, "none")):
        raise ValueError(
            "stl_task: a single-task baseline trains the plain task loss; use method.name=ew with no "
            "regularizers and no loss_transform, or RunConfig.for_stl(task)"
        )
    if cfg.train.selection == "delta_p_task" and cfg.baseline is None:
        raise ValueError("train.selection: 'delta_p_task' needs a baseline (baseline=auto or a file)")

    try:
        method_cls = get(cfg.method.name)
    except ConfigurationError as exc:
        raise ValueError(f"method.name: {exc}") from None
    if method_cls.family == "regularizer":
        raise ValueError(
            f"method.name: '{cfg.method.name}' is a regulariser; put it under regularizers "
            f"(regularizers=[{{name: {cfg.method.name}}}]) and choose a method (e.g. ew)"
        )
    from ..engine.protocols import GramianWeighting

    if cfg.train.update_every > 1 and (not issubclass(method_cls, GramianWeighting) or cfg.regularizers):
        raise ValueError(
            f"train.update_every: '{cfg.method.name}' cannot reuse its decisions; update_every > 1 needs a gradient "
            "method that weights the task losses (a Gramian weighting such as nash_mtl, mgda, upgrad) and no "
            "regularisers"
        )
    for i, r in enumerate(cfg.regularizers):
        try:
            rcls = get(r.name)
        except ConfigurationError as exc:
            raise ValueError(f"regularizers.{i}.name: {exc}") from None
        if rcls.family != "regularizer":
            from ..methods import available

            raise ValueError(
                f"regularizers.{i}.name: '{r.name}' is a {rcls.family}-level method, not a regulariser; "
                f"allowed: {', '.join(available('regularizer'))}"
            )

    n_tasks = 1 if stl else len(spec.tasks)

    def build(name: str, hparams: dict[str, Any], key: str) -> Method:
        try:
            return create(name, **method_kwargs(name, hparams, n_tasks, "cpu", cfg.train.seed))
        except (ConfigurationError, TypeError, ValueError) as exc:
            raise ValueError(f"{key}: {exc}") from None

    method = build(cfg.method.name, cfg.method.hparams, "method.hparams")
    regs = [build(r.name, r.hparams, f"regularizers.{i}.hparams") for i, r in enumerate(cfg.regularizers)]
    _check_loss_transform(cfg, [method, *regs])
    try:
        _engine_dry_run(method, regs, cfg.method.level, cfg.loss_transform, n_tasks, spec.multi_input)
    except ConfigurationError as exc:
        combo = f"method.name='{cfg.method.name}', method.level={cfg.method.level!r}"
        if cfg.regularizers:
            combo += ", regularizers=" + "+".join(r.name for r in cfg.regularizers)
        if cfg.loss_transform is not None:
            combo += f", loss_transform='{cfg.loss_transform}'"
        raise ValueError(f"{combo}: {exc}") from None


def _check_loss_transform(cfg: RunConfig, methods: list[Any]) -> None:
    """Each method declares the loss transforms it is defined for; say which one clashes and where
    it came from (the Rep-MTL and quick-* presets set ``loss_transform: log``)."""
    if cfg.loss_transform is None:
        return  # the method's own prescription, or none
    origin = ""
    if cfg.name in available_presets() and load_preset(cfg.name).get("loss_transform") == cfg.loss_transform:
        origin = f" (set by the preset '{cfg.name}')"
    for m in methods:
        if m.loss_transform is not None:
            continue  # a method that prescribes its own transform: the engine checks the clash
        problem = m.loss_transform_problem(cfg.loss_transform)
        if problem is not None:
            other = "none" if cfg.loss_transform == "log" else "log"
            raise ValueError(
                f"loss_transform: '{m.name}' is not defined for loss_transform='{cfg.loss_transform}'{origin}: "
                f"{problem}. Fix: --set loss_transform={other} (YAML: loss_transform: {other}), or choose a "
                f"method defined for it (docs/methods.md, column 'log losses')"
            )


def _engine_dry_run(method: Method, regularizers: Sequence[Method], level: str | None, loss_transform: str | None,
                    n_tasks: int, multi_input: bool) -> None:
    """One :func:`mtl_backward` on a toy hard-parameter-sharing problem, so the engine itself
    rejects impossible combinations (loss-level method at feature level, a feature-only method at
    parameter level, a Jacobian aggregator on multi-input features, a clashing loss transform).
    Runs on throw-away method objects and leaves the global RNG untouched."""
    import warnings

    import torch
    from torch import nn

    from ..engine import mtl_backward

    # throw-away objects: their advice (e.g. DWA's "call on_epoch_end") is for the real run
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(1234)
        enc = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        heads = [nn.Linear(5, 2) for _ in range(n_tasks)]
        if method.needs_lookahead:  # a look-ahead over the toy problem, as the trainer does
            from ..engine import LookAhead

            params = list(enc.parameters()) + [p for h in heads for p in h.parameters()]
            x2 = torch.randn(4, 3)

            def toy(x):
                return lambda: [(h(enc(x)) ** 2).mean() + 0.1 for h in heads]
            method.meta_step(LookAhead(params, toy(torch.randn(4, 3)), toy(x2), lr=0.01))
        if multi_input:
            feats = [enc(torch.randn(4, 3)) for _ in range(n_tasks)]
            losses = {f"task{t}": (heads[t](feats[t]) ** 2).mean() + 0.1 for t in range(n_tasks)}
            features: Any = {f"task{t}": feats[t] for t in range(n_tasks)}
        else:
            z = enc(torch.randn(4, 3))
            losses = {f"task{t}": (heads[t](z) ** 2).mean() + 0.1 for t in range(n_tasks)}
            features = z
        if method.needs_second_batch:  # the trainer feeds it before every step; here a stand-in
            method.observe_cross_gramian(torch.eye(n_tasks, dtype=torch.float64))
        mtl_backward(
            losses,
            method=method,
            features=features,
            shared_params=list(enc.parameters()),
            level=level,
            # any method: refusing a non-regulariser here, with the engine's own message, is the point
            regularizers=cast("Sequence[Regularizer]", regularizers),
            loss_transform=loss_transform,
            distributed=False,  # a local toy problem, even inside a torchrun process
        )


# ---------------------------------------------------------------------------------------------
# presets, files, overrides
def _preset_dir() -> Traversable:
    return resources.files("mtlens.train") / "presets"


def available_presets() -> list[str]:
    """Names of the bundled YAML presets."""
    return sorted(p.name[: -len(".yaml")] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Traversable:
    return _preset_dir() / f"{name}.yaml"


def load_preset(name: str) -> dict[str, Any]:
    """The raw dictionary of preset ``name``."""
    names = available_presets()
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigurationError(f"unknown preset '{name}'.{hint} Available: {', '.join(names)}")
    data = yaml.safe_load(preset_path(name).read_text()) or {}
    data.setdefault("name", name)
    return data


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigurationError(f"config file '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"config file '{p}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigurationError(f"config file '{p}' must hold a mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


SHORTCUTS = {"level": "method.level", "method": "method.name", "epochs": "train.epochs", "seed": "train.seed",
             "lr": "optim.lr", "batch_size": "train.batch_size", "benchmark": "data.benchmark"}
"""``--set`` shortcuts for the keys users set most (``--set level=feature``)."""


def apply_override(d: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` override (YAML value; list items by index: ``regularizers.0.name``)."""
    if "=" not in assignment:
        raise ConfigurationError(f"--set expects KEY=VALUE (e.g. optim.lr=1e-3), got '{assignment}'")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    key = SHORTCUTS.get(key, key)
    if not key or any(not part for part in key.split(".")):
        raise ConfigurationError(f"--set: malformed key '{key}' in '{assignment}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    out = copy.deepcopy(d)
    parts = key.split(".")
    node: Any = out
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            idx = _index(part, node, here)
            node = node[idx]
            continue
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigurationError(f"--set {key}: '{here}' is a value ({node!r}), not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, node, key)] = value
    else:
        node[last] = value
    return out


def _index(part: str, node: list, where: str) -> int:
    if not part.isdigit():
        raise ConfigurationError(f"--set: '{where}' indexes a list; use a number (0..{len(node) - 1})")
    idx = int(part)
    if idx >= len(node):
        raise ConfigurationError(f"--set: '{where}' is out of range; the list has {len(node)} item(s)")
    return idx


def load_config(
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    base: dict[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
) -> RunConfig:
    """Merge preset < config file < ``overrides`` (< ``out_dir``), validate, return a :class:`RunConfig`.

    When ``stl_task`` is set the run becomes a single-task baseline (:func:`stl_settings`
    replaces the method, regularisers, loss transform, diagnostics and baseline).

    Raises :class:`ConfigurationError` with one line naming the key and the allowed values."""
    if preset is None and config_file is None and base is None:
        raise ConfigurationError(
            f"give a preset (--preset NAME; available: {', '.join(available_presets())}) or a config file (--config)"
        )
    d: dict[str, Any] = copy.deepcopy(base) if base is not None else {}
    if preset is not None:
        d = deep_merge(d, load_preset(preset))
    if config_file is not None:
        d = deep_merge(d, _read_yaml(config_file))
    for o in overrides:
        d = apply_override(d, o)
    if out_dir is not None:
        d["out_dir"] = str(out_dir)
    if d.get("stl_task") is not None:
        d = stl_settings(d)
    return validate_config(d)


def validate_config(d: dict[str, Any] | RunConfig) -> RunConfig:
    """Validate a raw dictionary; every failure becomes one ConfigurationError line."""
    if isinstance(d, RunConfig):
        return d
    try:
        return RunConfig.model_validate(d)
    except ValidationError as exc:
        raise ConfigurationError(format_validation_error(exc, RunConfig)) from None


# ---------------------------------------------------------------------------------------------
# error formatting
def _unwrap(annotation: Any) -> list[Any]:
    """The candidate types inside Optional/Union/list/dict annotations."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out = []
        for a in typing.get_args(annotation):
            out.extend(_unwrap(a))
        return out
    if origin in (list, tuple, dict):
        args = typing.get_args(annotation)
        return _unwrap(args[-1]) if args else []
    return [annotation]


def _section_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    cur: type[BaseModel] | None = model
    for part in loc:
        if cur is None:
            return None
        if isinstance(part, int):
            continue
        field = cur.model_fields.get(part)
        if field is None:
            return None
        nxt = [a for a in _unwrap(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        cur = nxt[0] if nxt else None
    return cur


def _allowed_values(model: type[BaseModel], loc: tuple) -> list[str] | None:
    parent = _section_at(model, tuple(p for p in loc[:-1]))
    if parent is None or not isinstance(loc[-1], str):
        return None
    field = parent.model_fields.get(loc[-1])
    if field is None:
        return None
    vals: list[str] = []
    for a in _unwrap(field.annotation):
        if typing.get_origin(a) is Literal:
            vals.extend(repr(v) for v in typing.get_args(a))
        elif a is type(None):
            vals.append("null")
    return vals or None


def format_validation_error(exc: ValidationError, model: type[BaseModel] = RunConfig) -> str:
    """One line per problem (joined with '; '), each naming the key and what is allowed."""
    msgs = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        key = ".".join(str(p) for p in loc) or "config"
        typ = err.get("type", "")
        if typ == "extra_forbidden":
            section = _section_at(model, loc[:-1])
            allowed = ", ".join(section.model_fields) if section is not None else "?"
            where = ".".join(str(p) for p in loc[:-1]) or "the top level"
            msgs.append(f"unknown key '{key}'; allowed keys in {where}: {allowed}")
        elif typ == "missing":
            msgs.append(f"missing key '{key}'")
        elif typ in ("literal_error", "enum"):
            allowed_list = _allowed_values(model, loc)
            allowed = ", ".join(allowed_list) if allowed_list else err.get("ctx", {}).get("expected", "?")
            msgs.append(f"{key}: got {err.get('input')!r}; allowed values: {allowed}")
        elif typ == "value_error":
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            msgs.append(msg if msg.startswith(key.split(".")[0]) else f"{key}: {msg}")
        else:
            allowed_list = _allowed_values(model, loc) if loc else None
            extra = f"; allowed values: {', '.join(allowed_list)}" if allowed_list else ""
            msgs.append(f"{key}: got {err.get('input')!r}: {err.get('msg')}{extra}")
    return "invalid configuration: " + "; ".join(msgs)


# ---------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$MTLENS_CACHE_DIR`` or ``$XDG_CACHE_HOME/mtlens/baselines`` (``~/.cache/mtlens/baselines``)."""
    env = os.environ.get("MTLENS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mtlens" / "baselines"
