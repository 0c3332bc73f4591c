"""Golden values for the Gramian aggregators mgda, pcgrad, gradvac, cagrad, imtl_g, imtl, nash_mtl
and aligned_mtl: J → G → w → d = wᵀJ compared with values derived by hand or with an independent
direct computation on the vectors (literal algorithms, scipy optimisation of the defining problem).
"""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

import mtlens  # noqa: F401
from mtlens.engine import mtl_backward
from mtlens.errors import (
    ConfigurationError,
    MissingDependencyError,
    MTLensError,
    ShapeError,
    SolverError,
)
from mtlens.methods import create, get
from mtlens.methods._solvers import min_norm_simplex

NAMES = ["mgda", "pcgrad", "gradvac", "cagrad", "imtl_g", "imtl", "nash_mtl", "aligned_mtl"]


def _J(rows):
    return torch.tensor(rows, dtype=torch.float64)


def _run(method, J, losses=None):
    T = J.shape[0]
    if losses is None:
        losses = torch.ones(T, dtype=torch.float64)
    losses = torch.as_tensor(losses, dtype=torch.float64)
    w = method.weights(J @ J.T, losses)
    assert w.dtype == torch.float64 and w.shape == (T,)
    assert torch.isfinite(w).all()
    return w, w @ J


def _rand_J(T, P, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, P, generator=g, dtype=torch.float64)
    return J * torch.exp(spread * torch.randn(T, 1, generator=g, dtype=torch.float64))


def _close(a, b, tol=1e-8):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------
# registry and configuration
# ------------------------------------------------------------------------------------------------
def test_registered_as_gradient_methods_with_references():
    for n in NAMES:
        cls = get(n)
        assert cls.family == "gradient" and cls.levels == ("param", "feature")
        assert cls.reference and cls.__doc__ and cls.defaults_source
    assert all(get(n).stateful for n in ("pcgrad", "gradvac", "imtl", "nash_mtl"))
    assert not get("mgda").stateful and not get("imtl_g").stateful


@pytest.mark.parametrize("name, bad", [
    ("mgda", {"normalization": "max"}), ("mgda", {"apply_to": "both"}), ("cagrad", {"c": -0.1}),
    ("cagrad", {"rescale": 3}), ("gradvac", {"beta": 1.5}), ("imtl", {"lr": 0.0}),
    ("imtl", {"optimizer": "rmsprop"}), ("nash_mtl", {"max_norm": -1.0}), ("nash_mtl", {"optim_niter": 0}),
    ("nash_mtl", {"update_weights_every": 1.5}), ("aligned_mtl", {"scale_mode": "max"}),
    ("aligned_mtl", {"task_weights": [1.0, -1.0]}), ("pcgrad", {"seed": -3}),
])
def test_invalid_hyperparameters_raise_configuration_error(name, bad):
    with pytest.raises(ConfigurationError):
        create(name, **bad)


def test_error_message_names_allowed_values():
    with pytest.raises(ConfigurationError, match="none.*l2.*loss.*loss\\+"):
        create("mgda", normalization="L2")


# ------------------------------------------------------------------------------------------------
# min-norm solver and MGDA
# ------------------------------------------------------------------------------------------------
def _brute_force_min_norm(G):
    """Enumerate supports: exact KKT points of min wᵀGw on the simplex (independent of Wolfe)."""
    T = G.shape[0]
    best = None
    for r in range(1, T + 1):
        for S in itertools.combinations(range(T), r):
            S = list(S)
            k = len(S)
            K = np.zeros((k + 1, k + 1))
            K[:k, :k] = G[np.ix_(S, S)]
            K[:k, k] = K[k, :k] = 1.0
            sol = np.linalg.lstsq(K, np.r_[np.zeros(k), 1.0], rcond=None)[0][:k]
            if np.all(sol >= -1e-12):
                w = np.zeros(T)
                w[S] = np.clip(sol, 0, None) / np.clip(sol, 0, None).sum()
                if best is None or w @ G @ w < best[0]:
                    best = (w @ G @ w, w)
    return best


