"""Streaming metrics against direct numpy computations over the whole data set."""

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mtlens.errors import ConfigurationError, DataError, ShapeError
from mtlens.tasks import (
    ClassificationMetric,
    DepthMetric,
    NormalMetric,
    RegressionMetric,
    SegmentationMetric,
)

SPLITS = (3, 1, 4, 2)  # uneven batch sizes


def _batches(*tensors):
    i = 0
    for n in SPLITS:
        yield tuple(t[i:i + n] for t in tensors)
        i += n


def _feed(metric, pred, target):
    for p, t in _batches(pred, target):
        metric.update(p, t)
    return metric.compute()


# ---------------------------------------------------------------- segmentation
def _seg_data(c=6):
    n = sum(SPLITS)
    logits = torch.randn(n, c, 5, 7)
    logits[:, c - 1] = -1e4  # class c-1 is never predicted ...
    target = torch.randint(0, c - 2, (n, 5, 7))  # ... and c-2, c-1 never occur: absent classes
    target[torch.rand(n, 5, 7) < 0.2] = -1
    return logits, target


def _seg_numpy(logits, target, c):
    pred = logits.argmax(1).numpy().ravel()
    gt = target.numpy().ravel()
    keep = gt >= 0
    pred, gt = pred[keep], gt[keep]
    ious = []
    for k in range(c):
        inter = np.sum((pred == k) & (gt == k))
        union = np.sum((pred == k) | (gt == k))
        if union > 0:
            ious.append(inter / union)
    return 100 * np.mean(ious), 100 * np.mean(pred == gt)


def test_segmentation_metric_matches_numpy_over_batches():
    logits, target = _seg_data()
    out = _feed(SegmentationMetric(6), logits, target)
    miou, pixacc = _seg_numpy(logits, target, 6)
    assert out["miou"] == pytest.approx(miou, abs=1e-9)
    assert out["pixacc"] == pytest.approx(pixacc, abs=1e-9)
    assert set(out) == {"miou", "pixacc"}


def test_segmentation_metric_accepts_label_predictions_and_reports_per_class():
    logits, target = _seg_data()
    m = SegmentationMetric(6)
    m.update(logits.argmax(1), target.unsqueeze(1).float())
    assert m.compute() == pytest.approx(_feed(SegmentationMetric(6), logits, target))
    iou = m.per_class_iou()
    assert len(iou) == 6 and np.isnan(iou[5]) and m.confusion().sum() == (target >= 0).sum()


def test_segmentation_metric_errors():
    m = SegmentationMetric(4)
    with pytest.raises(ConfigurationError, match="update"):
        m.compute()
    with pytest.raises(ShapeError, match="channels"):
        m.update(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ShapeError):
        m.update(torch.randn(1, 4, 2, 2), torch.zeros(1, 3, 3))
    with pytest.raises(DataError):
        m.update(torch.randn(1, 4, 2, 2), torch.full((1, 2, 2), 7))
    m.update(torch.randn(1, 4, 2, 2), torch.full((1, 2, 2), -1))
    with pytest.raises(ConfigurationError, match="no labelled pixel"):
        m.compute()


# ---------------------------------------------------------------- depth
def test_depth_metric_matches_numpy_over_batches():
    n = sum(SPLITS)
    pred = torch.rand(n, 1, 6, 6) * 3
    target = torch.rand(n, 1, 6, 6) * 3 + 0.1
    target[torch.rand(n, 1, 6, 6) < 0.3] = 0.0
    target[2] = 0.0  # a sample without any valid pixel
    out = _feed(DepthMetric(), pred, target)
    p, t = pred.double().numpy(), target.double().numpy()
    v = t != 0
    assert out["abs_err"] == pytest.approx(np.mean(np.abs(p - t)[v]), rel=1e-12)
    assert out["rel_err"] == pytest.approx(np.mean(np.abs(p - t)[v] / t[v]), rel=1e-12)


def test_depth_metric_pixel_weighting_differs_from_batch_average():
    """Exact aggregation: not the mean of per-batch means (which a naive loop would give)."""
    m = DepthMetric()
    m.update(torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0))  # 1 pixel, error 1
    m.update(torch.ones(1, 1, 1, 3), torch.ones(1, 1, 1, 3))  # 3 pixels, error 0
    assert m.compute()["abs_err"] == pytest.approx(0.25)


