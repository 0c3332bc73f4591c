"""benchmarks/run_all.py runs end to end on a tiny configuration (a smoke test, not a timing test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _markdown import markdown_tables_are_rectangular


@pytest.fixture(scope="module")
def run_all(benchmark_script):
    return benchmark_script("run_all")


@pytest.mark.parametrize("flags", [["--quick"], ["--sections", "scaling"], ["--tasks", "2"], ["--no-memory"]])
def test_a_partial_run_without_out_is_refused_before_anything_runs(run_all, flags, capsys):
    """docs/benchmarks.md is the published page: a smoke or partial run must not replace it unless asked to."""
    page = Path(run_all.__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    before = page.stat().st_mtime_ns if page.exists() else None
    with pytest.raises(SystemExit) as exc:
        run_all.main(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flags[0] in err and "--out DIR" in err and "docs/benchmarks.md" in err
    assert (page.stat().st_mtime_ns if page.exists() else None) == before


@pytest.mark.slow
def test_quick_run_writes_every_section(run_all, tmp_path):
    res = run_all.main(["--quick", "--tasks", "2", "--rounds", "1", "--min-run-time", "0.001",
                        "--sections", "scaling,monitor,stacked,cached,qm9", "--out", str(tmp_path)])
    text = (tmp_path / "benchmarks.md").read_text()
    for header in ("## Scaling with the number of tasks", "## Monitoring cost", "## Stacked losses",
                   "## Cached decisions", "## QM9", "python benchmarks/run_all.py --quick"):
        assert header in text
    assert markdown_tables_are_rectangular(text) >= 8
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


def test_measure_alternates_the_rows_step_by_step(run_all):
    """Rows are called in turn, one step each, so the two rows of a ratio see the same load; a row leaves
    the rotation once it has run min_run_time in the round; a failing row is recorded as its error."""
    calls: list[str] = []

    def row(name):
        return lambda: calls.append(name)

    def broken():
        raise ValueError("no such op")

    times = run_all.measure({"a": row("a"), "b": row("b"), "bad": broken}, rounds=3, min_run_time=0.0)
    assert calls[:4] == ["a", "a", "b", "b"]  # warm-up: two calls each
    cycles = [calls[i:i + 2] for i in range(4, len(calls), 2)]
    assert len(cycles) == 3 and all(sorted(c) == ["a", "b"] for c in cycles)  # one step of each row per cycle
    assert len(times["a"]) == len(times["b"]) == 3 and all(t >= 0 for t in times["a"])
    assert times["bad"].startswith("ValueError: no such op")
    calls.clear()
    times = run_all.measure({"a": row("a"), "b": row("b")}, rounds=1, min_run_time=1e-4)
    timed = calls[4:]  # full cycles (any order) while both rows are in the rotation, then the one left alone
    n = min(timed.count("a"), timed.count("b"))
    assert n >= 1 and all(sorted(timed[i:i + 2]) == ["a", "b"] for i in range(0, 2 * n, 2))
    assert len(set(timed[2 * n:])) <= 1


def test_floor_is_the_faster_exact_jacobian(run_all):
    loop, batched = "per-task Jacobian (loop)", "per-task Jacobian (batched)"
    times = run_all.add_floor({"EW": [1.0, 1.0, 1.0], loop: [3.0, 2.0, 2.2], batched: [2.5, 4.0, 2.4],
                               "UPGrad param": [3.3, 2.2, 2.2]})
    assert list(times) == ["EW", loop, batched, run_all.FLOOR, "UPGrad param"]  # inserted after its two ways
    assert times[run_all.FLOOR] == [3.0, 2.0, 2.2]  # the loop: median 2.2 against 2.5
    assert run_all.ratio(times, "UPGrad param", run_all.FLOOR) == pytest.approx(1.1)  # rounds: 1.1, 1.1, 1.0
    failed = run_all.add_floor({loop: [3.0], batched: "RuntimeError: no batching rule"})
    assert failed[run_all.FLOOR] == [3.0]  # vmap could not run: the loop is the floor


@pytest.mark.slow
def test_fixed_cost_script_prints_both_tables(capsys, benchmark_script, tmp_path):
    """benchmarks/fixed_cost.py (EW against a plain loop, the FD monitor against its floor) runs end to end."""
    mod = benchmark_script("fixed_cost")
    mod.main(["--steps", "1", "--kinds", "conv", "--tasks", "2", "--fd-tasks", "2", "--fd-fused", "aot_eager"])
    out = capsys.readouterr().out
    assert "| conv, T=2 |" in out and "EW / plain" in out and "EW / floor" in out and "FD / step" in out
    assert "EW / contract" in out and "FD fused / step" in out  # the contract floor; FD as one compiled function
    assert "nan" not in out and markdown_tables_are_rectangular(out) == 2  # the FD table's ``T·|Z|`` escaped
    # --reference: another revision's engine (here this one, renamed) in the same rounds
    import shutil
    import sys

    src = Path(mod.__file__).resolve().parents[1] / "src" / "mtlens"
    shutil.copytree(src, tmp_path / "mtlens_ref", ignore=shutil.ignore_patterns("__pycache__"))
    try:
        mod.main(["--steps", "1", "--kinds", "mlp", "--tasks", "2", "--fd-tasks", "", "--reference", str(tmp_path)])
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "mtlens_ref" or m.startswith("mtlens_ref.")]:
            del sys.modules[name]
    out = capsys.readouterr().out
    assert "| mlp, T=2 |" in out and "EW / EW ref" in out and "nan" not in out
    assert "FD / step" not in out and markdown_tables_are_rectangular(out) == 1  # --fd-tasks "": no empty FD table
    # --parts: EW's fixed cost part by part; the engine's functions are put back afterwards
    import torch

    import mtlens.engine.backward as B

    before = {k: getattr(B, k) for k in ("objective_leaves", "_lean_losses", "all_finite", "_accumulate", "_loss_step",
                                         "vjp")}
    mod.main(["--parts", "--steps", "2", "--kinds", "conv", "--tasks", "2"])
    out = capsys.readouterr().out
    assert "| graph walk: the leaves to write |" in out and "| EW − plain" in out and "nan" not in out
    assert all(getattr(B, k) is f for k, f in before.items()) and torch.autograd.grad.__module__ == "torch.autograd"
    # --lines: the lean loss step statement by statement, from an instrumented copy; the step is put back afterwards
    mod.main(["--lines", "--steps", "2", "--kinds", "conv", "--tasks", "2"])
    out = capsys.readouterr().out
    assert "| 0 | `(mtl_backward: its option checks and the call)` |" in out and "objective_leaves_direct" in out
    assert "backward_into_grad" in out and "nan" not in out and all(getattr(B, k) is f for k, f in before.items())


def test_contract_floor_writes_the_gradients_of_ew_and_refuses_a_non_finite_loss(benchmark_script):
    """fixed_cost.py's contract floor is an exact EW step (the same .grad) and keeps the promise it stands for."""
    import torch

    from mtlens.engine import mtl_backward
    from mtlens.methods import create

    mod = benchmark_script("fixed_cost")
    w = mod.Workload("conv", 3, 4)
    mod.contract_floor_step(w)
    a = [p.grad.clone() for p in w.params]
    w.zero()
    z, losses = w.forward()
    mtl_backward(losses, method=create("ew"), features=z, shared_params=w.shared)
    for x, p in zip(a, w.params):
        assert torch.equal(x, p.grad)
    forward = w.forward  # an infinite loss whose gradients are finite: only the losses' check can refuse it
    w.forward = lambda: (lambda z, ls: (z, {**ls, "task00": ls["task00"] + float("inf")}))(*forward())
    with pytest.raises(FloatingPointError):
        mod.contract_floor_step(w)
    assert all(p.grad is None for p in w.params)


