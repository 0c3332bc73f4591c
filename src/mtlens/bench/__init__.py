"""Benchmark suites: many runs from one YAML file, a results store, local and Ray executors.

>>> from mtlens.bench import available_suites
>>> "quick" in available_suites()
True

Run one from Python (the command line ``mtlens bench`` is a thin layer over this)::

    from mtlens.bench import load_suite, run_suite
    summary = run_suite(load_suite("quick"), "bench/quick", workers=2)

See docs/benchmark.md for the suite format, the built-in suites and the store layout.
"""

from __future__ import annotations

from .runner import SuiteSummary, run_suite
from .store import Store, load_index, run_key
from .suite import RunSpec, Suite, available_suites, describe_suites, expand, load_suite

__all__ = [
    "RunSpec",
    "Store",
    "Suite",
    "SuiteSummary",
    "available_suites",
    "describe_suites",
    "expand",
    "load_index",
    "load_suite",
    "run_key",
    "run_suite",
]
