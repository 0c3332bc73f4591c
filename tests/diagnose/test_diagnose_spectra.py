"""Power-law α (Martin & Mahoney; WeightWatcher; Rep-MTL Sec. 4.3): known spectra, components."""

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

import mtlens  # noqa: F401
from mtlens.diagnose import components_of, fit_power_law, layer_eigenvalues, power_law_alpha
from mtlens.errors import ConfigurationError, MissingDependencyError
from mtlens.models.hps import HPSModel


def heavy_tailed_linear(alpha, n_in=400, n_out=300, seed=1):
    """A Linear layer whose WᵀW has eigenvalues drawn from a Pareto law p(λ) ∝ λ^(−alpha), λ ≥ 1."""
    g = np.random.default_rng(seed)
    lam = (1 - g.random(n_out)) ** (-1 / (alpha - 1))
    U, _ = np.linalg.qr(g.standard_normal((n_in, n_out)))
    V, _ = np.linalg.qr(g.standard_normal((n_out, n_out)))
    layer = nn.Linear(n_in, n_out, bias=False)
    layer.weight.data = torch.tensor((U @ np.diag(np.sqrt(lam)) @ V.T).T, dtype=torch.float32)
    return layer


def test_fit_power_law_on_pareto_samples():
    g = np.random.default_rng(0)
    for alpha in (2.0, 3.0, 4.5):
        x = 0.7 * (1 - g.random(3000)) ** (-1 / (alpha - 1))
        a, xmin, D, n = fit_power_law(x)
        assert a == pytest.approx(alpha, rel=0.08) and 0 <= D < 0.1 and n >= 8
    with pytest.raises(ConfigurationError, match="positive"):
        fit_power_law(np.array([0.0, 1.0, 2.0]))


def test_conv_kernels_are_sliced_like_weightwatcher():
    conv = nn.Conv2d(4, 8, 3)
    ev = layer_eigenvalues(conv.weight)
    W = conv.weight.detach().double()
    ref = np.sort(
        np.concatenate(
            [torch.linalg.svdvals(W[:, :, i, j]).pow(2).numpy() for i in range(3) for j in range(3)]
        )
    )
    assert ev.shape == (36,)
    np.testing.assert_allclose(ev, ref, rtol=1e-10)


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_mle_recovers_a_known_heavy_tail(alpha):
    rep = power_law_alpha({"layer": heavy_tailed_linear(alpha)}, method="mle")
    assert rep.method == "mle" and rep.summary["layer"] == pytest.approx(alpha, rel=0.12)
    (la,) = rep.layers
    assert la.num_evals == 300 and la.kind == "Linear" and la.layer == ""


def test_weightwatcher_recovers_a_known_heavy_tail_and_agrees_with_mle():
    pytest.importorskip("weightwatcher")
    layer = heavy_tailed_linear(3.0)
    ww = power_law_alpha({"layer": layer}, method="weightwatcher")
    mle = power_law_alpha({"layer": layer}, method="mle")
    assert ww.summary["layer"] == pytest.approx(3.0, rel=0.12)
    assert ww.summary["layer"] == pytest.approx(mle.summary["layer"], rel=0.05)


def _tiny_hps():
    enc = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4, 32)
    )
    heads = {
        "a": nn.Linear(32, 10),
        "b": nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 12)),
        "tiny": nn.Linear(32, 3),
    }
    return HPSModel(enc, heads, dense=False)


@pytest.mark.parametrize("method", ["mle", "weightwatcher"])
def test_per_component_summary_on_a_tiny_hps_model(method):
    if method == "weightwatcher":
        pytest.importorskip("weightwatcher")
    model = _tiny_hps()
    rep = power_law_alpha(model, method=method)
    assert set(rep.summary) == {"encoder", "heads/a", "heads/b", "heads/tiny"}
    enc_alphas = [la.alpha for la in rep.component("encoder")]
    assert len(enc_alphas) == 3 and rep.summary["encoder"] == pytest.approx(float(np.median(enc_alphas)))
    assert {la.layer for la in rep.component("heads/b")} == {"0", "2"}
    assert all(
        math.isfinite(rep.summary[c]) and rep.summary[c] > 1 for c in ("encoder", "heads/a", "heads/b")
    )
    assert math.isnan(rep.summary["heads/tiny"])  # 3 eigenvalues < min_evals: skipped, and said so
    assert any(c == "heads/tiny" and "min_evals" in why for c, _, why in rep.skipped)
    assert set(rep.to_dict()) == {"alpha/encoder", "alpha/heads/a", "alpha/heads/b", "alpha/heads/tiny"}
    mean_rep = power_law_alpha(model, method=method, reduce="mean")
    assert mean_rep.summary["encoder"] == pytest.approx(float(np.mean(enc_alphas)))