def test_mgda_hand_value_two_tasks():
    # g1 = (1,0), g2 = (0,2): min over t of ‖(1−t, 2t)‖² → t = 1/5, d = (4/5, 2/5)
    w, d = _run(create("mgda"), _J([[1, 0], [0, 2]]))
    _close(w, [0.8, 0.2])
    _close(d, [0.8, 0.4])


@pytest.mark.parametrize("T, P, seed", [(2, 4, 0), (3, 3, 1), (5, 7, 2), (5, 3, 3), (6, 2, 4)])
def test_mgda_exact_against_brute_force_and_scipy(T, P, seed):
    J = _rand_J(T, P, seed)
    G = (J @ J.T).numpy()
    m = create("mgda")
    w, d = _run(m, J)
    val, wb = _brute_force_min_norm(G)
    assert float(d @ d) == pytest.approx(val, rel=1e-10, abs=1e-14)
    if T <= P:  # full row rank: the min-norm point (hence d) is unique
        _close(d, torch.from_numpy(wb) @ J, 1e-8)
    res = minimize(lambda x: x @ G @ x, np.full(T, 1 / T), jac=lambda x: 2 * G @ x, method="SLSQP",
                   bounds=[(0, 1)] * T, constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
                   options={"ftol": 1e-15, "maxiter": 500})
    assert float(d @ d) <= res.fun + 1e-12  # never worse than a generic solver
    assert m.log_values()["kkt_gap"] <= 1e-12
    assert bool(((J @ d) >= float(d @ d) - 1e-10).all())  # non-conflicting: g_t·d ≥ ‖d‖²


def test_min_norm_solver_degenerate_cases():
    # identical rows: the symmetric (least-norm) optimal weights
    np.testing.assert_allclose(min_norm_simplex(np.ones((2, 2))).weights, [0.5, 0.5])
    # opposite rows: 0 is in the hull
    r = min_norm_simplex(np.array([[1.0, -1.0], [-1.0, 1.0]]))
    assert r.value == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(r.weights, [0.5, 0.5])
    # all zero: uniform
    np.testing.assert_allclose(min_norm_simplex(np.zeros((3, 3))).weights, [1 / 3] * 3)
    # scale invariance of the weights
    J = _rand_J(4, 5, 7).numpy()
    w1 = min_norm_simplex(J @ J.T).weights
    for s in (1e-10, 1e10):
        np.testing.assert_allclose(min_norm_simplex((s * J) @ (s * J).T).weights, w1, rtol=1e-9, atol=1e-12)


def test_mgda_normalizations_match_direct_computation():
    J = _rand_J(3, 5, 11, spread=2.0)
    L = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    norms = J.norm(dim=1)
    for mode, n in (("l2", norms), ("loss", L), ("loss+", L * norms)):
        Jn = J / n[:, None]
        val, lam = _brute_force_min_norm((Jn @ Jn.T).numpy())
        lam = torch.from_numpy(lam)
        w, d = _run(create("mgda", normalization=mode), J, L)
        _close(d, lam @ Jn, 1e-8)  # update = min-norm point of the normalised gradients
        _close(w, lam / n, 1e-8)
        w_raw, _ = _run(create("mgda", normalization=mode, apply_to="raw"), J, L)
        _close(w_raw, lam, 1e-8)  # official code: λ applied to the raw losses
    # l2 is invariant to per-task gradient scaling
    scale = torch.tensor([1e-3, 1.0, 1e4], dtype=torch.float64)[:, None]
    _, d1 = _run(create("mgda", normalization="l2"), J)
    _, d2 = _run(create("mgda", normalization="l2"), J * scale)
    _close(d1, d2, 1e-8)


