"""The trainer's support for ``needs_second_batch`` methods (SDMGrad, MoDo): two extra batches per step."""

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
