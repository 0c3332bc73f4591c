"""The exceptions mtlens raises. Each message names the problem and the fix."""

from __future__ import annotations

import types


class MTLensError(Exception):
    """Base class of every mtlens error."""


class ConfigurationError(MTLensError, ValueError):
    """An impossible combination of options (e.g. graddrop at parameter level)."""


class NonFiniteError(MTLensError, FloatingPointError):
    """A loss or gradient is NaN or infinite; nothing was written into ``.grad``."""


class ShapeError(MTLensError, ValueError):
    """Tensors whose shapes do not fit together (saliencies, features, batches)."""


class MissingDependencyError(MTLensError, ImportError):
    """An optional dependency is not installed; the message gives the pip command."""


class SolverError(MTLensError, RuntimeError):
    """An optimisation sub-problem (QP, CCP, ...) failed to solve at a step."""


class DataError(MTLensError, FileNotFoundError):
    """A dataset directory is missing or malformed; the message names the expected layout."""


class CheckpointError(MTLensError, RuntimeError):
    """A checkpoint is missing, truncated or does not match the run."""


class IntegrityError(CheckpointError):
    """A stored file's content does not match the hash recorded when mtlens wrote it (or carries none)."""


class GraphFreedError(MTLensError, RuntimeError):
    """Autograd found part of the losses' graph already freed: the losses were differentiated before, or a loss
    reaches the encoder around ``features`` (a route the step frees before it uses the encoder's graph)."""


class LockHeldError(MTLensError, RuntimeError):
    """Another process holds the directory (run, baseline cache entry, bench store); the message names it."""


class OutputPathError(MTLensError, OSError):
    """An output location cannot be written (a file in the way, read-only, disk full); names the path and fix."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def require(module: str, extra: str, purpose: str) -> types.ModuleType:
    """Import an optional dependency or raise :class:`MissingDependencyError` with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in tests
        raise MissingDependencyError(
            f"{purpose} needs the optional package '{module}', which is not installed. "
            f"Install it with: pip install 'mtlens[{extra}]'"
        ) from exc
