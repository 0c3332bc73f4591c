"""Bench tests: tiny suites on the ``tiny-mtl`` test benchmark (tests/train/tiny_bench.py), made
importable here, in spawned worker processes and in CLI subprocesses (PYTHONPATH); and a store of
real short MultiMNIST runs for the report tests (tests/bench/store_builder.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TRAIN = HERE.parent / "train"
for p in (str(HERE), str(TRAIN)):
    if p not in sys.path:
        sys.path.insert(0, p)

import tiny_bench  # noqa: E402,F401  (registers tiny-mtl / tiny-multi)
from store_builder import REPORT_SPECS, build_store  # noqa: E402

import mtlens  # noqa: E402,F401


@pytest.fixture
def env():
    from bench_helpers import subprocess_env

    return subprocess_env()


@pytest.fixture(scope="session")
def real_store(tmp_path_factory):
    """A store of 22 real short MultiMNIST runs (about 20 s on 2 cores): 5 methods, 3 levels, the Rep-MTL
    ablation, 2 seeds, one failed and one pending run (tests/bench/store_builder.py)."""
    return build_store(tmp_path_factory.mktemp("store"), REPORT_SPECS)


@pytest.fixture(scope="session")
def real_report(real_store):
    from mtlens.bench.report import write_report

    return write_report(real_store, n_bootstrap=200)
