"""The two papers' suites end to end on the format-exact data fixtures (``mtlens.data.fixtures``),
with tiny settings through ``--set`` exactly as a user would shrink them: one seed, one step, tiny
images and models (the real backbones' checkpoints are 0.2-0.6 GB per run, too much for CI; their
forward/backward on every benchmark is covered by tests/test_benchmarks_end_to_end.py).

What runs unchanged: the suite files, their presets' data/optimiser/schedule settings, the data
loaders on the real on-disk layouts, STL baselines, Δ, the store, the variants (CosReg at both
levels; Rep-MTL, TSR only, CSA only with the log transform)."""

from __future__ import annotations

import json

import pytest

from mtlens.bench import load_index, load_suite, run_suite
from mtlens.data.fixtures import (
    write_cityscapes_fixture,
    write_metagraspnet_fixture,
    write_nyuv2_fixture,
    write_office_fixture,
)

TINY = [
    "seeds=[0]",
    "base.train.epochs=1",
    "train.max_steps_per_epoch=1",
    "train.batch_size=2",
    "model.pretrained=false",
    "monitor.every=1",
    "checkpoint.every_steps=0",
]
TINY_DENSE = {"preset": "tiny-dense", "kwargs": {"widths": [4, 8, 8], "head_hidden": 8}}
TINY_VECTOR = {"preset": "lenet-multimnist", "kwargs": {"input_size": 32, "head_hidden": [8]}}


def _dense_roots(tmp_path):
    return {
        "nyuv2": write_nyuv2_fixture(tmp_path / "nyuv2", n_train=4, n_test=2, size=(16, 24)),
        "cityscapes": write_cityscapes_fixture(tmp_path / "cityscapes", n_train=4, n_test=2, size=(16, 32)),
    }


def _sets(bench: str, model: dict, options: dict) -> list[str]:
    out = [f"benchmarks.{bench}.config.model.preset={model['preset']}",
           f"benchmarks.{bench}.config.model.kwargs={json.dumps(model['kwargs'])}"]
    out += [f"benchmarks.{bench}.config.data.options.{k}={json.dumps(v)}" for k, v in options.items()]
    return out


def _check(out, n_benchmarks: int, variants: set[str]):
    idx = load_index(out)
    bad = [(e["label"], e["benchmark"], e["error"]) for e in idx["runs"] if e["status"] != "done"]
    assert not bad
    mtl = [e for e in idx["runs"] if e["kind"] == "mtl"]
    assert len({e["benchmark"] for e in mtl}) == n_benchmarks
    assert {e["variant"] for e in mtl} == variants
    for e in mtl:
        res = json.loads((out / e["results"]).read_text())
        assert res["delta"]["test"]["delta_p_task"] is not None, e["label"]
    return idx


@pytest.mark.slow
def test_efficiency_paper_suite_on_fixtures(tmp_path):
    roots = _dense_roots(tmp_path)
    roots["metagraspnet"] = write_metagraspnet_fixture(tmp_path / "mgn", scenes=(1, 2, 3), views=(0, 1),
                                                       size=(24, 32), real_scenes=(3,))
    # keep EW, MGDA (both levels), GradDrop (feature) and the CosReg variants (both levels)
    sets = [*TINY, "exclude=[aligned_mtl, pcgrad, gradvac, cagrad, nash_mtl, imtl, rgw, uw, gradnorm, dwa, gls, rlw, "
                   "famo]"]
    sets += _sets("nyuv2", TINY_DENSE, {"check_size": False})
    sets += _sets("cityscapes", TINY_DENSE, {"check_size": False})
    sets += _sets("metagraspnet", TINY_DENSE, {"size": [32, 32]})
    # the fixture's one tilted plane: the STL normal model needs a few steps before any pixel is within
    # 11.25 degrees; a baseline metric of 0 makes every relative Δ undefined (and that run fails, loudly)
    sets += ["benchmarks.metagraspnet.config.train.epochs=8", "benchmarks.metagraspnet.config.optim.lr=0.1"]
    suite = load_suite("efficiency-paper", sets, roots={k: str(v) for k, v in roots.items()})
    out = tmp_path / "store"
    summary = run_suite(suite, out)
    idx = _check(out, 3, {"none", "cosreg", "cosreg_feature"})
    labels = {e["label"] for e in idx["runs"]}
    assert {"mgda (param)", "mgda (feature)", "graddrop (feature)", "ew + cosreg", "ew + cosreg_feature"} <= labels
    assert summary.counts == {"done": len(idx["runs"])}
    cagrad_free = [e for e in idx["runs"] if e["benchmark"] == "metagraspnet" and e["kind"] == "mtl"]
    assert cagrad_free and all(e["seed"] == 0 for e in cagrad_free)