def test_mgda_loss_normalization_needs_positive_losses():
    with pytest.raises(ConfigurationError, match="positive"):
        create("mgda", normalization="loss").weights(torch.eye(2, dtype=torch.float64),
                                                     torch.tensor([1.0, -0.5]))


def test_mgda_opposite_and_identical_rows():
    g = [1.0, 2.0, -1.0]
    w, d = _run(create("mgda"), _J([g, [-x for x in g]]))
    _close(d, torch.zeros(3), 1e-12)
    _close(w, [0.5, 0.5])
    w, d = _run(create("mgda"), _J([g, g, [0.0, 0.0, 5.0]]))
    assert float(w[0]) == pytest.approx(float(w[1]))  # permutation-symmetric tie-break


# ------------------------------------------------------------------------------------------------
# PCGrad
# ------------------------------------------------------------------------------------------------
def _pcgrad_literal(J, gen):
    """Algorithm 1 of the paper on the vectors, with the same per-task random orders."""
    T = J.shape[0]
    out = torch.zeros(J.shape[1], dtype=torch.float64)
    for i in range(T):
        others = [j for j in range(T) if j != i]
        order = [others[k] for k in torch.randperm(len(others), generator=gen).tolist()]
        gi = J[i].clone()
        for j in order:
            dot = gi @ J[j]
            if dot < 0:
                gi = gi - dot / (J[j] @ J[j]) * J[j]
        out += gi
    return out


def test_pcgrad_hand_value():
    # g1=(1,0), g2=(−1,1): g1' = g1 + g2/2 = (.5,.5), g2' = g2 + g1 = (0,1); sum (.5, 1.5)
    w, d = _run(create("pcgrad", seed=0), _J([[1, 0], [-1, 1]]))
    _close(d, [0.5, 1.5])
    _close(w, [2.0, 1.5])


@pytest.mark.parametrize("T, P, seed", [(2, 3, 0), (3, 4, 1), (5, 6, 2), (5, 2, 3)])
def test_pcgrad_matches_literal_projection(T, P, seed):
    J = _rand_J(T, P, 100 + seed)
    m = create("pcgrad", seed=seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    for step in range(3):  # several steps: the generator advances identically
        Js = J + 0.5 * step
        _, d = _run(m, Js)
        _close(d, _pcgrad_literal(Js, gen), 1e-10)
    # state round trip reproduces the next step exactly
    st = m.state_dict()
    _, d_next = _run(m, J)
    m2 = create("pcgrad", seed=seed + 1)
    m2.load_state_dict(st)
    _, d_next2 = _run(m2, J)
    _close(d_next, d_next2, 0)


def test_pcgrad_two_tasks_never_conflict():
    for seed in range(20):
        J = _rand_J(2, 4, 300 + seed)
        _, d = _run(create("pcgrad", seed=seed), J)
        assert bool(((J @ d) >= -1e-10 * float(J.norm() ** 2)).all())


def test_pcgrad_seed_none_follows_torch_manual_seed():
    J = _rand_J(5, 3, 9)
    torch.manual_seed(123)
    _, d1 = _run(create("pcgrad"), J)
    torch.manual_seed(123)
    _, d2 = _run(create("pcgrad"), J)
    _close(d1, d2, 0)


# ------------------------------------------------------------------------------------------------
# GradVac
# ------------------------------------------------------------------------------------------------
class _GradVacLiteral:
    """The paper's Algorithm 1 on the vectors (whole-model variant), same RNG usage."""

    def __init__(self, T, beta, seed):
        self.phi = torch.zeros(T, T, dtype=torch.float64)
        self.beta = beta
        self.gen = torch.Generator()
        self.gen.manual_seed(seed)

    def step(self, J):
        T = J.shape[0]
        out = torch.zeros(J.shape[1], dtype=torch.float64)
        for i in range(T):
            others = [j for j in range(T) if j != i]
            order = [others[k] for k in torch.randperm(len(others), generator=self.gen).tolist()]
            gi = J[i].clone()
            for j in order:
                phi = float(gi @ J[j] / (gi.norm() * J[j].norm()))
                tgt = float(self.phi[i, j])
                if phi < tgt:
                    gi = gi + gi.norm() * (tgt * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - tgt**2)) / (
                        J[j].norm() * math.sqrt(1 - tgt**2)) * J[j]
                    # the correction reaches the target cosine exactly
                    assert float(gi @ J[j] / (gi.norm() * J[j].norm())) == pytest.approx(tgt, abs=1e-9)
                self.phi[i, j] = (1 - self.beta) * tgt + self.beta * phi
            out += gi
        return out


