"""Ranking Similarity (arXiv:2402.03557): Kendall τ-b / Spearman ρ on hand-built rankings, bootstrap."""

import math

import numpy as np
import pytest
from scipy import stats

import mtlens  # noqa: F401
from mtlens.diagnose import IDENTIFIER_DIRECTIONS, ranking_similarity, summarize_steps
from mtlens.errors import ConfigurationError, ShapeError

DM = {"ew": -1.8, "mgda": 0.2, "pcgrad": -0.5, "rep_mtl": 1.7}  # Δm, higher is better
ORDER = ["rep_mtl", "mgda", "pcgrad", "ew"]


def test_identical_and_reversed_rankings():
    fd = {"rep_mtl": 0.30, "mgda": 0.35, "pcgrad": 0.50, "ew": 0.61}  # lower FD = better, same order as Δm
    r = ranking_similarity(fd, DM, identifier="fd")
    assert r.kendall_tau == pytest.approx(1.0) and r.spearman_rho == pytest.approx(1.0)
    assert r.identifier_ranking == ORDER and r.performance_ranking == ORDER
    assert r.kendall_interval is None and r.n_seeds == 1 and r.n_methods == 4
    rev = {m: 1.0 - v for m, v in fd.items()}
    r = ranking_similarity(rev, DM, identifier="fd")
    assert r.kendall_tau == pytest.approx(-1.0) and r.spearman_rho == pytest.approx(-1.0)
    assert r.identifier_ranking == ORDER[::-1]


def test_direction_handling():
    gds = {"rep_mtl": 0.4, "mgda": 0.3, "pcgrad": 0.2, "ew": 0.1}  # higher GDS = better
    assert ranking_similarity(gds, DM, identifier="gds").kendall_tau == pytest.approx(1.0)
    assert ranking_similarity(gds, DM, higher_is_better=True).kendall_tau == pytest.approx(1.0)
    assert ranking_similarity(gds, DM, higher_is_better=False).kendall_tau == pytest.approx(-1.0)
    err = {m: -v for m, v in DM.items()}  # an error metric: lower is better
    r = ranking_similarity(gds, err, identifier="gds", performance_higher_is_better=False)
    assert r.kendall_tau == pytest.approx(1.0) and r.performance_ranking == ORDER
    assert IDENTIFIER_DIRECTIONS["fd"] is False and IDENTIFIER_DIRECTIONS["gms"] is True
    with pytest.raises(ConfigurationError, match="declared lower-is-better"):
        ranking_similarity(gds, DM, identifier="fd", higher_is_better=True)
    with pytest.raises(ConfigurationError, match="good direction"):
        ranking_similarity(gds, DM)
    with pytest.raises(ConfigurationError, match="unknown identifier"):
        ranking_similarity(gds, DM, identifier="gradnorm")


def test_ties_use_tau_b():
    ident = {"a": 1.0, "b": 1.0, "c": 2.0, "d": 3.0}  # lower is better; a and b tie
    perf = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    r = ranking_similarity(ident, perf, higher_is_better=False)
    # C = 5 concordant, D = 0, one tie in the identifier: τ_b = 5 / sqrt((6 - 1)(6 - 0))
    assert r.kendall_tau == pytest.approx(5 / math.sqrt(30))
    assert r.spearman_rho == pytest.approx(stats.spearmanr([-1, -1, -2, -3], [4, 3, 2, 1]).statistic)
    flat = ranking_similarity({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 2.0}, higher_is_better=True)
    assert math.isnan(flat.kendall_tau)  # a constant ranking has no τ


def test_bootstrap_over_seeds_is_seeded_and_shaped():
    rng = np.random.default_rng(3)
    fd = {m: list(0.5 - 0.1 * i + 0.05 * rng.standard_normal(3)) for i, m in enumerate(ORDER[::-1])}
    dm = {m: list(v + 0.3 * rng.standard_normal(3)) for m, v in DM.items()}
    r1 = ranking_similarity(fd, dm, identifier="fd", n_bootstrap=200, seed=7)
    r2 = ranking_similarity(fd, dm, identifier="fd", n_bootstrap=200, seed=7)
    r3 = ranking_similarity(fd, dm, identifier="fd", n_bootstrap=200, seed=8)
    assert r1.n_seeds == 3 and r1.kendall_bootstrap.shape == (200,) and r1.spearman_bootstrap.shape == (200,)
    lo, hi = r1.kendall_interval
    assert -1.0 <= lo <= hi <= 1.0 and len(r1.spearman_interval) == 2
    np.testing.assert_array_equal(r1.kendall_bootstrap, r2.kendall_bootstrap)
    assert r1.kendall_interval == r2.kendall_interval
    assert not np.array_equal(r1.kendall_bootstrap, r3.kendall_bootstrap)
    # point estimate: τ-b of the seed means
    means_fd = [-np.mean(fd[m]) for m in sorted(fd)]
    means_dm = [np.mean(dm[m]) for m in sorted(dm)]
    assert r1.kendall_tau == pytest.approx(stats.kendalltau(means_fd, means_dm).statistic)
    assert set(r1.to_dict()) == {
        "ranking/kendall_tau",
        "ranking/spearman_rho",
        "ranking/kendall_low",
        "ranking/kendall_high",
        "ranking/spearman_low",
        "ranking/spearman_high",
    }
    # a scalar performance per method is allowed with per-seed identifiers
    r = ranking_similarity(fd, DM, identifier="fd", n_bootstrap=50)
    assert r.kendall_interval is not None


