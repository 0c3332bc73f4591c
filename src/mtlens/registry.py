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

Plugins (your own benchmarks, model presets and methods, registered by importing your module):
:func:`import_plugins` imports them with a one-line error; :func:`plugin_modules` adds the
modules named in the environment variable ``MTLENS_PLUGINS`` (comma-separated), which every
``mtlens`` command and every bench worker imports (docs/benchmark.md, "Your own benchmark, model
and method").
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from .errors import ConfigurationError

__all__ = ["PLUGINS_ENV", "PLUGIN_HINT", "Registry", "import_plugins", "normalise_name", "plugin_modules"]

T = TypeVar("T")


def normalise_name(name: str) -> str:
    """The lookup key of a registry name: stripped, lower case, ``_`` read as ``-``."""
    return name.strip().lower().replace("_", "-")


#: The environment variable naming plugin modules (comma-separated) that every ``mtlens`` command imports.
PLUGINS_ENV = "MTLENS_PLUGINS"

#: What an "unknown name" error of a registry adds: how to make one's own entries known.
PLUGIN_HINT = (
    "Your own? Import the module that registers it: `plugins: [MODULE]` in a suite, "
    f"`mtlens --plugin MODULE ...` or {PLUGINS_ENV}=MODULE for any command "
    "(docs/benchmark.md, \"Your own benchmark, model and method\")"
)


def plugin_modules(extra: Iterable[str] = ()) -> list[str]:
    """``extra`` then the modules of ``$MTLENS_PLUGINS`` (comma-separated), each once, in that order."""
    names = [*extra, *os.environ.get(PLUGINS_ENV, "").split(",")]
    out: list[str] = []
    for n in (n.strip() for n in names):
        if n and n not in out:
            out.append(n)
    return out


def import_plugins(modules: Iterable[str], *, search: Iterable[str | os.PathLike] = (),
                   where: str = "plugins") -> None:
    """Import each plugin module (its import registers benchmarks, model presets, methods).

    A module that cannot be found raises :class:`~mtlens.errors.ConfigurationError` in one line; when a
    directory of ``search`` (the suite file's directory) holds it (``DIR/name/`` or ``DIR/name.py``), the
    message names the ``PYTHONPATH`` that makes it importable. Errors raised by the module's own code
    propagate with their traceback (they point at the plugin's line)."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            top = mod.split(".")[0]
            if exc.name is not None and exc.name != mod and not mod.startswith(exc.name + "."):
                raise ConfigurationError(  # the plugin was found; a module IT imports is missing
                    f"{where}: importing '{mod}' failed: {exc}; install what it imports"
                ) from None
            found = [Path(d).resolve() for d in search
                     if (Path(d) / top).is_dir() or (Path(d) / f"{top}.py").is_file()]
            fix = (f"it is in {found[0]}: run with PYTHONPATH={found[0]} (the driver's and every worker's)"
                   if found else "make it importable (PYTHONPATH) on the driver and every worker")
            raise ConfigurationError(f"{where}: cannot import '{mod}' ({exc}); {fix}") from None
        except ImportError as exc:
            raise ConfigurationError(f"{where}: cannot import '{mod}' ({exc})") from None


class Registry(Generic[T]):
    """Registered names → objects of one kind.

    Args:
        kind: what an entry is, for messages (``"method"``, ``"model preset"``, ``"benchmark"``).
        builtins: what registers the built-in entries, run on first lookup: a module name (imported)
            or a function (called). The registering modules import the registry, never the other
            way round. An entry registered from outside mtlens (a plugin) loads them first, so a
            plugin's entry always comes after the built-ins: it replaces a built-in of the same name
            where ``replace`` is set, and is refused at its own registration otherwise.
        replace: a second registration of a name replaces the first (otherwise :class:`ValueError`
            unless it is the same object).
        hint: text added to the "unknown name" error (the registries of methods, model presets and
            benchmarks: :data:`PLUGIN_HINT`).
    """

    def __init__(
        self, kind: str, *, builtins: str | Callable[[], object] | None = None, replace: bool = False,
        hint: str = "",
    ) -> None:
        self.kind = kind
        self._builtins = builtins
        self._replace = replace
        self._hint = hint
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
        if not _mtlens_own(obj):  # a plugin: the built-ins first, so that a clash shows here, not later
            self._load()
        key = normalise_name(name)
        if key in self._entries and self._entries[key][1] is not obj and not self._replace:
            raise ValueError(
                f"{self.kind} name '{name}' is already registered (by {_qualname(self._entries[key][1])}); "
                f"register {_qualname(obj)} under another name"
            )
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
            tail = f". {self._hint}" if self._hint else ""
            raise ConfigurationError(f"unknown {self.kind} '{name}'.{hint} Available: {', '.join(names)}{tail}")
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


def _mtlens_own(obj: object) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module == "mtlens" or module.startswith("mtlens.")


def _qualname(obj: object) -> str:
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{name}" if module else str(name)