# ---------------------------------------------------------------- normals
def _normal_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(SPLITS)
    target = torch.nn.functional.normalize(torch.randn(n, 3, 6, 5, generator=g), dim=1)
    pred = target + 0.6 * torch.randn(n, 3, 6, 5, generator=g)
    target[torch.rand(n, 6, 5, generator=g).unsqueeze(1).expand(-1, 3, -1, -1) < 0.25] = 0.0  # invalid pixels
    return pred, target


def _normal_numpy(pred, target):
    p = pred.double().numpy().transpose(0, 2, 3, 1).reshape(-1, 3)
    t = target.double().numpy().transpose(0, 2, 3, 1).reshape(-1, 3)
    keep = np.linalg.norm(t, axis=1) > 0
    p, t = p[keep], t[keep]
    cos = np.sum(p * t, 1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1))
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


@pytest.mark.parametrize("parity", [0, 1])  # even and odd number of valid pixels
def test_normal_metric_matches_numpy_over_batches(parity):
    pred, target = _normal_data()
    if len(_normal_numpy(pred, target)) % 2 != parity:
        valid = (target.norm(dim=1) > 0).nonzero()[0]
        target[valid[0], :, valid[1], valid[2]] = 0.0  # one more invalid pixel flips the parity
    ang = _normal_numpy(pred, target)
    assert len(ang) % 2 == parity
    out = _feed(NormalMetric(), pred, target)
    assert out["mean"] == pytest.approx(ang.mean(), abs=1e-9)
    assert out["median"] == pytest.approx(np.median(ang), abs=1e-3)
    for name, thr in (("within_11.25", 11.25), ("within_22.5", 22.5), ("within_30", 30.0)):
        assert out[name] == pytest.approx(100 * np.mean(ang < thr), abs=1e-9)


def test_normal_metric_median_resolution_is_documented_bound():
    pred, target = _normal_data(seed=3)
    ang = _normal_numpy(pred, target)
    coarse = _feed(NormalMetric(median_resolution=0.5), pred, target)
    assert abs(coarse["median"] - np.median(ang)) <= 0.5
    assert coarse["mean"] == pytest.approx(ang.mean(), abs=1e-9)  # mean stays exact


def test_normal_metric_median_odd_and_even_exactness():
    m = NormalMetric()
    t = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 1, 3).clone()
    degs = torch.tensor([10.0, 40.0, 70.0])
    rad = torch.deg2rad(degs)
    p = torch.stack([torch.cos(rad), torch.sin(rad), torch.zeros(3)]).view(1, 3, 1, 3)
    m.update(p, t)
    assert m.compute()["median"] == pytest.approx(40.0, abs=1e-3)
    m.update(p[..., :1], t[..., :1])  # 10, 10, 40, 70 → median 25
    assert m.compute()["median"] == pytest.approx(25.0, abs=1e-3)


# ---------------------------------------------------------------- classification / regression
def test_classification_metric_matches_numpy():
    n = sum(SPLITS)
    logits = torch.randn(n, 5)
    target = torch.randint(0, 5, (n,))
    out = _feed(ClassificationMetric(5), logits, target)
    assert out == {"acc": pytest.approx(100 * np.mean(logits.argmax(1).numpy() == target.numpy()))}
    with pytest.raises(ShapeError):
        ClassificationMetric(5).update(logits, target[:-1])
    with pytest.raises(DataError):
        ClassificationMetric(5).update(logits, torch.full((n,), 5))


def test_regression_metric_matches_numpy():
    n = sum(SPLITS)
    pred, target = torch.randn(n, 3), torch.randn(n, 3)
    out = _feed(RegressionMetric(("mae", "mse")), pred, target)
    d = pred.double().numpy() - target.double().numpy()
    assert out["mae"] == pytest.approx(np.abs(d).mean(), rel=1e-12)
    assert out["mse"] == pytest.approx((d**2).mean(), rel=1e-12)
    assert set(_feed(RegressionMetric(), pred, target)) == {"mae"}
    with pytest.raises(ConfigurationError):
        RegressionMetric(("rmse",))
    with pytest.raises(ShapeError):
        RegressionMetric().update(pred, target[:, :2])