def test_inputs_are_validated():
    with pytest.raises(ConfigurationError, match="same methods"):
        ranking_similarity({"a": 1.0, "b": 2.0}, {"a": 1.0, "c": 2.0}, higher_is_better=True)
    with pytest.raises(ConfigurationError, match="at least 2"):
        ranking_similarity({"a": 1.0}, {"a": 1.0}, higher_is_better=True)
    with pytest.raises(ShapeError, match="paired"):
        ranking_similarity(
            {"a": [1.0, 2.0], "b": [1.0, 2.0]}, {"a": [1.0, 2.0, 3.0], "b": 1.0}, higher_is_better=True
        )
    with pytest.raises(ShapeError, match="finite"):
        ranking_similarity({"a": float("nan"), "b": 1.0}, {"a": 1.0, "b": 2.0}, higher_is_better=True)


def test_summarize_steps():
    assert summarize_steps([1.0, 2.0, float("nan"), 3.0]) == pytest.approx(2.0)
    assert summarize_steps([1.0, 5.0, 2.0], reduction="median") == 2.0
    assert summarize_steps([1.0, 5.0, 2.0], reduction="last") == 2.0
    with pytest.raises(ShapeError, match="no finite"):
        summarize_steps([float("nan")])
    with pytest.raises(ConfigurationError, match="reduction"):
        summarize_steps([1.0], reduction="max")


def test_batched_bootstrap_statistics_equal_scipy():
    """The bootstrap's vectorised τ-b / ρ equal scipy's, ties and constant rows included."""
    from mtlens.diagnose.ranking import _tau_rho, _tau_rho_batch

    rng = np.random.default_rng(0)
    ident = rng.integers(0, 4, size=(300, 6)).astype(float)  # many ties
    perf = rng.standard_normal((300, 6))
    perf[::7] = np.round(perf[::7])
    ident[5] = 1.0  # a constant row: NaN
    tau, rho = _tau_rho_batch(ident, perf)
    for i in range(300):
        t, r = _tau_rho(ident[i], perf[i])
        if math.isnan(t):
            assert math.isnan(tau[i]) and math.isnan(rho[i])
        else:
            assert tau[i] == pytest.approx(t, abs=1e-12) and rho[i] == pytest.approx(r, abs=1e-12)
    assert math.isnan(tau[5])


def test_paired_bootstrap_keeps_a_shared_seed_effect_out_of_the_interval():
    """Seeds shared by every method (the same data order and STL baselines, so one seed's Δ is higher for all)
    must not reorder the methods in the bootstrap. Here the identifier ranks the methods exactly as Δ on each
    seed (τ = 1 per seed and on the seed means), but seed 1 lifts every Δ by 10 points and every FD by 0.5:
    drawn per method, the resamples rank methods by the seed they drew and the interval fell far below the
    point estimate (the report showed TSR entropy τ = 0.29 with the interval [−0.65, 0.16])."""
    methods = [f"m{i}" for i in range(6)]
    fd = {m: [0.60 - 0.01 * i, 1.10 - 0.01 * i] for i, m in enumerate(methods)}  # lower is better
    delta = {m: [-20.0 + i, -10.0 + i] for i, m in enumerate(methods)}
    unpaired = ranking_similarity(fd, delta, identifier="fd", n_bootstrap=500, seed=0)
    paired = ranking_similarity(fd, delta, identifier="fd", n_bootstrap=500, seed=0, paired=True)
    assert unpaired.kendall_tau == paired.kendall_tau == pytest.approx(1.0)
    assert paired.kendall_interval == pytest.approx((1.0, 1.0))
    assert paired.spearman_interval == pytest.approx((1.0, 1.0))
    assert unpaired.kendall_interval[0] < 0.5  # what the independent draws did


def test_paired_bootstrap_needs_the_same_seeds_everywhere():
    with pytest.raises(ConfigurationError, match="paired=True needs every method's identifier and performance"):
        ranking_similarity({"a": [1.0, 2.0], "b": [1.0, 2.0, 3.0]}, {"a": [1.0, 2.0], "b": [0.0, 1.0, 2.0]},
                           identifier="fd", paired=True)
