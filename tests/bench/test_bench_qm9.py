"""The optional `qm9` suite: it expands to the quick-qm9 runs, and a missing extra fails before any run."""

from __future__ import annotations

import importlib.metadata

import pytest

from mtlens.bench.runner import probe_data
from mtlens.bench.suite import available_suites, expand, load_suite
from mtlens.errors import DataError, MissingDependencyError


def test_qm9_suite_expands_to_quick_qm9_runs_and_11_baselines():
    assert "qm9" in available_suites()
    specs = expand(load_suite("qm9"), device_type="cpu")
    labels = {s.label for s in specs}
    assert {f"STL {t}" for t in ("mu", "alpha", "homo", "lumo", "r2", "zpve", "u0", "u", "h", "g", "cv")} <= labels
    assert {"ew", "famo", "upgrad (feature)", "ew + rep_mtl"} <= labels and len(specs) == 23
    cfg = next(s for s in specs if s.label == "ew").config
    assert cfg.data.benchmark == "qm9" and cfg.data.options["n_train"] == 1000 and cfg.model.preset == "mpnn-qm9"


def test_qm9_suite_without_the_graph_extra_fails_before_any_run(monkeypatch):
    import mtlens.data.qm9 as qm9

    def missing(module, extra, purpose):
        raise MissingDependencyError(f"{purpose} needs '{module}'. Install it with: pip install 'mtlens[{extra}]'")

    suite = load_suite("qm9")
    specs = expand(suite, device_type="cpu")
    monkeypatch.setattr(qm9, "require", missing)
    with pytest.raises(MissingDependencyError, match=r"suite 'qm9'.*pip install 'mtlens\[graph\]'"):
        probe_data(suite, specs)


def test_qm9_suite_without_the_data_wheel_names_the_fix(monkeypatch):
    pytest.importorskip("torch_geometric")

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    suite = load_suite("qm9")
    with pytest.raises(DataError, match=r"suite 'qm9'.*qm9pack.*not installed.*mtlens\[graph\]"):
        probe_data(suite, expand(suite, device_type="cpu"))