# ---------------------------------------------------------------- merge / sync / reset
def _all_metrics():
    logits, seg = _seg_data()
    dp = torch.rand(len(seg), 1, 5, 7)
    dt = torch.rand(len(seg), 1, 5, 7) * (torch.rand(len(seg), 1, 5, 7) > 0.2)
    npred, ntarget = _normal_data()
    return [
        (SegmentationMetric(6), logits, seg),
        (DepthMetric(), dp, dt),
        (NormalMetric(), npred, ntarget),
        (ClassificationMetric(5), torch.randn(10, 5), torch.randint(0, 5, (10,))),
        (RegressionMetric(("mae", "mse")), torch.randn(10, 2), torch.randn(10, 2)),
    ]


def test_merge_of_shards_equals_single_pass_and_reset():
    for metric, pred, target in _all_metrics():
        whole = copy.deepcopy(metric)
        whole.update(pred, target)
        a, b = copy.deepcopy(metric), copy.deepcopy(metric)
        a.update(pred[:4], target[:4])
        b.update(pred[4:], target[4:])
        assert a.merge(b).compute() == pytest.approx(whole.compute(), abs=1e-9), type(metric).__name__
        whole.reset()
        with pytest.raises(ConfigurationError):
            whole.compute()
    with pytest.raises(ConfigurationError, match="merge"):
        DepthMetric().merge(NormalMetric())
    with pytest.raises(ConfigurationError):
        SegmentationMetric(3).merge(SegmentationMetric(4))


def test_sync_without_distributed_is_a_noop():
    m = DepthMetric()
    m.update(torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0))
    before = m.compute()
    assert m.sync().compute() == before
    m.update(torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0))  # still allowed: nothing was reduced


def test_sync_all_reduces_every_state(monkeypatch):
    """With two (simulated) ranks holding identical data, sync must equal merging a copy."""
    reduced = []

    def fake_all_reduce(t, op=None, group=None):
        reduced.append(t)
        t.mul_(2)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    for metric, pred, target in _all_metrics():
        metric.update(pred, target)
        want = copy.deepcopy(metric).merge(copy.deepcopy(metric)).compute()
        reduced.clear()
        metric.sync()
        assert len(reduced) == len(metric.states())
        assert metric.compute() == pytest.approx(want, abs=1e-9)
        with pytest.raises(ConfigurationError, match="reset"):
            metric.update(pred, target)
        with pytest.raises(ConfigurationError, match="twice"):
            metric.sync()
        metric.reset()
        metric.update(pred, target)


_DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from mtlens.tasks import NormalMetric, SegmentationMetric
    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(4, 3, 4, 4, generator=g), torch.randint(-1, 3, (4, 4, 4), generator=g)
    npred, ntgt = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    seg, nor = SegmentationMetric(3), NormalMetric()
    seg.update(logits[rank::2], target[rank::2]); nor.update(npred[rank::2], ntgt[rank::2])
    seg.sync(); nor.sync()
    ref_s, ref_n = SegmentationMetric(3), NormalMetric()
    ref_s.update(logits, target); ref_n.update(npred, ntgt)
    assert seg.compute() == ref_s.compute(), (seg.compute(), ref_s.compute())
    a, b = nor.compute(), ref_n.compute()
    assert all(abs(a[k] - b[k]) < 1e-9 for k in a), (a, b)
    dist.barrier()  # leave together: a rank tearing gloo down while its peer sends can abort
    dist.destroy_process_group()
    print("ok", rank)
    """
)


@pytest.mark.slow
def test_sync_over_two_real_gloo_ranks(tmp_path):
    script = tmp_path / "ddp_metric.py"
    script.write_text(_DDP_SCRIPT)
    store = str(tmp_path / "store")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), store], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.startswith("ok")


def test_regression_metric_scale_reports_physical_units():
    from mtlens.tasks.metrics import RegressionMetric

    pred, target = torch.tensor([[0.5], [-1.0]]), torch.tensor([[0.0], [0.0]])
    m = RegressionMetric(("mae", "mse"), scale=2.0)
    m.update(pred, target)
    assert m.compute() == pytest.approx({"mae": 0.75 * 2.0, "mse": 0.625 * 4.0})
    unbound = RegressionMetric(("mae",), scale=None)
    unbound.update(pred, target)
    with pytest.raises(ConfigurationError, match="spec.bound"):
        unbound.compute()
    with pytest.raises(ConfigurationError, match="scale"):
        RegressionMetric(scale=0.0)
    with pytest.raises(ConfigurationError, match="cannot merge"):
        m.merge(RegressionMetric(("mae", "mse"), scale=3.0))