@pytest.mark.parametrize("T, beta", [(2, 0.5), (3, 0.01), (5, 0.5)])
def test_gradvac_matches_literal_algorithm_over_steps(T, beta):
    m = create("gradvac", beta=beta, seed=7)
    ref = _GradVacLiteral(T, beta, 7)
    for step in range(4):
        J = _rand_J(T, 6, 40 + step) + 0.3 * step  # drifting gradients: targets move
        _, d = _run(m, J)
        _close(d, ref.step(J), 1e-9)
        _close(m.phi_hat, ref.phi, 1e-12)


def test_gradvac_first_step_is_pcgrad_and_state_round_trip():
    J = _rand_J(4, 5, 77)
    _, d_vac = _run(create("gradvac", seed=3), J)
    _, d_pc = _run(create("pcgrad", seed=3), J)
    _close(d_vac, d_pc, 1e-10)  # zero targets: the correction is PCGrad's projection
    m = create("gradvac", seed=3)
    _run(m, J)
    st = m.state_dict()
    _, a = _run(m, J * 1.1)
    m2 = create("gradvac", seed=99)
    m2.load_state_dict(st)
    _, b = _run(m2, J * 1.1)
    _close(a, b, 0)
    with pytest.raises(ShapeError):
        _run(m2, _rand_J(3, 5, 1))


# ------------------------------------------------------------------------------------------------
# CAGrad
# ------------------------------------------------------------------------------------------------
def _cagrad_primal(J, c):
    """max_d min_i g_iᵀd  s.t. ‖d − g0‖ ≤ c‖g0‖, by scipy on (d, t) — the paper's primal."""
    Jn = J.numpy()
    g0 = Jn.mean(0)
    r = c * np.linalg.norm(g0)
    cons = [{"type": "ineq", "fun": lambda z: Jn @ z[:-1] - z[-1]},
            {"type": "ineq", "fun": lambda z: r**2 - np.sum((z[:-1] - g0) ** 2)}]
    res = minimize(lambda z: -z[-1], np.append(g0, (Jn @ g0).min()), constraints=cons, method="SLSQP",
                   options={"ftol": 1e-15, "maxiter": 1000})
    return torch.from_numpy(res.x[:-1]), -res.fun


def test_cagrad_hand_value_orthogonal():
    # symmetric: x = (1/2, 1/2), g_w = g0, λ = c → d = (1+c) g0; weights T(1/T + c/2)/(1+c²)
    c = 0.5
    w, d = _run(create("cagrad", c=c), _J([[1, 0], [0, 1]]))
    _close(w, [(1 + c) / (1 + c**2)] * 2)
    w0, _ = _run(create("cagrad", c=c, rescale=0), _J([[1, 0], [0, 1]]))
    _close(w0, [1 + c] * 2)
    w2, _ = _run(create("cagrad", c=c, rescale=2), _J([[1, 0], [0, 1]]))
    _close(w2, [1.0] * 2)
    w1, _ = _run(create("cagrad", c=c), _J([[3.0, 4.0]]))  # T = 1: d = (1+c) g
    _close(w1, [(1 + c) / (1 + c**2)])


