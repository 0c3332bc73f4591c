"""The Ray executor on a local ``ray.init(num_cpus=2)`` gives the same table as the local executor."""

from __future__ import annotations

import json

import pytest
from bench_helpers import subprocess_env, tiny_suite

from mtlens.bench import load_index, load_suite, run_suite

ray = pytest.importorskip("ray", reason="the Ray executor needs the optional package ray (mtlens[ray])")


def _leaderboard(out):
    from mtlens.bench.tables import leaderboard, load_store

    table, _ = leaderboard(load_store(out), "tiny-mtl")
    keep = [i for i, c in enumerate(table.csv_columns) if not c.startswith(("step", "peak", "time", "mem"))]
    return [table.csv_columns[i] for i in keep], [[row[i] for i in keep] for row in table.csv_rows]


@pytest.mark.slow
def test_ray_executor_matches_local(tmp_path, monkeypatch):
    env = subprocess_env()
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])  # the local Ray's workers inherit it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    raw = tiny_suite(seeds=[0, 1], methods=["ew", "dwa", "mgda"],
                     variants={"none": {}, "rep_mtl": {"regularizers": [{"name": "rep_mtl"}], "methods": ["ew"]}},
                     set=["checkpoint.every_steps=3"])
    local, remote = tmp_path / "local", tmp_path / "ray"
    a = run_suite(load_suite(raw), local, workers=2, threads=1)
    b = run_suite(load_suite(raw), remote, executor="ray", workers=2,
                  ray_init={"num_cpus": 2, "include_dashboard": False})
    assert a.counts == b.counts == {"done": 14}
    ia, ib = load_index(local), load_index(remote)
    assert [e["key"] for e in ia["runs"]] == [e["key"] for e in ib["runs"]]
    for ea, eb in zip(ia["runs"], ib["runs"]):
        assert eb["executor"] == "ray" and eb["threads"] == 1 and eb["status"] == "done"
        ra = json.loads((local / ea["results"]).read_text())
        rb = json.loads((remote / eb["results"]).read_text())
        assert ra["metrics"] == rb["metrics"], ea["label"]
        assert ra["delta"] == rb["delta"] and ra["history"] == rb["history"], ea["label"]
        # every file of the run came back to the driver's store
        files = {p.name for p in (remote / eb["dir"]).iterdir()}
        assert {"config.yaml", "results.json", "log.jsonl", "checkpoint.pt", "best.pt", "run.json"} <= files
    assert _leaderboard(local) == _leaderboard(remote)
    assert not ray.is_initialized()  # the executor shut down the Ray it started

    # a rerun through Ray skips everything
    c = run_suite(load_suite(raw), remote, executor="ray", workers=2, ray_init={"num_cpus": 2})
    assert c.ran == [] and c.skipped == 14


def test_ray_missing_is_one_clear_error(monkeypatch):
    import builtins

    from mtlens.bench.executors import RayExecutor
    from mtlens.errors import MissingDependencyError

    real_import = builtins.__import__

    def fake_import(name, *args, **kw):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(MissingDependencyError, match=r"pip install 'mtlens\[ray\]'"):
        RayExecutor()
