"""The model registry (timm-style): ``@register_model`` presets, ``create(name, tasks)``, ``available()``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, overload

from ..errors import ConfigurationError
from ..registry import PLUGIN_HINT, Registry
from .hps import HPSModel

_Builder = Callable[..., HPSModel]
_PRESETS: Registry[_Builder] = Registry("model preset", builtins="mtlens.models.presets", hint=PLUGIN_HINT)
_RESERVED = ("tasks", "in_channels", "pretrained", "weights")


@overload
def register_model(name: _Builder) -> _Builder: ...
@overload
def register_model(name: str | None = None) -> Callable[[_Builder], _Builder]: ...
def register_model(name: str | _Builder | None = None) -> _Builder | Callable[[_Builder], _Builder]:
    """Register a preset builder ``fn(tasks, in_channels, pretrained, weights, **options) -> HPSModel``.

    Use as ``@register_model`` (name = function name with ``_`` → ``-``) or
    ``@register_model("resnet18-light")``. ``tasks`` arrives as ``{task: out_channels}``.
    """

    def deco(fn: Callable[..., HPSModel]) -> Callable[..., HPSModel]:
        key = (name if isinstance(name, str) else fn.__name__).strip().lower().replace("_", "-")
        params = inspect.signature(fn).parameters
        missing = [p for p in _RESERVED if p not in params]
        if missing:
            raise TypeError(f"model preset '{key}' must accept the arguments {missing}")
        return _PRESETS.register(key, fn)

    if callable(name):
        return deco(name)
    return deco


def available() -> list[str]:
    """Names of the registered model presets."""
    return _PRESETS.names()


def describe(name: str) -> str:
    """First docstring line of preset ``name`` (for listings)."""
    doc = inspect.getdoc(_get(name)) or ""
    return doc.splitlines()[0] if doc else ""


def options(name: str) -> dict[str, Any]:
    """The preset's extra options and their defaults (``create(name, tasks, **options)``)."""
    fn = _get(name)
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if k not in _RESERVED and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _get(name: str) -> Callable[..., HPSModel]:
    return _PRESETS.get(name)


def task_channels(tasks: Mapping[str, Any]) -> dict[str, int]:
    """``{task: out_channels}`` from ``{task: TaskSpec}`` (its ``out_channels``) or ``{task: int}``."""
    if not isinstance(tasks, Mapping) or len(tasks) == 0:
        raise ConfigurationError("tasks must be a non-empty dict {task name: TaskSpec or output channels}")
    out: dict[str, int] = {}
    for t, v in tasks.items():
        c = getattr(v, "out_channels", v)
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConfigurationError(
                f"task '{t}': expected a TaskSpec or a positive number of output channels, got {v!r}"
            )
        out[str(t)] = int(c)
    return out


def create(
    preset: str,
    tasks: Mapping[str, Any],
    in_channels: int | None = None,
    pretrained: bool = False,
    weights: str | None = None,
    **kw: Any,
) -> HPSModel:
    """Build the :class:`HPSModel` of ``preset`` with one head per task.

    Args:
        preset: a name from :func:`available` (case-insensitive, ``_`` or ``-``).
        tasks: ``{task: TaskSpec}`` or ``{task: out_channels}``.
        in_channels: input channels; ``None`` uses the preset's default (3 for images, 1 for
            ``lenet-multimnist``; the input size for ``mlp``).
        pretrained: load ImageNet weights into the backbone, from the local caches; a download
            only with the preset option ``download=True`` (otherwise, when not cached →
            :class:`~mtlens.errors.MissingDependencyError` naming the fix).
        weights: path of a local state_dict for the backbone/encoder (implies pretrained).
        **kw: preset options, see :func:`options`.

    >>> m = create("tiny-dense", {"seg": 3, "depth": 1})
    >>> sorted(m.task_names), m.preset
    (['depth', 'seg'], 'tiny-dense')
    """
    fn = _get(preset)
    channels = task_channels(tasks)
    allowed = options(preset)
    unknown = sorted(k for k in kw if k not in allowed)
    if unknown:
        raise ConfigurationError(
            f"model preset '{_PRESETS.canonical(preset)}' has no option(s) {unknown}; options: "
            + (", ".join(f"{k}={v!r}" for k, v in allowed.items()) or "none")
        )
    if in_channels is not None and (isinstance(in_channels, bool) or int(in_channels) < 1):
        raise ConfigurationError(f"in_channels={in_channels!r}; expected a positive integer")
    model = fn(tasks=channels, in_channels=in_channels, pretrained=bool(pretrained), weights=weights, **kw)
    model.preset = _PRESETS.canonical(preset)
    return model