@pytest.mark.parametrize("T, P, c, seed", [(2, 3, 0.5, 0), (3, 4, 0.4, 1), (5, 6, 0.5, 2), (5, 8, 2.0, 3),
                                           (4, 4, 0.1, 4)])
def test_cagrad_matches_scipy_primal(T, P, c, seed):
    J = _rand_J(T, P, 500 + seed, spread=0.5)
    _, d = _run(create("cagrad", c=c, rescale=0), J)
    d_paper = d / T  # our weights carry the official code's ×T ("to match the sum loss")
    d_ref, val = _cagrad_primal(J, c)
    assert float((J @ d_paper).min()) == pytest.approx(val, rel=1e-7, abs=1e-9)
    _close(d_paper, d_ref, 1e-5)
    g0 = J.mean(0)
    assert float((d_paper - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-9)


def test_cagrad_pareto_stationary_projection():
    # g, −g, h with g ⟂ h: 0 in the hull and g_w = 0 is dual optimal; d = g0 already satisfies Jd ≥ 0
    J = _J([[1, 0, 0], [-1, 0, 0], [0, 2, 0]])
    m = create("cagrad", c=0.5)
    w, d = _run(m, J)
    assert m.log_values()["stationary"] == 1.0
    _close(d, 3 * J.mean(0) / 1.25, 1e-9)
    # T = 2 opposite: g0 = 0 → no update
    _, d = _run(create("cagrad"), _J([[1.0, 2.0], [-1.0, -2.0]]))
    _close(d, torch.zeros(2), 1e-12)


# ------------------------------------------------------------------------------------------------
# IMTL-G and IMTL
# ------------------------------------------------------------------------------------------------
def _imtl_g_paper(J):
    """The paper's closed form on the vectors: α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σ α_{2:T}."""
    U = J / J.norm(dim=1, keepdim=True)
    D = J[:1] - J[1:]
    Ud = U[:1] - U[1:]
    a = J[0] @ Ud.T @ torch.linalg.inv(D @ Ud.T)
    return torch.cat([1 - a.sum().reshape(1), a])


@pytest.mark.parametrize("T, P, seed", [(2, 3, 0), (3, 5, 1), (5, 5, 2), (5, 9, 3)])
def test_imtl_g_matches_paper_closed_form(T, P, seed):
    J = _rand_J(T, P, 700 + seed, spread=1.5)
    w, d = _run(create("imtl_g"), J)
    _close(w, _imtl_g_paper(J), 1e-7)
    proj = J @ d / J.norm(dim=1)
    _close(proj, proj.mean().expand(T), 1e-8)  # equal projections on the unit gradients
    assert float(w.sum()) == pytest.approx(1.0)


def test_imtl_g_hand_value_and_scale_invariance():
    # g1=(1,0), g2=(0,2): d·u1 = d·u2 with α1+α2 = 1 → α = (2/3, 1/3), d = (2/3, 2/3)
    w, d = _run(create("imtl_g"), _J([[1, 0], [0, 2]]))
    _close(w, [2 / 3, 1 / 3])
    _close(d, [2 / 3, 2 / 3])
    J = _rand_J(4, 6, 5)
    _, d1 = _run(create("imtl_g"), J)
    _, d2 = _run(create("imtl_g"), J * torch.tensor([1e-6, 1.0, 30.0, 1e5], dtype=torch.float64)[:, None])
    _close(d1 / d1.norm(), d2 / d2.norm(), 1e-8)


def test_imtl_g_degenerate_rows():
    w, d = _run(create("imtl_g"), _J([[1.0, 2.0], [-2.0, -4.0]]))  # opposite: common projection 0
    _close(d, torch.zeros(2), 1e-12)
    w, d = _run(create("imtl_g"), _J([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]]))  # zero row: weight 0
    assert float(w[1]) == 0.0
    _close(w[[0, 2]], _imtl_g_paper(_J([[1.0, 2.0], [3.0, -1.0]])), 1e-9)


