"""`mtlens bench` stopped the ways a user stops it: Ctrl-C (SIGINT to the driver alone, or to the whole process
group as a terminal sends it) and a worker process killed under it (the kernel's OOM killer, `kill -9`).

Ctrl-C must stop the suite at once (never wait for the runs in flight to finish: hours for a real run), print
one line and exit 130, with no traceback from the worker processes and none left behind; a rerun continues.
A dead worker breaks Python's process pool: the runs in flight on it are lost, but the suite must go on with the
others (it used to crash with a BrokenProcessPool traceback and leave the rest pending)."""

from __future__ import annotations

import contextlib
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


def _suite(tmp_path: Path, epochs: int) -> Path:
    raw = tiny_suite(seeds=[0], methods=["ew", "dwa", "mgda"], levels=["param"], variants={"none": {}},
                     set=[f"train.epochs={epochs}", "monitor.every=0"])
    p = tmp_path / "suite.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _runs(out: Path) -> list[dict] | None:
    try:
        return json.loads((out / "index.json").read_text())["runs"]
    except (OSError, ValueError, KeyError):
        return None


def _workers(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    pids = []
    for p in out.split():
        try:
            if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes():
                pids.append(int(p))
        except OSError:
            pass
    return pids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _start(suite: Path, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([*MTLENS, "bench", str(suite), "--out", str(out), "--workers", "2", "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            # a test runner started in the background (`cmd &` in a script) ignores SIGINT, and the
                            # driver would inherit that (and never stop): the disposition a terminal user has
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(proc: subprocess.Popen, out: Path, kind: str, timeout: float = 180, workers: int = 1) -> list[int]:
    """Wait until a run of ``kind`` is running with ``workers`` worker processes started; return their pids.
    (A cold interpreter on a loaded machine takes tens of seconds to get there: the limit is generous.)"""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.05)
        assert proc.poll() is None, "the suite ended before the test could stop it"
        runs = _runs(out)
        if runs and any(e["status"] == "running" and e["kind"] == kind for e in runs):
            found = _workers(proc.pid)
            if len(found) >= workers:
                time.sleep(0.5)  # let the run get going
                return found
    pytest.fail(f"no {kind} run started within {timeout} s")


def _stacks_of(proc: subprocess.Popen) -> str:
    """The driver's Python stacks (faulthandler, on SIGABRT: the env sets PYTHONFAULTHANDLER), for a failure
    message: where it was when it did not stop."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGABRT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        return proc.communicate(timeout=10)[1]
    return "(no stacks)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
@pytest.mark.parametrize("target", ["driver", "group"])
def test_ctrl_c_stops_the_suite_at_once_and_leaves_no_worker(env, tmp_path, target):
    suite, out = _suite(tmp_path, epochs=30000), tmp_path / "store"  # each STL run alone takes many minutes
    proc = _start(suite, out, {**env, "PYTHONFAULTHANDLER": "1"})
    try:
        workers = _wait_for(proc, out, "stl", workers=2)  # both STL runs submitted: the driver waits on them
        t0 = time.time()
        (os.killpg if target == "group" else os.kill)(proc.pid, signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=60)  # "at once" against runs of many minutes, on a loaded machine
        except subprocess.TimeoutExpired:
            pytest.fail("Ctrl-C did not stop the suite within 60 s: the driver waits for the runs in flight to "
                        f"finish. Its stacks:\n{_stacks_of(proc)}")
        assert time.time() - t0 < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr, stderr
    assert "interrupted; rerun the same command to continue" in stderr
    for pid in workers:
        assert not _alive(pid), f"worker {pid} outlived the interrupted suite"
    runs = _runs(out)
    assert runs and not any(e["status"] in ("done", "failed") for e in runs), runs  # nothing recorded wrongly


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_killed_worker_fails_its_runs_and_the_suite_goes_on(env, tmp_path):
    suite, out = _suite(tmp_path, epochs=60), tmp_path / "store"
    proc = _start(suite, out, env)
    try:
        workers = _wait_for(proc, out, "mtl")
        os.kill(workers[0], signal.SIGKILL)  # what the OOM killer does
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert "Traceback" not in stderr and "BrokenProcessPool:" not in stderr, stderr
    assert proc.returncode == 1, stderr
    runs = {e["label"]: e for e in _runs(out) or []}
    lost = [e for e in runs.values() if e["status"] == "failed"]
    assert lost and all(e["error"].startswith("worker lost: a worker process died") for e in lost), lost
    assert "rerun the same command" in lost[0]["error"]
    # the runs not in flight when the worker died still ran
    assert all(e["status"] in ("done", "failed") for e in runs.values()), runs
    assert sum(e["status"] == "done" for e in runs.values()) >= 3
    assert "rerun the same command to" in " ".join(stderr.split())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL of a pool process")
def test_an_idle_worker_killed_between_runs_does_not_stop_the_next_submit():
    """A worker killed while it had no run breaks the pool too; the next submit used to raise BrokenProcessPool
    out of the suite (a traceback, the remaining runs never started)."""
    from mtlens.bench.executors import LocalExecutor

    ex = LocalExecutor(workers=2, threads=1)
    ex.start()
    try:
        ex.submit({"key": "a", "config": {}})  # not a run config: execute() reports it failed, at once
        ((job, outcome),) = ex.wait()
        assert job["key"] == "a" and outcome["status"] == "failed" and "KeyError" in outcome["error"]
        assert ex._pool is not None
        procs = list(ex._pool._processes.values())
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
        for proc in procs:
            proc.join(timeout=30)
        deadline = time.time() + 30
        while not ex._pool._broken and time.time() < deadline:  # the pool's manager thread notices the deaths
            time.sleep(0.05)
        ex.submit({"key": "b", "config": {}})
        ((job, outcome),) = ex.wait()
        assert job["key"] == "b" and "KeyError" in outcome["error"]  # it ran, on a fresh pool
    finally:
        ex.abort()


def test_a_ctrl_c_while_the_driver_reads_a_result_stops_the_suite():
    """The executor's `except BaseException` (a dead worker) also caught the driver's own KeyboardInterrupt when it
    landed while a finished run's result was read: the run was recorded as failed ("worker lost: KeyboardInterrupt")
    and the suite went on."""
    from concurrent.futures import Future

    from mtlens.bench.executors import LocalExecutor

    ex = LocalExecutor(workers=2, threads=1)
    interrupted: Future = Future()
    interrupted.set_exception(KeyboardInterrupt())  # what f.result() raises when the Ctrl-C lands inside it
    ex._pool = object()  # type: ignore[assignment]  # a pool is running (wait() reads only the futures)
    ex._futures = {interrupted: {"key": "k000"}}
    with pytest.raises(KeyboardInterrupt):
        ex.wait()