@pytest.mark.slow
def test_rep_mtl_suite_on_fixtures(tmp_path):
    roots = _dense_roots(tmp_path)
    for name in ("office-31", "office-home"):
        lists = write_office_fixture(tmp_path / name, name, per_domain=2, size=(20, 24))
        roots[name] = tmp_path / name
        roots[f"{name}-lists"] = lists
    # keep EW (+ Rep-MTL, TSR only, CSA only), DB-MTL and GradDrop (feature; excluded on Office)
    sets = [*TINY, "exclude=[gls, rlw, uw, dwa, imtl_l, gradnorm, famo, mgda, pcgrad, gradvac, imtl_g, cagrad, "
                   "nash_mtl, moco, aligned_mtl, imtl]"]
    sets += _sets("nyuv2", TINY_DENSE, {"check_size": False})
    sets += _sets("cityscapes", TINY_DENSE, {"check_size": False})
    for name in ("office-31", "office-home"):
        sets += _sets(name, TINY_VECTOR, {"split_dir": str(roots.pop(f"{name}-lists")), "size": 32})
        # one solid colour per class: a few steps make every STL accuracy non-zero (Δ is relative to it)
        sets += [f"benchmarks.{name}.config.train.epochs=8", f"benchmarks.{name}.config.optim.lr=0.03"]
    suite = load_suite("rep-mtl", sets, roots={k: str(v) for k, v in roots.items()})
    out = tmp_path / "store"
    run_suite(suite, out)
    idx = _check(out, 4, {"none", "log_losses", "rep_mtl", "rep_mtl_tsr", "rep_mtl_csa"})
    office = {e["label"] for e in idx["runs"] if e["benchmark"] == "office-31"}
    assert "graddrop (feature)" not in office and "db_mtl (param)" in office  # excluded on multi-input
    assert "graddrop (feature)" in {e["label"] for e in idx["runs"] if e["benchmark"] == "nyuv2"}


@pytest.mark.slow
def test_fashion_suite_on_the_real_debian_files(tmp_path):
    """The `fashion` suite on the full Fashion-MNIST of the Debian package (skipped without it),
    with a few steps per run: real data in, a leaderboard with finite Δ out."""
    from mtlens.data.mnist import find_fashion_mnist

    if find_fashion_mnist() is None:
        pytest.skip("Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
    sets = ["seeds=[0]", "exclude=[uw, dwa, rlw, gls, famo, pcgrad, cagrad, aligned_mtl, imtl_g, upgrad, graddrop]",
            "variants={none: {}}", "train.epochs=1", "train.max_steps_per_epoch=10", "monitor.every=5"]
    out = tmp_path / "store"
    run_suite(load_suite("fashion", sets), out)
    idx = _check(out, 1, {"none"})
    assert {e["label"] for e in idx["runs"] if e["kind"] == "mtl"} == {"ew", "mgda (param)", "mgda (feature)"}


def test_fashion_suite_needs_fashion_mnist_and_runs_on_idx_files(tmp_path, monkeypatch):
    """Without Fashion-MNIST (no Debian package, no --root) the suite stops before any run with the
    loader's fix; with IDX files given by --root it runs (here a tiny IDX fixture, tiny settings)."""
    from mtlens.data import mnist
    from mtlens.data.fixtures import write_mnist_idx_fixture
    from mtlens.errors import DataError

    monkeypatch.setattr(mnist, "find_fashion_mnist", lambda: None)  # as on a machine without the package
    tiny = ["seeds=[0]", "exclude=[uw, dwa, rlw, gls, famo, pcgrad, cagrad, aligned_mtl, imtl_g, upgrad]",
            "variants={none: {}, rep_mtl: {regularizers: [{name: rep_mtl}], methods: [ew]}}",
            "train.epochs=2", "train.batch_size=16", "optim.lr=0.01", "monitor.every=4"]
    with pytest.raises(DataError, match=r"suite 'fashion', benchmark 'multifashion': its data cannot be loaded.*"
                                        r"apt-get install dataset-fashion-mnist"):
        run_suite(load_suite("fashion", tiny), tmp_path / "none")
    assert not (tmp_path / "none" / "index.json").exists()

    root = tmp_path / "fashion"
    write_mnist_idx_fixture(root, n_train=200, n_test=40, gz=True, seed=1)  # learnable class patterns
    out = tmp_path / "store"
    summary = run_suite(load_suite("fashion", tiny, roots={"multifashion": str(root)}), out)
    idx = load_index(out)
    assert summary.counts == {"done": len(idx["runs"])}
    assert {e["label"] for e in idx["runs"]} == {"STL left", "STL right", "ew", "mgda (param)", "mgda (feature)",
                                                 "graddrop (feature)", "ew + rep_mtl"}