def test_imtl_first_step_is_imtl_g_then_scales_learn():
    J = _rand_J(3, 5, 21)
    L = torch.tensor([0.2, 1.0, 5.0], dtype=torch.float64)
    m = create("imtl", lr=1e-2)
    w, _ = _run(m, J, L)
    _close(w, _imtl_g_paper(J), 1e-7)  # s = 0: plain IMTL-G
    s = m.state_dict()["log_scales"]
    # first Adam step moves each s_t by lr against sign(e^0 L_t − 1)
    _close(s, -1e-2 * torch.sign(L - 1), 1e-9)
    # direction stays IMTL-G's; weights are α_t e^{s_t}
    w2, d2 = _run(m, J, L)
    _, d_g = _run(create("imtl_g"), J)
    _close(d2 / d2.norm(), d_g / d_g.norm(), 1e-8)
    # SGD on Σ e^s L − s converges to s = −log L (scaled losses equal to 1)
    m = create("imtl", lr=0.3, optimizer="sgd")
    for _ in range(300):
        _run(m, J, L)
    _close(torch.exp(m.state_dict()["log_scales"]) * L, torch.ones(3), 1e-6)


def test_imtl_state_round_trip_and_negative_losses():
    J = _rand_J(2, 3, 2)
    L = torch.tensor([0.3, 2.0], dtype=torch.float64)
    m = create("imtl", lr=0.05)
    for _ in range(3):
        _run(m, J, L)
    st = m.state_dict()
    a, _ = _run(m, J, L)
    m2 = create("imtl", lr=0.05)
    m2.load_state_dict(st)
    b, _ = _run(m2, J, L)
    _close(a, b, 0)
    _close(m.state_dict()["log_scales"], m2.state_dict()["log_scales"], 0)
    with pytest.raises(ConfigurationError, match="non-negative"):
        _run(create("imtl"), J, torch.tensor([-1.0, 0.5]))


# ------------------------------------------------------------------------------------------------
# Nash-MTL
# ------------------------------------------------------------------------------------------------
def test_nash_hand_value_and_max_norm():
    # orthogonal g1=(1,0), g2=(0,2): α1·1·α1 = 1, α2·4·α2 = 1 → α = (1, 1/2), d = (1, 1), ‖d‖ = √2
    J = _J([[1, 0], [0, 2]])
    w, d = _run(create("nash_mtl", max_norm=0.0), J)
    _close(w, [1.0, 0.5], 1e-6)
    m = create("nash_mtl")  # max_norm = 1 (official default) clips ‖d‖ to 1
    w, d = _run(m, J)
    _close(d, torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2), 1e-6)
    assert m.log_values()["clipped"] == 1.0


@pytest.mark.parametrize("T, P, seed", [(2, 4, 0), (3, 5, 1), (5, 8, 2), (5, 3, 3)])
def test_nash_solves_bargaining_equation(T, P, seed):
    J = _rand_J(T, P, 900 + seed, spread=2.0) + 0.5  # shifted: the gradients share a direction
    G = J @ J.T
    if min_norm_simplex((G / G.diagonal().sqrt().outer(G.diagonal().sqrt())).numpy()).value < 1e-6:
        pytest.skip("no bargaining solution for this draw")
    m = create("nash_mtl", max_norm=0.0)
    w, d = _run(m, J)
    # defining equation Gα = 1/α, i.e. α_t (g_t·d) = 1 for every task
    _close(w * (J @ d), torch.ones(T), 1e-5)
    assert bool((w > 0).all())
    # independent check: d maximises Σ log(g_t·d) on the sphere of radius ‖d‖
    obj = lambda x: -np.sum(np.log(np.clip(J.numpy() @ x, 1e-300, None)))  # noqa: E731
    r = float(d.norm())
    res = minimize(obj, d.numpy(), method="SLSQP",
                   constraints=[{"type": "eq", "fun": lambda x: x @ x - r * r}], options={"ftol": 1e-14})
    assert -obj(d.numpy()) >= -res.fun - 1e-6


