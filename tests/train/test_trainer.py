"""The trainer on tiny in-test benchmarks: records, baselines, hooks, multi-input, checkpoints, eval."""

import json
import math

import pytest
import torch
from tiny_bench import tiny_config

from mtlens.engine import LossWeighting
from mtlens.errors import CheckpointError, ConfigurationError
from mtlens.methods import _registry
from mtlens.train import Trainer, evaluate_checkpoint, load_baseline_file, run, validate_config
from mtlens.train.loop import mean_step_time
from mtlens.train.records import read_jsonl


class _HookProbe(LossWeighting):
    """Test-only loss weighting that counts the trainer's explicit hook calls (EW weights)."""

    name = "_hook_probe_test"
    reference = "test"
    needs_extra_forward = True
    stateful = True

    def __init__(self):
        self.epoch_calls: list[list[float]] = []
        self.after_calls = 0
        self.last_new: list[float] | None = None
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def parameters(self):
        return [self.scale]

    def combine(self, losses, grad_norms=None):
        w = torch.ones_like(losses.detach())
        return (losses * torch.exp(self.scale)).sum() - self.scale, w

    def on_epoch_end(self, mean_losses):
        self.epoch_calls.append([float(v) for v in mean_losses])

    def after_step(self, new_losses):
        assert not new_losses.requires_grad
        self.after_calls += 1
        self.last_new = [float(v) for v in new_losses]

    def state_dict(self):
        return {"epoch_calls": list(self.epoch_calls), "after_calls": self.after_calls}

    def load_state_dict(self, state):
        self.epoch_calls, self.after_calls = list(state["epoch_calls"]), state["after_calls"]


@pytest.fixture
def hook_probe():
    """Register the probe method for one test only (the registry is process-wide)."""
    _registry.register(_HookProbe)
    yield _HookProbe
    _registry._REGISTRY.pop(_HookProbe.name, None)


