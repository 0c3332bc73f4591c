"""The trainer's fp16 + GradScaler loop continues through several overflow steps."""

import math

import torch
from tiny_bench import tiny_config

from mtlens.train import Trainer, validate_config


def test_trainer_fp16_survives_several_overflow_steps(tmp_path):
    d = tiny_config(tmp_path, method={"name": "mgda", "level": "param"},
                    train={"amp": "fp16", "max_steps_per_epoch": 6, "epochs": 2})
    tr = Trainer(validate_config(d), quiet=True, tensorboard=False)
    # float16 gradients overflow (65504) until the scale is backed off from 2^19 to ~2^15
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**19)
    res = tr.fit()
    assert tr.skipped_steps >= 2
    assert tr.scaler.get_scale() < 2.0**19
    assert all(bool(torch.isfinite(p).all()) for p in tr.model.parameters())
    assert all(math.isfinite(v) for m in res["metrics"]["test"].values() for v in m.values())