def test_noise_statement_follows_the_measured_load(run_all):
    """The page states the load the run met, not a fixed story (it once said "4 other developers'
    jobs" on an idle machine)."""
    idle = run_all.noise_line(0.5, 1.0, 2)
    busy = run_all.noise_line(3.9, 4.2, 2)
    assert "otherwise idle" in idle and "0.5" in idle and "1.0" in idle
    assert "shared during this run" in busy and "3.9" in busy and "4.2" in busy
    assert "idle" not in busy.split("Rerun")[0]


def test_targets_classify_each_point_against_its_floor(run_all):
    nan = float("nan")
    c = run_all.classify([(1.02, 1.01, "a"), (1.03, 1.0, "b")], 1.03)
    assert c["verdict"] == "yes" and c["met"] == ["a", "b"]
    # beyond the target only where the same-round arithmetic floor is beyond it too: the maths forbids it there
    c = run_all.classify([(1.01, 1.0, "a"), (1.30, 1.20, "b T=40")], 1.15)
    assert c["verdict"] == "floor" and c["floor"] == ["b T=40"]
    # beyond the target with its floor within it: the engine's own cost, a miss; just beyond it: noise, still a miss
    c = run_all.classify([(1.30, 1.20, "b"), (1.20, 1.05, "c"), (1.16, 1.05, "d")], 1.15)
    assert c["verdict"] == "**no**" and c["engine"] == ["c"] and c["floor"] == ["b"] and c["noise"] == ["d"]
    # no floor measured: every point beyond the target is a miss, not attributed to the engine
    c = run_all.classify([(1.2, nan, "a")], 1.1)
    assert c["verdict"] == "**no**" and c["no floor"] == ["a"] and not c["engine"]
    # a point that failed (NaN) is never read as met
    c = run_all.classify([(1.0, 1.0, "a"), (nan, nan, "b")], 1.15)
    assert c["verdict"] == "**no**" and c["not measured"] == ["b"]
    # higher is better (TorchJD's time / mtlens'): classified directly, no inversion of a median
    c = run_all.classify([(1.19, nan, "a"), (0.99, nan, "b"), (0.9, nan, "c")], 1.0, higher_is_better=True)
    assert c["met"] == ["a"] and c["noise"] == ["b"] and c["no floor"] == ["c"] and c["verdict"] == "**no**"
    assert run_all._detail(c) == "met 1; within 2% (noise) 1 (b); beyond it, no floor row 1 (c)"


def test_arithmetic_floor_rows_write_the_same_gradients_as_the_engine(run_all):
    """The floors are exact implementations of the rows they bound (not cheaper approximations)."""
    import torch

    from mtlens.methods import create

    w = run_all.Workload("mlp", 3, 16)
    methods = {n: create(n) for n in ("ew", "mgda", "upgrad", "pcgrad", "rep_mtl")}
    methods["uw"] = create("uw", num_tasks=3)
    rows = run_all.step_fns(w, methods, batched_autogram=False)
    for floor, row in (("plain + finiteness check (EW floor)", "EW"),
                       ("MGDA feature arithmetic (floor)", "MGDA feature"),
                       ("UPGrad param arithmetic (floor)", "UPGrad param"),
                       ("EW + Rep-MTL arithmetic (floor)", "EW + Rep-MTL")):
        rows[floor]()
        a = [p.grad.clone() for p in w.params]
        rows[row]()
        b = [p.grad.clone() for p in w.params]
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=f"{floor} vs {row}")
