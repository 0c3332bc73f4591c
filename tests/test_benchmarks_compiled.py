"""benchmarks/compiled.py runs (a smoke test, not a timing test): every row steps through a compiled encoder."""

from __future__ import annotations

import math

import pytest
import torch
import torch._functorch.config as functorch_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_rows_and_ratios(benchmark_script, capsys):
    # the script turns donated buffers off for the process: put the setting back by hand (pytest ≥ 9.2's monkeypatch
    # deletes an attribute that was not in the module's __dict__ on undo, and deleting a torch config entry hides it)
    donated = functorch_config.donated_buffer
    torch._dynamo.reset()
    try:
        benchmark_script("compiled").main(["--kinds", "mlp", "--tasks", "2", "--rounds", "1", "--min-run-time",
                                           "0.01", "--backend", "aot_eager"])
    finally:
        torch._dynamo.reset()
        functorch_config.donated_buffer = donated
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| row")}
    for name in ("eager plain", "compiled EW", "compiled MGDA feature", "compiled UPGrad param",
                 "EW / plain, compiled", "compiled UPGrad / eager UPGrad"):
        assert math.isfinite(float(rows[name])) and float(rows[name]) > 0, (name, rows.get(name))
