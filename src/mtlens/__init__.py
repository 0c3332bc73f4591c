"""mtlens: multi-task learning optimisation through representation-level task saliency."""

import types

from .engine import StepRecord, mtl_backward

__version__ = "0.1.0"

__all__ = ["StepRecord", "__version__", "mtl_backward"]

_SUBPACKAGES = (
    "bench", "data", "diagnose", "engine", "errors", "methods", "models", "registry", "storage", "tasks", "train",
)


def __getattr__(name: str) -> types.ModuleType:
    """``mtlens.methods.create(...)`` after a bare ``import mtlens``: subpackages load on first use."""
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mtlens' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBPACKAGES])
