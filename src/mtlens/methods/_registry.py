"""The method registry: one name → one class, ``create(name, **hparams)``."""

from __future__ import annotations

import inspect
from typing import Any

from ..engine.protocols import Method, required_calls
from ..errors import ConfigurationError
from ..registry import PLUGIN_HINT, Registry
from ._discover import import_all

_REGISTRY: Registry[type[Method]] = Registry("method", builtins=import_all, hint=PLUGIN_HINT)
FAMILIES = ("loss", "gradient", "regularizer")

#: Facts about the training set-up that any method may use: :func:`create` passes each to the
#: constructors that accept it and leaves it out for the others, so one ``create`` line serves
#: every method (learnable scalars exist before the optimiser is built; epoch-based methods
#: check that ``on_epoch_end`` is called).
SETUP_KEYS = ("num_tasks", "device", "steps_per_epoch")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``create(cls.name)``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no registry name")
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}.family must be one of {FAMILIES}")
    return _REGISTRY.register(cls.name, cls)


def get(name: str) -> type[Method]:
    """The class registered as ``name`` (case-insensitive, '-' or '_': :func:`mtlens.registry.normalise_name`)."""
    return _REGISTRY.get(name)


def create(name: str, **hparams: Any) -> Method:
    """Build method ``name`` with hyper-parameters ``hparams`` (validated by its constructor).

    The set-up keys ``num_tasks`` (int), ``device`` (str) and ``steps_per_epoch`` (int, e.g.
    ``len(loader)``) are facts, not hyper-parameters: they reach the methods whose constructor
    takes them (UW and IMTL-L create their learnable scalars at once; DWA and STCH check that
    ``on_epoch_end`` is called) and are left out for the others, so that
    ``create(name, num_tasks=T, steps_per_epoch=len(loader))`` works for every method. A
    ``None`` value is left out too. Any other unknown keyword raises
    :class:`~mtlens.errors.ConfigurationError`.

    >>> from mtlens.methods import create
    >>> create("ew")
    EW()
    >>> create("uw", num_tasks=2).parameters()[0].shape
    torch.Size([2])
    """
    cls = get(name)
    params = _init_params(cls)
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    allowed = [k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    hparams = {k: v for k, v in hparams.items()
               if k not in SETUP_KEYS or (v is not None and (k in allowed or accepts_kwargs))}
    unknown = [k for k in hparams if k not in allowed]
    if unknown and not accepts_kwargs:
        raise ConfigurationError(
            f"method '{cls.name}' has no hyper-parameter(s) {unknown}; allowed: {allowed or 'none'}"
        )
    return cls(**hparams)


def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    init = getattr(cls, "__init__")  # noqa: B009 - mypy refuses cls.__init__ on a class object
    if init is object.__init__:
        return {}
    return {k: p for k, p in inspect.signature(init).parameters.items() if k != "self"}


def available(family: str | None = None) -> list[str]:
    """Registered method names, optionally of one family ("loss", "gradient", "regularizer")."""
    if family is not None and family not in FAMILIES:
        raise ConfigurationError(f"family={family!r}; choose one of {FAMILIES}")
    return [n for n, c in _REGISTRY.items() if family is None or c.family == family]


def defaults(name: str) -> dict[str, Any]:
    """The constructor defaults of method ``name``."""
    return {k: p.default for k, p in _init_params(get(name)).items() if p.default is not inspect.Parameter.empty}


def describe() -> list[dict[str, Any]]:
    """One row per method: name, family, levels, reference, defaults (for docs and the CLI)."""
    rows = []
    for n in available():
        c = _REGISTRY.get(n)
        rows.append({
            "name": n,
            "family": c.family,
            "levels": list(c.levels) if c.family != "loss" else [],
            "reference": c.reference,
            "defaults": defaults(n),
            "stateful": c.stateful,
            "loss_transform": c.loss_transform,
            "loss_transforms": list(c.loss_transforms),
            "user_calls": list(required_calls(c)),
            "needs_extra_forward": c.needs_extra_forward,
            "head_rule": c.head_rule,
            "needs_second_batch": c.needs_second_batch,
            "needs_task_scores": c.needs_task_scores,
            "needs_lookahead": c.needs_lookahead,
            "needs_saliency_graph": c.needs_saliency_graph,
            "adds_gradients": c.adds_gradients,
        })
    return rows
