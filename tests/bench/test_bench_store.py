"""The results store: layout and index contract, skip / resume / retry, one driver at a time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from bench_helpers import subprocess_env, tiny_suite

from mtlens.bench import Store, load_index, load_suite, run_suite
from mtlens.bench.store import FORMAT
from mtlens.errors import ConfigurationError, LockHeldError

ENTRY_KEYS = {"key", "label", "benchmark", "method", "level", "variant", "seed", "kind", "task", "status",
              "attempts", "error", "traceback", "started", "finished", "wall_s", "results"}


def _suite(**over):
    return load_suite(tiny_suite(seeds=[0], **over))


def _by_label(idx):
    return {(e["label"], e["seed"]): e for e in idx["runs"]}


def test_store_layout_and_index_contract(tmp_path):
    out = tmp_path / "store"
    summary = run_suite(_suite(), out)
    assert summary.counts == {"done": 7} and summary.skipped == 0 and not summary.failed
    idx = json.loads((out / "index.json").read_text())
    assert idx["format"] == FORMAT and idx["version"] == 1 and idx["suite"] == "tiny"
    assert (out / "suite.yaml").is_file()
    labels = [e["label"] for e in idx["runs"]]
    assert labels == ["STL a", "STL b", "ew", "dwa", "mgda (param)", "mgda (feature)", "ew + rep_mtl"]
    for e in idx["runs"]:
        assert set(e) >= ENTRY_KEYS, e
        assert e["status"] == "done" and e["attempts"] == 1 and e["error"] is None
        assert e["level"] in ("loss", "param", "feature") and e["kind"] in ("mtl", "stl")
        run_dir = out / e["dir"]
        assert e["results"] == f"{e['dir']}/results.json"
        if e["kind"] == "stl":
            assert e["dir"].startswith("baselines/tiny-mtl-") and e["task"] in ("a", "b")
        else:
            assert e["dir"] == f"runs/{e['key']}" and e["task"] is None
            assert {"config.yaml", "results.json", "log.jsonl", "checkpoint.pt", "best.pt"} <= {
                p.name for p in run_dir.iterdir()}
            res = json.loads((run_dir / "results.json").read_text())
            assert res["delta"]["test"]["delta_p_task"] is not None  # Δ against the suite's own baselines
            assert res["diagnostics"]["mean"]  # FD/GDS/GMS averages (monitor.every=2)
        on_disk = json.loads((run_dir / "run.json").read_text())
        assert on_disk.pop("content_sha256") and on_disk == e
        assert e["peak_memory_bytes"] > 0 and e["memory_kind"] in ("cpu_peak_rss", "cuda_max_allocated")
    levels = {e["label"]: e["level"] for e in idx["runs"]}
    assert levels["ew"] == "loss" and levels["mgda (feature)"] == "feature"
    assert _by_label(idx)[("ew + rep_mtl", 0)]["variant"] == "rep_mtl"
    # the baseline each multi-task run used is the suite's own STL results
    ew = _by_label(idx)[("ew", 0)]
    base = json.loads((out / ew["dir"] / "baseline.json").read_text())
    stl_a = json.loads((out / _by_label(idx)[("STL a", 0)]["results"]).read_text())
    assert base["metrics"]["test"]["a"] == stl_a["metrics"]["test"]["a"]


def test_rerun_skips_done_and_redoes_only_what_is_missing(tmp_path):
    out = tmp_path / "store"
    run_suite(_suite(), out)
    before = load_index(out)
    again = run_suite(_suite(), out)
    assert again.ran == [] and again.skipped == 7
    assert load_index(out)["runs"] == before["runs"]

    # a lost results.json (and a run left "running" by a killed driver): only those run again
    dwa = _by_label(before)[("dwa", 0)]
    (out / dwa["dir"] / "results.json").unlink()
    third = run_suite(_suite(), out)
    assert [e["key"] for e in before["runs"] if e["key"] in third.ran] == [dwa["key"]]
    after = _by_label(load_index(out))
    assert after[("dwa", 0)]["attempts"] == 2 and after[("dwa", 0)]["status"] == "done"
    assert after[("ew", 0)] == _by_label(before)[("ew", 0)]


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    """A run whose driver died after an epoch: its checkpoint is used, and the end result equals an
    uninterrupted run's."""
    from mtlens.train import Trainer

    out = tmp_path / "store"
    suite = _suite(methods=["ew"], variants={"none": {}}, set=["train.epochs=3"])
    run_suite(suite, out)
    ref = load_index(out)
    ew = _by_label(ref)[("ew", 0)]
    ref_res = json.loads((out / ew["results"]).read_text())

    # rebuild the state of a driver killed in epoch 3: checkpoint after epoch 2, no results, "running"
    run_dir = out / ew["dir"]
    cfg = json.loads(json.dumps(ref_res["config"]))
    for p in run_dir.iterdir():
        if p.name != "run.json":
            p.unlink()
    cfg["train"]["epochs"] = 3
    part = Trainer({**cfg, "out_dir": str(run_dir)}, baseline=json.loads(json.dumps(ref_res["baseline"])),
                   quiet=True, tensorboard=False)

    class Stop(Exception):
        pass

    from mtlens.train import Callback

    class StopAfter2(Callback):
        def on_epoch_end(self, trainer, log):
            if trainer.epoch == 2:
                raise Stop

    part.callbacks.append(StopAfter2())
    with pytest.raises(Stop):
        part.fit()
    from mtlens.storage import write_json

    idx = Store(out).read_index()
    for e in idx["runs"]:
        if e["key"] == ew["key"]:
            e["status"] = "running"
            write_json(run_dir / "run.json", e)
    write_json(out / "index.json", idx)

    again = run_suite(suite, out)
    assert again.ran == [ew["key"]]
    res = json.loads((out / ew["results"]).read_text())
    assert res["metrics"] == ref_res["metrics"] and res["history"] == ref_res["history"]
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2, 3]