def test_nash_update_every_k_reuses_weights_and_state_round_trip():
    J1 = _rand_J(3, 5, 1) + 1.0
    J2 = _rand_J(3, 5, 2) + 1.0
    m = create("nash_mtl", max_norm=0.0, update_weights_every=2)
    w1, _ = _run(m, J1)
    w2, _ = _run(m, J2)  # reused
    _close(w1, w2, 0)
    assert m.log_values()["solved"] == 0.0
    st = m.state_dict()
    w3, _ = _run(m, J2)  # solved again
    _close(w3 * (J2 @ (w3 @ J2)), torch.ones(3), 1e-5)
    m2 = create("nash_mtl", max_norm=0.0, update_weights_every=2)
    m2.load_state_dict(st)
    w3b, _ = _run(m2, J2)
    _close(w3, w3b, 1e-10)


def test_nash_missing_solver_raises_at_construction(monkeypatch):
    for mod in ("ecos", "cvxpy"):
        with monkeypatch.context() as mp:
            mp.setitem(sys.modules, mod, None)  # `import mod` now raises ImportError
            with pytest.raises(MissingDependencyError, match=r"pip install 'mtlens\[nash\]'"):
                create("nash_mtl")


def test_nash_solver_failure_is_raised_not_swallowed(monkeypatch):
    import cvxpy

    J = _rand_J(3, 4, 5) + 1.0
    m = create("nash_mtl", exact=False)  # the official CCP alone: its failure is an error, never weights of 1

    def boom(self, *a, **k):
        raise cvxpy.error.SolverError("Solver 'ECOS' failed.")

    monkeypatch.setattr(cvxpy.Problem, "solve", boom)
    with pytest.raises(SolverError, match="ECOS failed"):
        _run(m, J)
    # exact=True (default): the problem is solvable (0 is not in the hull), so Newton's method finishes it
    m = create("nash_mtl", max_norm=0.0)
    w, _ = _run(m, J)
    G = J @ J.T
    torch.testing.assert_close(G @ w, 1.0 / w, rtol=1e-8, atol=0.0)
    assert m.log_values()["ccp_failed"] == 1.0 and m.log_values()["newton"] == 1.0

    def infeasible(self, *a, **k):
        self._status = "infeasible"
        return float("inf")

    monkeypatch.setattr(cvxpy.Problem, "solve", infeasible)
    monkeypatch.setattr(cvxpy.Problem, "status", property(lambda self: "infeasible"))
    with pytest.raises(SolverError, match="infeasible"):
        _run(create("nash_mtl", exact=False), J)


def test_nash_no_solution_for_opposite_gradients_and_zero_rows_excluded():
    with pytest.raises(SolverError, match="no bargaining solution"):
        _run(create("nash_mtl"), _J([[1.0, 2.0], [-1.0, -2.0]]))
    w, d = _run(create("nash_mtl", max_norm=0.0), _J([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]))
    _close(w, [1.0, 0.0, 0.5], 1e-6)


# ------------------------------------------------------------------------------------------------
# Aligned-MTL
# ------------------------------------------------------------------------------------------------
def test_aligned_mtl_hand_value():
    # G = diag(1, 4): σ_min = 1, B = diag(1, 1/2), w = B·1 = (1, 1/2), d = (1, 1)
    w, d = _run(create("aligned_mtl"), _J([[1, 0], [0, 2]]))
    _close(w, [1.0, 0.5])
    _close(d, [1.0, 1.0])


