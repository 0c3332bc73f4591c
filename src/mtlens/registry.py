"""One registry type for methods, model presets and benchmarks: one name normalisation, one error.

>>> from mtlens.registry import Registry
>>> colours = Registry("colour")
>>> _ = colours.register("dark-red", 0x8B0000)
>>> colours.get("Dark_Red") == 0x8B0000, colours.canonical("DARK_RED")
(True, 'dark-red')
>>> colours.get("dark-rde")
Traceback (most recent call last):
...
mtlens.errors.ConfigurationError: unknown colour 'dark-rde'. Did you mean 'dark-red'? Available: dark-red

Names are compared after :func:`normalise_name` (case, surrounding spaces and ``-`` versus ``_``
do not matter); each entry keeps the spelling it was registered with (``nash_mtl``,
``resnet18-light``, ``office-31``), which is what listings show.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ConfigurationError

__all__ = ["Registry", "normalise_name"]

T = TypeVar("T")


def normalise_name(name: str) -> str:
    """The lookup key of a registry name: stripped, lower case, ``_`` read as ``-``."""
    return name.strip().lower().replace("_", "-")


class Registry(Generic[T]):
    """Registered names → objects of one kind.

    Args:
        kind: what an entry is, for messages (``"method"``, ``"model preset"``, ``"benchmark"``).
        builtins: what registers the built-in entries, run on first lookup: a module name (imported)
            or a function (called). The registering modules import the registry, never the other
            way round.
        replace: a second registration of a name replaces the first (otherwise :class:`ValueError`
            unless it is the same object).
    """

    def __init__(
        self, kind: str, *, builtins: str | Callable[[], object] | None = None, replace: bool = False
    ) -> None:
        self.kind = kind
        self._builtins = builtins
        self._replace = replace
        self._entries: dict[str, tuple[str, T]] = {}

    def _load(self) -> None:
        if self._builtins is not None:
            load, self._builtins = self._builtins, None
            try:
                importlib.import_module(load) if isinstance(load, str) else load()
            except BaseException:
                self._builtins = load  # retried (and raised again) at the next lookup
                raise

    def register(self, name: str, obj: T) -> T:
        """Add ``obj`` under ``name``; return ``obj`` (usable from a decorator)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        key = normalise_name(name)
        if key in self._entries and self._entries[key][1] is not obj and not self._replace:
            raise ValueError(f"{self.kind} name '{name}' registered twice")
        self._entries[key] = (name.strip(), obj)
        return obj

    def get(self, name: str) -> T:
        """The entry registered as ``name``; :class:`~mtlens.errors.ConfigurationError` naming close matches."""
        self._load()
        key = normalise_name(name) if isinstance(name, str) else None
        if key is None or key not in self._entries:
            names = self.names()
            close = difflib.get_close_matches(str(name).strip().lower(), names, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigurationError(f"unknown {self.kind} '{name}'.{hint} Available: {', '.join(names)}")
        return self._entries[key][1]

    def canonical(self, name: str) -> str:
        """The registered spelling of ``name`` (ConfigurationError when unknown)."""
        self.get(name)
        return self._entries[normalise_name(name)][0]

    def names(self) -> list[str]:
        """Registered names (as registered), sorted."""
        self._load()
        return sorted(n for n, _ in self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs sorted by name."""
        self._load()
        return sorted(self._entries.values(), key=lambda e: e[0])

    def pop(self, name: str, default: T | None = None) -> T | None:
        """Remove ``name`` (tests register temporary entries); ``default`` when absent."""
        entry = self._entries.pop(normalise_name(name), None)
        return default if entry is None else entry[1]

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and normalise_name(name) in self._entries

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"
