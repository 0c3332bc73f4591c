"""benchmarks/compiled.py runs (a smoke test, not a timing test): every row steps through a compiled encoder."""

from __future__ import annotations

import math

import pytest
import torch
import torch._functorch.config as functorch_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_rows_and_ratios(benchmark_script, capsys, monkeypatch):
    monkeypatch.setattr(functorch_config, "donated_buffer", functorch_config.donated_buffer)  # the script sets it
    torch._dynamo.reset()
    benchmark_script("compiled").main(["--kinds", "mlp", "--tasks", "2", "--rounds", "1", "--min-run-time", "0.01",
                                       "--backend", "aot_eager"])
    torch._dynamo.reset()
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| row")}
    for name in ("eager plain", "compiled EW", "compiled MGDA feature", "compiled UPGrad param",
                 "EW / plain, compiled", "compiled UPGrad / eager UPGrad"):
        assert math.isfinite(float(rows[name])) and float(rows[name]) > 0, (name, rows.get(name))