def test_short_run_writes_results_jsonl_and_tensorboard(tmp_path):
    cfg = validate_config(
        tiny_config(tmp_path, monitor={"every": 2}, regularizers=[{"name": "rep_mtl"}], loss_transform="log")
    )
    res = run(cfg, quiet=True)
    out = tmp_path / "run"
    for name in ("results.json", "log.jsonl", "config.yaml", "best.pt", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert not list(out.glob("best-e*.pt"))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["metrics"] == res["metrics"]
    assert set(res["metrics"]) == {"val", "test"} and set(res["metrics"]["test"]) == {"a", "b"}
    assert res["steps"] == 2 * 6 and res["best_epoch"] in (1, 2)
    assert res["selection"]["criterion"] == "val_loss" and res["baseline"] is None and res["delta"] is None
    assert res["environment"]["torch"] == torch.__version__
    mem = res["timings"]["peak_memory"]  # train/memory.py: measured on Linux CPU, else None with the reason
    assert (mem["peak_bytes"] >= mem["start_bytes"] > 0) if mem["peak_bytes"] is not None else mem["reason"]
    records = read_jsonl(out / "log.jsonl")
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert len(steps) == 12 and len(epochs) == 2
    # the mean step time leaves out the session's first step (lazy initialisation), and says so
    t = res["timings"]
    assert t["warmup_steps"] == 1 and t["warmup_s"] == pytest.approx(steps[0]["time/step_s"])
    assert t["mean_step_s"] == pytest.approx(sum(r["time/step_s"] for r in steps[1:]) / 11)
    assert {"train/loss/a", "train/weight/b", "train/reg/rep_mtl/total", "time/step_s"} <= set(steps[0])
    monitored = [r for r in steps if "diag/fd" in r]
    assert [r["global_step"] for r in monitored] == [1, 3, 5, 7, 9, 11]
    assert 0.0 <= monitored[-1]["diag/fd"] <= 1.0 and "diag/param/gds_mean" in monitored[-1]
    assert res["diagnostics"]["final"]["diag/fd"] == monitored[-1]["diag/fd"]
    assert "val/a/acc" in epochs[0] and "val/loss/b" in epochs[0]
    # the reported best epoch is the one the val criterion picks
    scores = [-(e["val/loss/a"] + e["val/loss/b"]) for e in epochs]
    assert res["best_epoch"] == 1 + max(range(2), key=lambda i: (scores[i], -i))


def test_eval_of_checkpoint_reproduces_test_metrics(tmp_path):
    res = run(validate_config(tiny_config(tmp_path)), quiet=True)
    ev = evaluate_checkpoint(tmp_path / "run")
    assert ev["metrics"] == res["metrics"]["test"] and ev["epoch"] == res["best_epoch"]
    val = evaluate_checkpoint(tmp_path / "run" / "best.pt", "val")
    assert val["metrics"] == res["metrics"]["val"]
    latest = evaluate_checkpoint(tmp_path / "run" / "checkpoint.pt", "test")
    assert set(latest["metrics"]) == {"a", "b"}


def test_auto_baseline_is_trained_once_and_reused_without_changing_the_run(tmp_path):
    d = tiny_config(tmp_path, baseline="auto", method={"name": "upgrad", "level": "feature"})
    first = run(validate_config(d), quiet=True)
    cache_dirs = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cache_dirs) == 2 and cache_dirs[0].startswith("tiny-mtl-a-")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("results.json")}
    d2 = {**d, "out_dir": str(tmp_path / "run2")}
    second = run(validate_config(d2), quiet=True)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("results.json")} == stamps
    assert second["metrics"] == first["metrics"]  # training the baselines did not disturb the RNG
    for res in (first, second):
        assert res["selection"]["criterion"] == "delta_p_task"
        assert set(res["delta"]["test"]) == {"delta_p_task", "delta_p_metric", "delta_m"}
        assert math.isclose(res["delta"]["test"]["delta_m"], -res["delta"]["test"]["delta_p_metric"])
    stl = json.loads(next((tmp_path / "cache").glob("tiny-mtl-a-*/results.json")).read_text())
    assert stl["kind"] == "stl" and stl["tasks"] == ["a"] and stl["config"]["method"]["name"] == "ew"
    assert first["baseline"]["metrics"]["test"]["a"] == stl["metrics"]["test"]["a"]
    # a different MTL method reuses the same baselines; a different lr does not
    run(validate_config({**d, "out_dir": str(tmp_path / "run3"), "method": {"name": "ew"}}), quiet=True)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    run(validate_config({**d, "out_dir": str(tmp_path / "run4"), "optim": {"lr": 0.02}}), quiet=True)
    assert len(list((tmp_path / "cache").iterdir())) == 4


def test_stl_all_writes_a_baseline_file_that_runs_accept(tmp_path):
    d = tiny_config(tmp_path, stl_task="all", out_dir=str(tmp_path / "stl"))
    base = run(validate_config(d), quiet=True)
    path = tmp_path / "stl" / "baseline.json"
    assert path.is_file() and set(base["metrics"]["test"]) == {"a", "b"}
    assert (tmp_path / "stl" / "stl-a" / "results.json").is_file()
    res = run(validate_config(tiny_config(tmp_path, baseline=str(path))), quiet=True)
    assert res["baseline"]["source"] == str(path) and res["selection"]["criterion"] == "delta_p_task"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": {"acc": 50.0}}))
    with pytest.raises(ConfigurationError, match="task 'b'"):
        from mtlens.tasks.spec import get_benchmark

        load_baseline_file(bad, get_benchmark("tiny-mtl"), ["a", "b"])


def test_method_hooks_are_called_for_any_method(tmp_path, hook_probe):
    cfg = validate_config(tiny_config(tmp_path, method={"name": "_hook_probe_test"}, train={"epochs": 3}))
    tr = Trainer(cfg, quiet=True)
    assert any(p is tr.method.scale for g in tr.optimizer.param_groups for p in g["params"])
    start = tr.method.scale.detach().clone()
    tr.fit()
    steps = tr.train_stream.steps_per_epoch
    assert tr.method.after_calls == 3 * steps
    assert len(tr.method.epoch_calls) == 3
    log = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r["type"] == "step"]
    first_epoch = [(r["train/loss/a"], r["train/loss/b"]) for r in log if r["epoch"] == 1]
    assert tr.method.epoch_calls[0] == pytest.approx([sum(x) / len(x) for x in zip(*first_epoch)])
    assert not torch.equal(tr.method.scale.detach(), start)  # method parameters are optimised


