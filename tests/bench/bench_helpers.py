"""Helpers of the bench tests (tiny suites on tests/train/tiny_bench.py's ``tiny-mtl``)."""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN = HERE.parent / "train"


def subprocess_env() -> dict[str, str]:
    """Environment for CLI subprocesses and Ray workers: our sources and the test plugins first."""
    src = str(HERE.parents[1] / "src")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, str(HERE), str(TRAIN), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env["COLUMNS"] = "160"  # rich's width under a pipe: fixed, not whatever the CI runner's environment says
    return env


def tiny_suite(**over) -> dict:
    """A raw suite on tiny-mtl: 2 loss + 1 gradient methods (both levels), Rep-MTL variant, 2 seeds."""
    d = {
        "name": "tiny",
        "plugins": ["tiny_bench"],
        "seeds": [0, 1],
        "methods": ["ew", "dwa", "mgda"],
        "levels": ["param", "feature"],
        "variants": {"none": {}, "rep_mtl": {"regularizers": [{"name": "rep_mtl"}], "methods": ["ew"]}},
        "base": {
            "model": {"preset": "mlp", "kwargs": {"hidden": [16]}},
            "optim": {"name": "adam", "lr": 0.01},
            "train": {"epochs": 2, "batch_size": 16, "device": "cpu"},
            "monitor": {"every": 2},
        },
        "benchmarks": {"tiny-mtl": {}},
    }
    d.update(over)
    return d