def test_corrupt_index_is_loud_and_a_deleted_one_is_rebuilt(tmp_path):
    from mtlens.errors import IntegrityError

    out = tmp_path / "store"
    run_suite(_suite(), out)
    before = load_index(out)
    text = (out / "index.json").read_text()
    (out / "index.json").write_text(text.replace('"attempts": 1', '"attempts": 7', 1))
    with pytest.raises(IntegrityError, match=r"index.json.*delete it: the next run rebuilds it"):
        run_suite(_suite(), out)
    (out / "index.json").unlink()
    again = run_suite(_suite(), out)
    assert again.ran == [] and load_index(out)["runs"] == before["runs"]


def test_store_is_locked_and_belongs_to_one_suite(tmp_path):
    out = tmp_path / "store"
    run_suite(_suite(), out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mtlens.storage import DirectoryLock; "
         "DirectoryLock(sys.argv[1], purpose='mtlens bench tiny').acquire(); print('held', flush=True); "
         "time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeldError, match=rf"is in use by .*pid {holder.pid}.*mtlens bench tiny"):
            run_suite(_suite(), out)
    finally:
        holder.kill()
        holder.wait()
    run_suite(_suite(), out)  # the lock of a dead process is free
    other = load_suite(tiny_suite(name="other", seeds=[0]))
    with pytest.raises(ConfigurationError, match=r"holds the results of suite 'tiny', not 'other'"):
        run_suite(other, out)


def test_changed_settings_are_new_runs_and_old_ones_stay_on_disk(tmp_path):
    out = tmp_path / "store"
    run_suite(_suite(methods=["ew"], variants={"none": {}}), out)
    first = load_index(out)["runs"]
    run_suite(_suite(methods=["ew"], variants={"none": {}}, set=["optim.lr=0.02"]), out)
    second = load_index(out)["runs"]
    assert not {e["key"] for e in first} & {e["key"] for e in second}
    assert all((out / e["dir"] / "results.json").is_file() for e in first)