@pytest.mark.parametrize("T, P, seed", [(2, 3, 0), (3, 6, 1), (5, 7, 2)])
def test_aligned_mtl_matches_svd_of_jacobian(T, P, seed):
    # Jᵀ = U Σ Vᵀ → aligned system σ_min U Vᵀ; update σ_min U Vᵀ ω (computed from J directly)
    J = _rand_J(T, P, 1100 + seed)
    omega = torch.linspace(0.5, 2.0, T, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(J.T, full_matrices=False)
    ref = S.min() * U @ Vh @ omega
    _, d = _run(create("aligned_mtl", task_weights=omega.tolist()), J)
    _close(d, ref, 1e-8)
    _, d_mean = _run(create("aligned_mtl", scale_mode="mean"), J)
    _close(d_mean, (S**2).mean().sqrt() * U @ Vh @ torch.ones(T, dtype=torch.float64), 1e-8)
    # the balance matrix B (recovered column by column from w = Bω, linear in ω) aligns the
    # system: every singular value of Jᵀ B equals σ_min (condition number 1)
    base, _ = _run(create("aligned_mtl"), J)
    B = torch.stack([_run(create("aligned_mtl", task_weights=(1.0 + torch.eye(T)[k]).tolist()), J)[0] - base
                     for k in range(T)], dim=1)
    _close(torch.linalg.svdvals(J.T @ B), S.min().expand(T), 1e-8)


def test_aligned_mtl_rank_deficient():
    # two identical rows + one other: rank 2; the dropped direction carries no gradient
    J = _J([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    m = create("aligned_mtl")
    w, d = _run(m, J)
    assert m.log_values()["rank"] == 2.0
    U, S, Vh = torch.linalg.svd(J.T, full_matrices=False)
    k = int((1e-10 * S.max() < S).sum())
    _close(d, S[:k].min() * U[:, :k] @ Vh[:k] @ torch.ones(3, dtype=torch.float64), 1e-8)
    _close(w[0], w[1])


# ------------------------------------------------------------------------------------------------
# T ≠ 3, degenerate inputs, engine integration
# ------------------------------------------------------------------------------------------------
def _families(T, P=6):
    J = _rand_J(T, P, 31 * T)
    yield "random", J
    yield "rank1", _rand_J(T, 1, 5).abs() @ _rand_J(1, P, 6)
    yield "tiny", J * 1e-10
    yield "huge", J * 1e10
    yield "zeros", torch.zeros(T, P, dtype=torch.float64)
    if T >= 2:
        Z = J.clone()
        Z[1] = 0
        yield "zero_row", Z
        Id = J.clone()
        Id[1] = Id[0]
        yield "identical", Id
        O = J.clone()
        O[1] = -O[0]
        yield "opposite", O


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1, 2, 5])
def test_degenerate_gramians_finite_or_loud(name, T):
    for fam, J in _families(T):
        m = create(name, seed=0) if name in ("pcgrad", "gradvac") else create(name)
        try:
            w = m.weights(J @ J.T, torch.rand(T, dtype=torch.float64) + 0.1)
        except SolverError:
            assert name == "nash_mtl" and fam in ("opposite",), fam
            continue
        except MTLensError as e:  # pragma: no cover - would be a failure with a clear message
            pytest.fail(f"{name} on {fam}: {e}")
        assert torch.isfinite(w).all(), (name, fam, w)
        assert all(math.isfinite(v) for v in m.log_values().values()), (name, fam)


class _Net(nn.Module):
    def __init__(self, T):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(T)])

    def forward(self, x):
        z = self.enc(x)
        return z, {f"t{i}": (h(z) ** 2).mean() + 0.1 for i, h in enumerate(self.heads)}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("level", ["param", "feature"])
def test_engine_uses_weights_on_gramian(name, level):
    torch.manual_seed(0)
    net = _Net(2 if level == "feature" else 5)
    x = torch.randn(8, 4)
    z, losses = net(x)
    m = create(name, seed=0) if name in ("pcgrad", "gradvac") else create(name)
    rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=m, level=level)
    assert rec.weights is not None and torch.isfinite(rec.weights).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