def test_learnable_method_scalars_are_created_before_the_optimiser(tmp_path):
    tr = Trainer(validate_config(tiny_config(tmp_path, method={"name": "uw"}, train={"epochs": 1})), quiet=True)
    params = tr.method.parameters()
    assert params and all(any(p is q for g in tr.optimizer.param_groups for q in g["params"]) for p in params)
    before = [p.detach().clone() for p in params]
    tr.fit()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, tr.method.parameters()))


def test_multi_input_benchmark(tmp_path):
    d = tiny_config(
        tmp_path,
        data={"benchmark": "tiny-multi"},
        method={"name": "mgda", "level": "param"},
        monitor={"every": 1},
    )
    res = run(validate_config(d), quiet=True)
    # tasks p (67 samples) and q (64): zipped loaders, equal batches, the shortest stream ends the epoch
    assert res["steps_per_epoch"] == 64 // 16
    assert set(res["metrics"]["test"]) == {"p", "q"}
    assert "diag/fd" in res["diagnostics"]["final"]


def test_feature_level_aggregator_refused_on_multi_input(tmp_path):
    d = tiny_config(tmp_path, data={"benchmark": "tiny-multi"}, method={"name": "graddrop", "level": "feature"})
    with pytest.raises(ConfigurationError, match="multi-input"):
        validate_config(d)


def test_checkpoint_errors_name_the_file_and_the_fix(tmp_path):
    cfg = validate_config(tiny_config(tmp_path, train={"epochs": 1}))
    run(cfg, quiet=True)
    with pytest.raises(ConfigurationError, match="already holds a run"):
        run(cfg, quiet=True)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    other = validate_config(tiny_config(tmp_path, train={"epochs": 1}, optim={"lr": 0.5}))
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.01 -> 0\.5"):
        run(other, resume=True, quiet=True)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="checkpoint.pt' is truncated or corrupt"):
        run(cfg, resume=True, quiet=True)
    ckpt.unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        run(cfg, resume=True, quiet=True)


def test_resume_of_a_finished_run_rewrites_the_same_results(tmp_path):
    cfg = validate_config(tiny_config(tmp_path, train={"epochs": 1}))
    res = run(cfg, quiet=True)
    again = run(cfg, quiet=True, resume=True)
    assert again["metrics"] == res["metrics"] and again["steps"] == res["steps"]
    assert again["timings"]["peak_memory"] == res["timings"]["peak_memory"]  # the kept results.json's


def test_bf16_autocast_runs_on_cpu(tmp_path):
    cfg = validate_config(tiny_config(tmp_path, train={"epochs": 1, "amp": "bf16", "max_steps_per_epoch": 2}))
    res = run(cfg, quiet=True)
    assert res["steps"] == 2 and all(math.isfinite(v["acc"]) for v in [res["metrics"]["test"]["a"]])


def test_mean_step_time_leaves_out_each_sessions_first_step():
    assert mean_step_time({"train_s": 10.0, "steps_timed": 6, "warmup_s": 5.0, "warmup_steps": 1}) == 1.0
    assert mean_step_time({"train_s": 12.0, "steps_timed": 6, "warmup_s": 6.0, "warmup_steps": 2}) == 1.5  # resumed
    assert mean_step_time({"train_s": 3.0, "steps_timed": 1, "warmup_s": 3.0, "warmup_steps": 1}) == 3.0  # one step
    assert mean_step_time({"train_s": 6.0, "steps_timed": 3}) == 2.0  # a checkpoint written before warmup_s
    assert mean_step_time({"train_s": 0.0, "steps_timed": 0, "warmup_s": 0.0, "warmup_steps": 0}) == 0.0