def test_components_and_options_are_validated(monkeypatch):
    model = _tiny_hps()
    assert list(components_of(model)) == ["encoder", "heads/a", "heads/b", "heads/tiny"]
    assert list(components_of({"x": nn.Linear(2, 2)})) == ["x"]
    with pytest.raises(ConfigurationError, match="encoder"):
        power_law_alpha(nn.Linear(20, 20), method="mle")
    with pytest.raises(ConfigurationError, match="method"):
        power_law_alpha(model, method="hill")
    with pytest.raises(ConfigurationError, match="ww_options"):
        power_law_alpha(model, method="mle", ww_options={"fix_fingers": True})
    # weightwatcher missing: a loud error with the install hint, and the built-in estimator still works
    monkeypatch.setitem(sys.modules, "weightwatcher", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'mtlens\[spectra\]'"):
        power_law_alpha(model, method="weightwatcher")
    assert math.isfinite(power_law_alpha(model, method="mle").summary["encoder"])


# -- one default, and the two estimators agree on power laws (issue 12, item 10) ----------------------
def test_one_default_estimator_in_python_and_the_cli():
    import inspect

    from typer.testing import CliRunner

    from mtlens.cli.main import app
    from mtlens.diagnose.spectra import DEFAULT_SPECTRA_METHOD

    assert inspect.signature(power_law_alpha).parameters["method"].default == DEFAULT_SPECTRA_METHOD == "mle"
    help_text = CliRunner().invoke(app, ["diagnose", "--help"]).output
    assert "[default: mle]" in " ".join(help_text.split())


def _power_law_weight(shape, alpha, seed):
    """A weight whose (pooled) eigenvalues of WᵀW are drawn from p(λ) ∝ λ^(−α), λ ≥ 1."""
    rng = np.random.default_rng(seed)
    out, inp = shape[0], shape[1]
    positions = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    k = min(out, inp)
    mats = []
    for _ in range(positions):
        lam = (1.0 - rng.random(k)) ** (-1.0 / (alpha - 1.0))
        U, _ = np.linalg.qr(rng.standard_normal((out, k)))
        V, _ = np.linalg.qr(rng.standard_normal((inp, k)))
        mats.append(U @ np.diag(np.sqrt(lam)) @ V.T)
    W = np.stack(mats, axis=-1).reshape(shape) if len(shape) > 2 else mats[0]
    return torch.tensor(W, dtype=torch.float32)


@pytest.mark.parametrize("alpha", [2.5, 3.0, 4.0])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_weightwatcher_and_the_builtin_mle_agree_on_a_synthetic_power_law(alpha, kind):
    pytest.importorskip("weightwatcher")
    if kind == "linear":
        layer = nn.Linear(256, 256, bias=False)
        layer.weight.data = _power_law_weight((256, 256), alpha, seed=int(alpha * 10))
    else:
        layer = nn.Conv2d(96, 96, 2, bias=False)
        layer.weight.data = _power_law_weight((96, 96, 2, 2), alpha, seed=int(alpha * 10) + 1)
    mle = power_law_alpha({"layer": layer}, method="mle").summary["layer"]
    ww = power_law_alpha({"layer": layer}, method="weightwatcher").summary["layer"]
    assert mle == pytest.approx(alpha, rel=0.2) and ww == pytest.approx(alpha, rel=0.2)
    assert mle == pytest.approx(ww, rel=0.05)


def test_where_they_differ_it_is_the_minimum_tail():
    """Not a power law (LeNet's 50×500 layer at initialisation, the docs' example): WeightWatcher fits a
    7-eigenvalue tail (α ≈ 20); the built-in fit needs 8 and finds a longer one; with min_tail=7 it is WW's."""
    pytest.importorskip("weightwatcher")
    from mtlens.models import create

    torch.manual_seed(0)
    fc = create("lenet-multimnist", {"l": 10, "r": 10}).encoder.fc
    ww = power_law_alpha({"fc": fc}, method="weightwatcher").layers[0]
    ours = power_law_alpha({"fc": fc}, method="mle").layers[0]
    evals = layer_eigenvalues(fc.weight)
    alpha7, xmin7, _, tail7 = fit_power_law(evals, min_tail=7)
    assert tail7 == 7 and alpha7 == pytest.approx(ww.alpha, rel=1e-6) and xmin7 == pytest.approx(ww.xmin, rel=1e-6)
    assert ww.alpha > 15 and 3 < ours.alpha < 6  # 20.3 vs 4.6 in docs/diagnostics.md
