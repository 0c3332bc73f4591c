"""`torchrun` data-parallel training through the CLI equals the single-process run on the same batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_bench import tiny_config

from mtlens.train import run, validate_config

HERE = Path(__file__).parent


def _weights(path: Path) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    return payload.get("model", payload)


@pytest.mark.slow
@pytest.mark.parametrize("bench,method", [("tiny-mtl", {"name": "mgda", "level": "param"}),
                                          ("tiny-multi", {"name": "upgrad", "level": "feature"}),
                                          ("tiny-mtl", {"name": "famo"}),
                                          ("tiny-mtl", {"name": "forum"})])  # look-ahead: the trainer shards its batch
def test_torchrun_two_processes_equal_one_process(tmp_path, bench, method):
    over = {"data": {"benchmark": bench}, "method": method, "train": {"epochs": 2, "batch_size": 16, "device": "cpu",
                                                                     "seed": 0, "max_steps_per_epoch": 3}}
    ref = run(validate_config(tiny_config(tmp_path / "one", **over)), quiet=True)
    d = tiny_config(tmp_path / "two", **over)
    d["train"]["distributed"] = True
    cfg_file = tmp_path / "two.yaml"
    cfg_file.write_text(yaml.safe_dump(d))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HERE / "_torchrun_entry.py"), "train", "--config", str(cfg_file), "--quiet"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = Path(d["out_dir"])
    got = json.loads((out / "results.json").read_text())
    for split in ("test",):
        for task, metrics in ref["metrics"][split].items():
            for k, v in metrics.items():
                assert got["metrics"][split][task][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (split, task, k)
    a = _weights(Path(ref["out_dir"]) / "checkpoint.pt")
    b = _weights(out / "checkpoint.pt")
    for k in a:
        if torch.is_tensor(a[k]) and a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # each process really trained on half of every batch (the equality above then needs the reduction)
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
             if json.loads(line).get("type") == "step"]
    assert steps and all(s["train/world_size"] == 2 and s["train/local_batch"] == 8 for s in steps)


def _torchrun(cfg_file, *extra, env=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HERE / "_torchrun_entry.py"), "train", "--config", str(cfg_file), "--quiet", *extra],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_killed_torchrun_run_resumes_to_the_uninterrupted_result(tmp_path):
    """Both ranks die at once after global step 5 (last checkpoint: step 4); ``--resume`` under
    torchrun continues from the checkpoint and ends where an uninterrupted run ends."""
    over = {"method": {"name": "upgrad", "level": "param"}, "checkpoint": {"every_steps": 2},
            "train": {"epochs": 2, "batch_size": 16, "device": "cpu", "seed": 0, "max_steps_per_epoch": 4,
                      "log_every": 1}}
    ref = run(validate_config(tiny_config(tmp_path / "one", **over)), quiet=True)
    d = tiny_config(tmp_path / "two", **over)
    d["train"]["distributed"] = True
    cfg_file = tmp_path / "two.yaml"
    cfg_file.write_text(yaml.safe_dump(d))
    killed = _torchrun(cfg_file, env={"MTLENS_TEST_EXIT_AT_STEP": "5"}, check=False)
    out = Path(d["out_dir"])
    assert killed.returncode != 0 and (out / "checkpoint.pt").exists() and not (out / "results.json").exists()
    _torchrun(cfg_file, "--resume")
    got = json.loads((out / "results.json").read_text())
    for task, metrics in ref["metrics"]["test"].items():
        for k, v in metrics.items():
            assert got["metrics"]["test"][task][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (task, k)
    a, b = _weights(Path(ref["out_dir"]) / "checkpoint.pt"), _weights(out / "checkpoint.pt")
    for k in a:
        if torch.is_tensor(a[k]) and a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # the log holds every step once: the killed step 5 was cut back to the checkpoint and redone
    from mtlens.train.records import read_jsonl

    steps = [r["global_step"] for r in read_jsonl(out / "log.jsonl") if r["type"] == "step"]
    assert steps == list(range(1, 9))


def test_distributed_without_torchrun_says_how_to_launch(tmp_path, monkeypatch):
    from mtlens.errors import ConfigurationError
    from mtlens.train import Trainer

    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    d = tiny_config(tmp_path)
    d["train"]["distributed"] = True
    with pytest.raises(ConfigurationError, match="torchrun"):
        Trainer(validate_config(d), quiet=True)


def test_update_every_in_the_trainer(tmp_path):
    d = tiny_config(tmp_path, method={"name": "nash_mtl", "level": "param"},
                    train={"update_every": 2, "max_steps_per_epoch": 4, "log_every": 1})
    res = run(validate_config(d), quiet=True)
    steps = [json.loads(line) for line in (Path(res["out_dir"]) / "log.jsonl").read_text().splitlines()
             if json.loads(line).get("type") == "step"]
    cached = [s.get("train/method/cached", 0.0) for s in steps]
    assert cached == [0.0, 1.0] * (len(steps) // 2)
    with pytest.raises(ValueError, match="update_every"):
        validate_config(tiny_config(tmp_path, method={"name": "db_mtl", "level": "param"}, train={"update_every": 2}))
