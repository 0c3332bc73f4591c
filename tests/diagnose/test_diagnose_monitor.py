"""SaliencyMonitor: keys, values equal to the direct functions, engine arguments, strictness."""

import math

import pytest
import torch
from torch import nn

import mtlens  # noqa: F401
from mtlens.diagnose import (
    SaliencyMonitor,
    feature_disentanglement,
    gradient_direction_similarity,
    gradient_magnitude_similarity,
    tsr_entropy,
)
from mtlens.engine import GramianWeighting, StepRecord, mtl_backward
from mtlens.errors import ConfigurationError
from mtlens.methods import create


class _Fixed(GramianWeighting):
    name = "_fixed_monitor_test"

    def weights(self, gramian, losses):
        return torch.ones(gramian.shape[0], dtype=torch.float64)


def _step(method, **kw):
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh())
    heads = nn.ModuleList([nn.Conv2d(4, 1, 1) for _ in range(3)])
    x = torch.randn(2, 2, 5, 5)
    z = enc(x)
    losses = {f"t{i}": (h(z) - i).pow(2).mean() for i, h in enumerate(heads)}
    return mtl_backward(losses, features=z, shared_params=enc.parameters(), method=method, **kw)


PARAM_KEYS = {
    "diag/fd",
    "diag/tsr_entropy",
    "diag/param/gds_mean",
    "diag/param/gds_min",
    "diag/param/gds_conflict_fraction",
    "diag/param/gms_mean",
    "diag/param/gms_min",
    "diag/param/grad_norm/t0",
    "diag/param/grad_norm/t1",
    "diag/param/grad_norm/t2",
    "diag/param/cond_G",
}


def test_loss_level_method_keys_and_values():
    mon = SaliencyMonitor(every=2)
    ew = create("ew")
    kw = mon.engine_kwargs(0, ew)
    assert kw == {"keep_saliencies": True, "compute_gramian": "param"}
    rec = _step(ew, **kw)
    out = mon(rec, 0)
    assert set(out) == PARAM_KEYS and all(isinstance(v, float) for v in out.values())
    assert out["diag/fd"] == feature_disentanglement(rec.saliencies)
    assert out["diag/tsr_entropy"] == tsr_entropy(rec.saliencies)
    gds = gradient_direction_similarity(rec.gramian)
    assert out["diag/param/gds_mean"] == gds.mean and out["diag/param/cond_G"] == gds.condition_number
    assert out["diag/param/gms_mean"] == gradient_magnitude_similarity(rec.gramian).mean
    assert out["diag/param/grad_norm/t1"] == pytest.approx(math.sqrt(float(rec.gramian[1, 1])))
    assert mon(rec, 1) == {} and mon.engine_kwargs(1, ew) == {}
    mon(rec, 2)
    assert mon.summary()["diag/fd"] == pytest.approx(out["diag/fd"])


def test_feature_level_and_gradient_methods():
    mon = SaliencyMonitor(level="feature")
    ew = create("ew")
    kw = mon.engine_kwargs(0, ew)
    assert kw["compute_gramian"] == "feature" and "level" not in kw
    out = mon(_step(ew, **kw), 0)
    assert "diag/feature/gds_mean" in out and not any(k.startswith("diag/param/") for k in out)
    # gradient methods record both on their own; nothing to add, and the keys carry their level
    m = _Fixed()
    assert mon.engine_kwargs(0, m) == {}
    out = SaliencyMonitor()(_step(m, level="feature"), 0)
    assert "diag/feature/gds_mean" in out and "diag/fd" in out
    out = SaliencyMonitor()(_step(m, level="param"), 0)
    assert "diag/param/gds_mean" in out


def test_missing_fields_strict_and_lenient():
    rec = _step(create("ew"), keep_saliencies=True)  # no Gramian
    with pytest.raises(ConfigurationError, match="compute_gramian='param'"):
        SaliencyMonitor()(rec, 0)
    out = SaliencyMonitor(strict=False)(rec, 0)
    assert set(out) == {"diag/fd", "diag/tsr_entropy"}
    out = SaliencyMonitor(metrics=("gds",))(_step(create("ew"), compute_gramian="param"), 0)
    assert set(out) == {"diag/param/gds_mean", "diag/param/gds_min", "diag/param/gds_conflict_fraction"}
    skipped = StepRecord(
        task_names=["a"], losses=torch.ones(1), objective_losses=torch.ones(1), level="loss", skipped=True
    )
    assert SaliencyMonitor()(skipped, 0) == {}


def test_bad_configuration():
    with pytest.raises(ConfigurationError, match="every"):
        SaliencyMonitor(every=0)
    with pytest.raises(ConfigurationError, match="level"):
        SaliencyMonitor(level="loss")
    with pytest.raises(ConfigurationError, match="unknown metrics"):
        SaliencyMonitor(metrics=("fd", "gradnorm"))
    mon = SaliencyMonitor()
    mon.load_state_dict({"sums": {"diag/fd": 1.0}, "counts": {"diag/fd": 2}})
    assert mon.summary() == {"diag/fd": 0.5} and mon.state_dict()["counts"] == {"diag/fd": 2}
