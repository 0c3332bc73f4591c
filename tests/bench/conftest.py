"""Bench tests run tiny suites on the ``tiny-mtl`` test benchmark (tests/train/tiny_bench.py), made
importable here, in spawned worker processes and in CLI subprocesses (PYTHONPATH)."""

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

import mtlens  # noqa: E402,F401


@pytest.fixture
def env():
    from bench_helpers import subprocess_env

    return subprocess_env()
