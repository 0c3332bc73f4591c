"""Trainer support for declared method capabilities: needs_second_batch (SDMGrad, MoDo), needs_task_scores (PIVRG)."""

import numpy as np
import torch

from mtlens.train import load_config
from mtlens.train.trainer import Trainer


def _trainer(tmp_path, name="modo"):
    cfg = load_config(preset="quick-multimnist", overrides=[
        f"method.name={name}", "regularizers=[]", "loss_transform=null", "train.epochs=1",
        "train.max_steps_per_epoch=3", "train.batch_size=8", "baseline=null", "train.device=cpu",
    ], out_dir=tmp_path / "run")
    return Trainer(cfg, quiet=True, tensorboard=False)


def test_extra_batches_are_independent_and_reproducible(tmp_path):
    tr = _trainer(tmp_path)
    step_batch = next(tr.train_stream.epoch(0, 0))[1]
    a, b = tr._aux_batches()
    assert not torch.equal(a["input"], step_batch["input"]) and not torch.equal(a["input"], b["input"])
    tr2 = _trainer(tmp_path)
    a2, b2 = tr2._aux_batches()
    assert torch.equal(a["input"], a2["input"]) and torch.equal(b["input"], b2["input"])
    # a resumed trainer at step 1 draws what the uninterrupted one draws at its second step
    tr.step_in_epoch = 1  # the trainer advances it after each step
    nxt = tr._aux_batches()
    assert not torch.equal(nxt[0]["input"], a["input"])
    tr2.step_in_epoch = 1
    tr2._aux = None
    assert torch.equal(tr2._aux_batches()[0]["input"], nxt[0]["input"])


def test_trainer_feeds_the_cross_gramian(tmp_path, monkeypatch):
    tr = _trainer(tmp_path)
    seen = []
    orig = tr.method.observe_cross_gramian

    def spy(A):
        seen.append(A.clone())
        orig(A)

    monkeypatch.setattr(tr.method, "observe_cross_gramian", spy)
    tr.fit()
    assert len(seen) == 3
    assert all(A.shape == (2, 2) and A.dtype == torch.float64 and bool(torch.isfinite(A).all()) for A in seen)
    assert not torch.allclose(seen[0], seen[0].T)  # two different batches: not a Gramian
    lam = tr.method.state_dict()["lam"].numpy()
    assert abs(lam.sum() - 1) < 1e-12 and not np.allclose(lam, 0.5)


# -- needs_task_scores (PIVRG) ------------------------------------------------------------------
def test_trainer_reports_task_scores_against_the_baseline(tmp_path):
    import pytest

    from mtlens.errors import ConfigurationError

    cfg = load_config(preset="quick-multimnist", overrides=[
        "method.name=pivrg", "regularizers=[]", "loss_transform=null", "train.epochs=1",
        "train.max_steps_per_epoch=2", "train.batch_size=8", "baseline=null", "train.device=cpu",
    ], out_dir=tmp_path / "run")
    with pytest.raises(ConfigurationError, match="baseline=auto"):
        Trainer(cfg, quiet=True, tensorboard=False)
    base = {"left": {"acc": 0.9}, "right": {"acc": 0.5}}
    tr = Trainer(cfg, quiet=True, tensorboard=False,
                 baseline={"source": "test", "metrics": {"val": base, "test": base}})
    tr.fit()
    val = tr.history[-1]["val"]["metrics"]
    want = [-(val[t]["acc"] - base[t]["acc"]) / base[t]["acc"] * 100 for t in ("left", "right")]
    got = tr.method.state_dict()["scores"].tolist()
    assert got == pytest.approx(want)


# -- needs_lookahead (Auto-Lambda, MOML) ----------------------------------------------------------
def test_trainer_runs_the_lookahead_and_leaves_the_model_alone(tmp_path):
    from mtlens.engine import LookAhead

    tr = _trainer(tmp_path, name="auto_lambda")
    batch = next(tr.train_stream.epoch(0, 0))[1]
    before = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    seen = []
    orig = tr.method.meta_step
    tr.method.meta_step = lambda la: (seen.append(la), orig(la))
    tr._meta_step(batch)
    assert isinstance(seen[0], LookAhead) and seen[0].lr == tr.optimizer.param_groups[0]["lr"]
    after = tr.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # parameters and buffers restored
    lam = tr.method.state_dict()["lambda"]
    assert lam is not None and not torch.allclose(lam, torch.full_like(lam, 0.1))
    tr.fit()
    assert len(seen) == 1 + 3  # one per training step
