"""`mtlens bench` as a user runs it (subprocesses): listing, errors, failure isolation and retry,
and a suite killed with SIGKILL mid-run that a rerun completes without redoing finished runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from bench_helpers import tiny_suite

MTLENS = [sys.executable, "-m", "mtlens.cli.main"]


def _bench(args, env, **kw):
    return subprocess.run([*MTLENS, "bench", *args], env=env, capture_output=True, text=True, timeout=600, **kw)


def _write(tmp_path, raw, name="suite.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


def _index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def _labels(idx):
    return {(e["label"], e["seed"]): e for e in idx["runs"]}


def test_list_and_errors(env, tmp_path):
    r = _bench(["--list"], env)
    assert r.returncode == 0, r.stderr
    for name in ("quick", "fashion", "efficiency-paper", "rep-mtl"):
        assert name in r.stdout
    assert "mtlens[nash]" in r.stdout  # descriptions are printed verbatim (no markup eaten)
    r = _bench(["quik"], env)
    assert r.returncode == 2 and "unknown suite 'quik'. Did you mean 'quick'" in r.stderr
    assert "Traceback" not in r.stderr
    r = _bench(["efficiency-paper", "--out", str(tmp_path / "e")], env)
    assert r.returncode == 2 and "--root nyuv2=PATH" in r.stderr
    r = _bench([str(_write(tmp_path, tiny_suite(methods=["ew", "graddrop"], levels=["param"])))], env)
    assert r.returncode == 2 and "'graddrop' works at level(s) feature only" in r.stderr


def test_failing_run_is_recorded_and_retried(env, tmp_path):
    marker = tmp_path / "fail-now"
    marker.write_text("x")
    env = {**env, "MTLENS_TEST_FLAKY": str(marker)}
    raw = tiny_suite(plugins=["tiny_bench", "bench_plugin"], seeds=[0], methods=["ew", "flaky", "dwa"],
                     variants={"none": {}})
    suite = _write(tmp_path, raw)
    out = tmp_path / "store"
    r = _bench([str(suite), "--out", str(out)], env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "flaky: injected failure for the test" in r.stderr and "rerun the same command" in r.stderr
    runs = _labels(_index(out))
    flaky = runs[("flaky", 0)]
    assert flaky["status"] == "failed" and "RuntimeError: flaky: injected failure" in flaky["error"]
    assert "Traceback" in flaky["traceback"] and "combine" in flaky["traceback"] and flaky["results"] is None
    assert json.loads((out / flaky["dir"] / "run.json").read_text())["status"] == "failed"
    # the failure stopped nothing: every other run finished
    assert all(e["status"] == "done" for k, e in runs.items() if k[0] != "flaky")

    marker.unlink()
    r = _bench([str(suite), "--out", str(out)], env)
    assert r.returncode == 0, r.stdout + r.stderr
    again = _labels(_index(out))
    assert again[("flaky", 0)]["status"] == "done" and again[("flaky", 0)]["attempts"] == 2
    assert again[("flaky", 0)]["error"] is None and again[("flaky", 0)]["traceback"] is None
    for k, e in runs.items():
        if k[0] != "flaky":
            assert again[k] == e  # not rerun
    assert f"results store: {out}" in r.stdout
    assert "5 done; 4 already done before this run" in r.stderr


def test_a_diverging_run_fails_alone(env, tmp_path):
    """Under train.nonfinite=skip a run whose every step is skipped stops with an error; it used to be a
    DataError, which the suite takes for broken data: every other run of the benchmark was failed unstarted
    ("not run: the data of benchmark 'tiny-mtl' is missing or broken")."""
    raw = tiny_suite(plugins=["tiny_bench", "bench_plugin"], seeds=[0], methods=["ew", "diverging", "dwa", "uw"],
                     variants={"none": {}}, set=["train.nonfinite=skip"])
    out = tmp_path / "store"
    r = _bench([str(_write(tmp_path, raw)), "--out", str(out), "--workers", "1", "--no-report"], env)
    assert r.returncode == 1, r.stdout + r.stderr
    runs = _labels(_index(out))
    bad = runs[("diverging", 0)]
    assert bad["status"] == "failed" and bad["error"].startswith("NonFiniteError: epoch"), bad["error"]
    assert "every step was skipped" in bad["error"]
    assert all(e["status"] == "done" for k, e in runs.items() if k[0] != "diverging"), runs
    assert "missing or broken" not in r.stderr


def test_missing_dependency_baseline_failure_marks_dependents(env, tmp_path):
    """A failing STL baseline: the runs that need it are failed without starting, with the reason."""
    raw = tiny_suite(seeds=[0], methods=["ew"], variants={"none": {}},
                     set=["optim.lr=1e30", "train.nonfinite=raise"])
    out = tmp_path / "store"
    r = _bench([str(_write(tmp_path, raw)), "--out", str(out)], env)
    assert r.returncode == 1
    runs = _labels(_index(out))
    assert runs[("STL a", 0)]["status"] == "failed" or runs[("STL b", 0)]["status"] == "failed"
    ew = runs[("ew", 0)]
    assert ew["status"] == "failed" and ew["attempts"] == 0
    assert "not run: its single-task baseline(s)" in ew["error"]


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:  # pragma: no cover
        return []
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_mid_suite_then_rerun_completes_only_what_is_missing(env, tmp_path, workers):
    raw = tiny_suite(seeds=[0], methods=["ew", "dwa", "mgda"], levels=["param"], variants={"none": {}},
                     set=["train.epochs=12", "checkpoint.every_steps=1", "monitor.every=0"])
    suite = _write(tmp_path, raw)
    out = tmp_path / "store"
    proc = subprocess.Popen([*MTLENS, "bench", str(suite), "--out", str(out), "--workers", str(workers),
                             "--threads", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    killed_running = []
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            time.sleep(0.02)
            try:
                idx = _index(out)
            except (OSError, json.JSONDecodeError):
                continue
            done = [e for e in idx["runs"] if e["status"] == "done"]
            running = [e for e in idx["runs"] if e["status"] == "running"
                       and (out / e["dir"] / "checkpoint.pt").exists()]
            if done and running:
                workers_pids = _children(proc.pid)
                os.kill(proc.pid, signal.SIGKILL)  # the driver dies at once, no cleanup
                killed_running = running
                break
            assert proc.poll() is None, "the suite finished before it could be killed; make the runs longer"
        else:
            pytest.fail("no moment with a finished run and a checkpointed running run")
        proc.wait(timeout=30)
        for pid in workers_pids:  # worker processes die with the driver (PR_SET_PDEATHSIG)
            for _ in range(200):
                if not _alive(pid):
                    break
                time.sleep(0.05)
            assert not _alive(pid), f"worker {pid} outlived the killed driver"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    before = _index(out)  # the store still reads back after the kill
    for e in before["runs"]:
        assert json.loads((out / e["dir"] / "run.json").read_text())["key"] == e["key"] if (
            out / e["dir"] / "run.json").exists() else True
    done_before = {e["key"]: e for e in before["runs"] if e["status"] == "done"}
    # runs caught mid-training (the snapshot taken before the kill may be a moment old)
    interrupted = [e for e in before["runs"] if e["status"] == "running"
                   and not (out / e["dir"] / "results.json").exists()]
    assert interrupted or killed_running

    r = _bench([str(suite), "--out", str(out), "--workers", str(workers), "--threads", "1"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    after = {e["key"]: e for e in _index(out)["runs"]}
    assert all(e["status"] == "done" for e in after.values())
    for k, e in done_before.items():
        assert after[k] == e, "a finished run was redone"
    for e in interrupted:
        assert after[e["key"]]["attempts"] == 2
    # resumed runs end exactly like uninterrupted ones (same seeds, one thread each)
    ref = tmp_path / "ref"
    r = _bench([str(suite), "--out", str(ref), "--threads", "1"], env)
    assert r.returncode == 0, r.stderr
    ref_idx = {e["key"]: e for e in _index(ref)["runs"]}
    assert set(ref_idx) == set(after)
    for k in after:
        a = json.loads((out / after[k]["results"]).read_text())
        b = json.loads((ref / ref_idx[k]["results"]).read_text())
        assert a["metrics"] == b["metrics"], after[k]["label"]


def test_rerun_of_a_finished_suite_writes_nothing(env, tmp_path):
    suite = _write(tmp_path, tiny_suite(seeds=[0], methods=["ew", "dwa"], variants={"none": {}}))
    out = tmp_path / "store"
    r = _bench([str(suite), "--out", str(out)], env)
    assert r.returncode == 0, r.stderr
    assert f"report: {out / 'report' / 'report.html'}" in r.stdout
    # the status line is a line of its own (print(*renderables) used to glue it to the last note)
    assert any(ln.startswith("4 runs in the store: 4 finished.") for ln in r.stdout.splitlines()), r.stdout
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != ".mtlens.lock")
    stamps = {p: p.stat().st_mtime_ns for p in files}
    r = _bench([str(suite), "--out", str(out)], env)
    assert r.returncode == 0, r.stderr
    assert "4 already done before this run" in r.stderr and "the report is up to date" in r.stderr
    assert "ew" in r.stdout and "dwa" in r.stdout  # the leaderboard is printed again
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    # a report written by another version of mtlens (its fingerprint covers the report code) is rewritten
    (out / "report" / ".fingerprint").write_text("a report of mtlens 0.0\n")
    r = _bench([str(suite), "--out", str(out)], env)
    assert r.returncode == 0, r.stderr
    assert "the report is up to date" not in r.stderr
    assert (out / "report" / "report.html").stat().st_mtime_ns != stamps[out / "report" / "report.html"]
