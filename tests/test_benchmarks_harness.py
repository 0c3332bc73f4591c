"""benchmarks/run_all.py runs end to end on a tiny configuration (a smoke test, not a timing test)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_all():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_quick_run_writes_every_section(run_all, tmp_path):
    res = run_all.main(["--quick", "--tasks", "2", "--rounds", "1", "--min-run-time", "0.001",
                        "--sections", "scaling,monitor,stacked,cached,qm9", "--out", str(tmp_path)])
    text = (tmp_path / "benchmarks.md").read_text()
    for header in ("## Scaling with the number of tasks", "## Monitoring cost", "## Stacked losses",
                   "## Cached decisions", "## QM9", "python benchmarks/run_all.py --quick"):
        assert header in text
    assert (tmp_path / "benchmarks_scaling.png").stat().st_size > 1000
    stored = json.loads((tmp_path / "benchmarks.json").read_text())
    times = stored["scaling"]["conv/2"]["times"]
    # every row ran (no error strings), TorchJD included when installed
    assert all(isinstance(v, list) and v and v[0] > 0 for v in times.values()), times
    assert {"plain loop", "EW", "UPGrad param", "per-task Jacobian (floor)", "EW + Rep-MTL"} <= set(times)
    mem = stored["scaling"]["mlp/2"]["memory"]
    assert mem["UPGrad param"] > 0  # the per-task Jacobian blocks are allocated during the step
    assert res["cached"]["upgrad"]["k=5"][0] > 0


def test_ratio_is_the_median_of_same_round_ratios(run_all):
    times = {"a": [2.0, 4.0, 30.0], "b": [1.0, 1.0, 10.0], "c": "RuntimeError: x"}
    assert run_all.ratio(times, "a", "b") == 3.0  # rounds: 2, 4, 3
    assert run_all.ratio(times, "a", "c") != run_all.ratio(times, "a", "c")  # NaN for a failed row
    assert run_all.med(times, "a") == 4.0
