"""Unit tests of fairgrad, upgrad, dualproj, config, rgw, db_mtl, moco, graddrop and cosreg.

Each method is checked against its defining equations, computed independently here (KKT
conditions, the paper's formula on J itself, manual recursions), plus its documented edge cases
and hyper-parameter validation. Shared properties (finiteness on degenerate matrices,
non-conflict, task-order invariance, state round-trip, scale) live in
test_aggregator_properties.py.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from _matrices import make_jacobian
from torch import nn

from mtlens.engine import mtl_backward
from mtlens.errors import ConfigurationError, MissingDependencyError, NonFiniteError, ShapeError, SolverError
from mtlens.methods import create, defaults
from mtlens.methods._qp import dual_cone_weights
from mtlens.methods.moco import project_simplex

F64 = torch.float64


def upd(method, J, losses=None):
    T = J.shape[0]
    losses = torch.ones(T, dtype=F64) if losses is None else losses
    return torch.as_tensor(method.weights(J @ J.T, losses), dtype=F64) @ J


# ---- hyper-parameter validation ----------------------------------------------------------------
BAD_HPARAMS = [
    ("upgrad", {"reg_eps": -1.0}), ("upgrad", {"solver": "cvx"}), ("upgrad", {"pref_vector": [1.0, -1.0]}),
    ("upgrad", {"solver": "quadprog", "reg_eps": 0.0}), ("dualproj", {"pref_vector": []}),
    ("dualproj", {"reg_eps": 2.0}), ("config", {"rcond": -1e-3}), ("config", {"pref_vector": [0.0, 0.0]}),
    ("fairgrad", {"alpha": 0.0}), ("fairgrad", {"alpha": float("nan")}), ("fairgrad", {"max_nfev": 0}),
    ("fairgrad", {"infeasible": "ignore"}), ("fairgrad", {"residual_tol": -1.0}), ("rgw", {"seed": -3}),
    ("rgw", {"seed": 1.5}), ("db_mtl", {"beta": 1.0}), ("db_mtl", {"beta": -0.1}),
    ("db_mtl", {"beta_sigma": -1.0}), ("moco", {"beta": 0.0}), ("moco", {"gamma": 0.0}),
    ("moco", {"rho": -1.0}),
    ("moco", {"normalize": "max"}), ("moco", {"gamma_sigma": -0.5}), ("graddrop", {"leak": 1.5}),
    ("graddrop", {"leak": [0.1, -0.1]}), ("graddrop", {"seed": "a"}), ("graddrop", {"batch_reduce": 1}),
    ("cosreg", {"lam": -1.0}), ("cosreg", {"level": "layer"}),
]


@pytest.mark.parametrize("name,hp", BAD_HPARAMS, ids=[f"{n}-{list(h)[0]}" for n, h in BAD_HPARAMS])
def test_invalid_hyper_parameters_raise(name, hp):
    with pytest.raises(ConfigurationError, match=name):
        create(name, **hp)


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "config", "fairgrad", "rgw", "db_mtl", "moco",
                                  "graddrop", "cosreg"])
def test_docstring_names_paper_and_defaults(name):
    m = create(name)
    doc = type(m).__doc__
    assert "arXiv" in doc and "default" in doc.lower()
    assert type(m).reference and "arXiv" in type(m).reference
    assert set(m.hparams()) == set(defaults(name))  # every constructor argument is reported


# ---- the dual-cone QP ----------------------------------------------------------------------------
def _kkt(G, u, v, tol):
    """v = argmin_{v ≥ u} vᵀGv ⇔ v ≥ u, μ = G v ≥ 0, μ ⊙ (v − u) = 0."""
    mu = G @ v
    scale = np.abs(G).max() * max(1.0, np.abs(v).max())
    assert (v - u >= -1e-12).all()
    assert (mu >= -tol * scale).all(), mu
    assert (np.abs(mu * (v - u)) <= tol * scale * max(1.0, np.abs(v).max())).all()


@pytest.mark.parametrize("solver", ["nnls", "quadprog"])
@pytest.mark.parametrize("family,T", [("typical", 3), ("typical", 11), ("rank_deficient", 11),
                                      ("opposite_rows", 3), ("zero_rows", 11), ("identical_rows", 3),
                                      ("tiny", 11), ("huge", 11)])
def test_dual_cone_weights_satisfy_kkt(solver, family, T):
    J = make_jacobian(family, T)
    G = (J @ J.T).numpy()
    U = np.vstack([np.eye(T), np.full((1, T), 1.0 / T)])
    try:
        V = dual_cone_weights(G, U, reg_eps=1e-12, solver=solver)
    except MissingDependencyError:
        pytest.skip("quadprog not installed")
    Gn = G / np.trace(G)
    for u, v in zip(U, V):
        _kkt(Gn, u, v, tol=1e-8)


def test_dual_cone_against_slsqp():
    from scipy.optimize import minimize

    J = make_jacobian("typical", 5)
    G = (J @ J.T).numpy()
    V = dual_cone_weights(G, np.eye(5), reg_eps=0.0)
    for i in range(5):
        u = np.eye(5)[i]
        res = minimize(lambda v: v @ G @ v, u + 1.0, jac=lambda v: 2 * G @ v, bounds=[(x, None) for x in u],
                       method="SLSQP", options={"ftol": 1e-15, "maxiter": 500})
        np.testing.assert_allclose(J.numpy().T @ V[i], J.numpy().T @ res.x, rtol=1e-5, atol=1e-7)


def test_upgrad_and_dualproj_are_the_mean_without_conflict():
    g = torch.Generator().manual_seed(0)
    J = torch.rand(4, 9, generator=g, dtype=F64)  # all entries positive: G ≥ 0, no conflict
    mean = J.mean(0)
    torch.testing.assert_close(upd(create("upgrad"), J), mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(upd(create("dualproj"), J), mean, rtol=1e-10, atol=1e-12)


def test_upgrad_is_mean_of_projected_rows():
    J = make_jacobian("typical", 4)
    G = (J @ J.T).numpy()
    V = dual_cone_weights(G, np.eye(4), reg_eps=1e-12)
    projections = torch.as_tensor(V) @ J  # row i: π_J(g_i)
    torch.testing.assert_close(upd(create("upgrad"), J), projections.mean(0), rtol=1e-10, atol=1e-12)
    # each projection is in the dual cone and no farther from g_i than needed (it is g_i if g_i is)
    assert bool((J @ projections.T >= -1e-9).all())


def test_upgrad_nnls_and_quadprog_agree():
    pytest.importorskip("qpsolvers")
    for family, T in [("typical", 11), ("rank_deficient", 11), ("zero_rows", 3)]:
        J = make_jacobian(family, T)
        a = upd(create("upgrad"), J)
        b = upd(create("upgrad", solver="quadprog"), J)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9 * float(J.norm()))


def test_missing_quadprog_raises_at_construction(monkeypatch):
    monkeypatch.setitem(sys.modules, "qpsolvers", None)
    with pytest.raises(MissingDependencyError, match=r"mtlens\[qp\]"):
        create("upgrad", solver="quadprog")
    with pytest.raises(MissingDependencyError, match=r"mtlens\[qp\]"):
        create("dualproj", solver="quadprog")
    create("upgrad")  # the default solver needs only scipy


def test_projection_solver_failures_are_loud():
    G = torch.eye(3, dtype=F64)
    G[0, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite"):  # the one Gramian validation (engine.numerics)
        create("upgrad").weights(G, torch.ones(3))
    with pytest.raises(ShapeError, match="pref_vector"):
        create("dualproj", pref_vector=[1.0, 1.0]).weights(torch.eye(3, dtype=F64), torch.ones(3))
    with pytest.raises(ShapeError):
        create("upgrad").weights(torch.ones(2, 3, dtype=F64), torch.ones(2))


def test_all_zero_jacobian_keeps_preference_weights():
    G = torch.zeros(3, 3, dtype=F64)
    torch.testing.assert_close(create("upgrad").weights(G, None), torch.full((3,), 1 / 3, dtype=F64))
    torch.testing.assert_close(create("dualproj", pref_vector=[1, 2, 3]).weights(G, None),
                               torch.tensor([1.0, 2.0, 3.0], dtype=F64))


# ---- ConFIG --------------------------------------------------------------------------------------
def _config_reference(J):
    """Eq. 2 of the ConFIG paper on J itself: unit rows, pseudo-inverse, sum of projections."""
    units = J / J.norm(dim=1, keepdim=True)
    direction = torch.linalg.pinv(units) @ torch.ones(J.shape[0], dtype=F64)
    u = direction / direction.norm()
    return (J @ u).sum() * u


@pytest.mark.parametrize("T", [1, 2, 3, 11, 40])
def test_config_matches_the_papers_formula(T):
    J = make_jacobian("typical", T)
    d = upd(create("config"), J)
    torch.testing.assert_close(d, _config_reference(J), rtol=1e-9, atol=1e-12)
    # every unit gradient has the same projection on d: the "conflict-free" property
    proj = (J / J.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(proj, proj.mean().expand(T), rtol=1e-9, atol=0.0)


def test_config_opposite_gradients_give_no_update_and_log_it():
    g = torch.randn(1, 8, dtype=F64)
    J = torch.cat([g, -g])
    m = create("config")
    w = m.weights(J @ J.T, None)
    assert float((w @ J).norm()) == 0.0
    assert m.log_values()["config/degenerate"] == 1.0
    m.weights(make_jacobian("typical", 3) @ make_jacobian("typical", 3).T, None)
    assert m.log_values()["config/degenerate"] == 0.0


def test_config_zero_row_gets_zero_weight_and_others_keep_formula():
    J = make_jacobian("typical", 4)
    J[2] = 0.0
    d = upd(create("config"), J)
    live = J[[0, 1, 3]]
    torch.testing.assert_close(d, _config_reference(live), rtol=1e-9, atol=1e-12)


# ---- FairGrad -----------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("family,T", [("typical", 2), ("typical", 11), ("identical_rows", 3), ("tiny", 11),
                                      ("huge", 11)])
def test_fairgrad_solves_the_alpha_fair_condition(alpha, family, T):
    J = make_jacobian(family, T)
    G = J @ J.T
    w = create("fairgrad", alpha=alpha).weights(G, None)
    assert bool((w > 0).all())
    torch.testing.assert_close(G @ w, w ** (-1.0 / alpha), rtol=1e-8, atol=0.0)
    # g_tᵀd = w_t^{-1/α} > 0: every task improves (FairGrad's utilities)
    assert bool(((J @ (w @ J)) > 0).all())


def test_fairgrad_update_norm_for_alpha_one_is_sqrt_T():
    for scale in (1e-10, 1.0, 1e10):
        J = make_jacobian("typical", 5) * scale
        d = upd(create("fairgrad"), J)
        assert abs(float(d.norm()) - 5**0.5) < 1e-8  # ‖d‖² = Σ_t w_t (Gw)_t = T


def test_fairgrad_zero_gradient_task_is_left_out_and_logged():
    J = make_jacobian("typical", 4)
    J[1] = 0.0
    m = create("fairgrad")
    w = m.weights(J @ J.T, None)
    assert float(w[1]) == 0.0
    live = [0, 2, 3]
    w_live = create("fairgrad").weights(J[live] @ J[live].T, None)
    torch.testing.assert_close(w[live], w_live, rtol=1e-10, atol=0.0)
    assert m.log_values()["fairgrad/inactive_tasks"] == 1.0
    assert float(create("fairgrad").weights(torch.zeros(2, 2, dtype=F64), None).sum()) == 2.0


def test_fairgrad_infeasible_raises_or_returns_least_squares_point():
    g = torch.randn(1, 6, dtype=F64)
    J = torch.cat([g, -g, torch.randn(1, 6, dtype=F64)])
    with pytest.raises(SolverError, match="infeasible: no positive solution"):
        create("fairgrad").weights(J @ J.T, None)
    m = create("fairgrad", infeasible="least_squares")
    w = m.weights(J @ J.T, None)
    assert bool(torch.isfinite(w).all())
    assert m.log_values()["fairgrad/residual"] > 1e-6


# ---- RGW ----------------------------------------------------------------------------------------
def test_rgw_weights_are_softmax_of_normals():
    m = create("rgw", seed=5)
    G = torch.eye(4, dtype=F64)
    draws = torch.stack([m.weights(G, None) for _ in range(2000)])
    assert bool((draws > 0).all())
    torch.testing.assert_close(draws.sum(1), torch.ones(2000, dtype=F64))
    assert abs(float(draws.mean()) - 0.25) < 0.01  # exchangeable: E[w_t] = 1/T
    g = torch.Generator().manual_seed(5)
    expected = torch.softmax(torch.randn(4, generator=g, dtype=F64), 0)
    torch.testing.assert_close(create("rgw", seed=5).weights(G, None), expected)
    assert not torch.allclose(create("rgw", seed=6).weights(G, None), expected)


# ---- DB-MTL -------------------------------------------------------------------------------------
def test_db_mtl_recursion_by_hand():
    beta, beta_sigma = 0.9, 0.9
    m = create("db_mtl")
    g = torch.Generator().manual_seed(1)
    ema = torch.zeros(3, 10, dtype=F64)
    for k in range(1, 5):
        J = torch.randn(3, 10, generator=g, dtype=F64) * torch.tensor([[0.1], [1.0], [10.0]], dtype=F64)
        bk = beta / k**beta_sigma
        ema = bk * ema + (1 - bk) * J
        n = ema.norm(dim=1)
        expected = ((n.max() / n)[:, None] * ema).sum(0)
        blocks = [J[:, :4].reshape(3, 2, 2), J[:, 4:]]  # two parameter blocks
        combined, head_w = m.aggregate(blocks, torch.ones(3, dtype=F64))
        got = torch.cat([combined[0].reshape(-1), combined[1]])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(m.last_weights, n.max() / n)
        assert head_w.tolist() == [1.0, 1.0, 1.0]


def test_db_mtl_shapes_are_fixed_until_reset():
    m = create("db_mtl")
    m.aggregate([torch.randn(2, 5, dtype=F64)], torch.ones(2))
    with pytest.raises(ShapeError, match="reset"):
        m.aggregate([torch.randn(2, 6, dtype=F64)], torch.ones(2))
    m.reset()
    m.aggregate([torch.randn(2, 6, dtype=F64)], torch.ones(2))


def test_db_mtl_engine_applies_the_log_transform():
    torch.manual_seed(0)
    enc, heads = nn.Linear(4, 3), nn.ModuleList([nn.Linear(3, 1) for _ in range(2)])
    z = enc(torch.randn(6, 4))
    losses = {f"t{i}": (h(z) ** 2).mean() + 0.5 for i, h in enumerate(heads)}
    raw = torch.stack([v.detach() for v in losses.values()])
    rec = mtl_backward(losses, features=z, shared_params=enc.parameters(), method=create("db_mtl"))
    torch.testing.assert_close(rec.objective_losses, torch.log(raw + 1e-8))


# ---- MoCo ---------------------------------------------------------------------------------------
def test_project_simplex():
    torch.testing.assert_close(project_simplex(torch.tensor([2.0, 0.0], dtype=F64)),
                               torch.tensor([1.0, 0.0], dtype=F64))
    torch.testing.assert_close(project_simplex(torch.tensor([0.3, 0.2, 0.1], dtype=F64)),
                               torch.tensor([0.3, 0.2, 0.1], dtype=F64) + 0.4 / 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = torch.randn(5, generator=g, dtype=F64) * 2
        x = project_simplex(v)
        assert abs(float(x.sum()) - 1) < 1e-12 and bool((x >= 0).all())
        # optimality: no random simplex point is closer to v
        others = torch.distributions.Dirichlet(torch.ones(5, dtype=F64)).sample((200,))
        assert float((x - v).norm()) <= float((others - v).norm(dim=1).min()) + 1e-12


@pytest.mark.parametrize("normalize", ["none", "l2", "loss"])
def test_moco_recursion_by_hand(normalize):
    hp = {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "rho": 0.2}
    m = create("moco", normalize=normalize, **hp)
    g = torch.Generator().manual_seed(2)
    y = torch.zeros(3, 7, dtype=F64)
    lam = torch.full((3,), 1 / 3, dtype=F64)
    for k in range(1, 4):
        J = torch.randn(3, 7, generator=g, dtype=F64)
        L = torch.rand(3, generator=g, dtype=F64) + 0.5
        h = J
        if normalize != "none":
            h = J / J.norm(dim=1, keepdim=True)
            if normalize == "loss":
                h = h * L[:, None]
        y = y - hp["beta"] / k ** hp["beta_sigma"] * (y - h)
        lam = project_simplex(lam - hp["gamma"] / k ** hp["gamma_sigma"] * (y @ y.T @ lam + hp["rho"] * lam))
        (d,), head_w = m.aggregate([J], L)
        torch.testing.assert_close(d, lam @ y, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(head_w, torch.ones(3, dtype=F64))  # head rule: unit weights (LibMTL)
        torch.testing.assert_close(m.last_weights, lam)


def test_moco_loss_normalisation_needs_nonnegative_losses():
    with pytest.raises(ConfigurationError, match="non-negative"):
        create("moco").aggregate([torch.randn(2, 4, dtype=F64)], torch.tensor([1.0, -0.5], dtype=F64))
    m = create("moco")
    m.aggregate([torch.randn(2, 4, dtype=F64)], torch.ones(2, dtype=F64))
    with pytest.raises(ShapeError):
        m.aggregate([torch.randn(2, 5, dtype=F64)], torch.ones(2, dtype=F64))


# ---- GradDrop -----------------------------------------------------------------------------------
def test_graddrop_keeps_everything_without_sign_conflict():
    S = torch.rand(3, 4, 5, dtype=F64)  # every entry positive for every task: P = 1
    (d,), head_w = create("graddrop", seed=0).aggregate([S], torch.ones(3))
    torch.testing.assert_close(d, S.sum(0))
    assert head_w.tolist() == [1.0, 1.0, 1.0]
    (d,), _ = create("graddrop", seed=0, leak=1.0).aggregate([torch.randn(3, 4, 5, dtype=F64)], torch.ones(3))
    assert bool(torch.isfinite(d).all())


def test_graddrop_keeps_the_positive_sign_with_probability_P():
    n = 20000
    S = torch.stack([torch.full((n,), 3.0, dtype=F64), torch.full((n,), -1.0, dtype=F64)])  # P = 0.75
    (d,), _ = create("graddrop", seed=1).aggregate([S], torch.ones(2))
    kept_pos = float((d == 3.0).to(F64).mean())
    assert set(d.unique().tolist()) <= {3.0, -1.0}
    assert abs(kept_pos - 0.75) < 0.02


def test_graddrop_is_feature_level_only():
    m = create("graddrop")
    assert type(m).levels == ("feature",)
    with pytest.raises(ConfigurationError, match="representation"):
        m.aggregate([torch.randn(2, 3, dtype=F64), torch.randn(2, 4, dtype=F64)], torch.ones(2))
    enc, head = nn.Linear(3, 4), nn.Linear(4, 1)
    z = enc(torch.randn(5, 3))
    losses = [head(z).mean(), (head(z) ** 2).mean()]
    with pytest.raises(ConfigurationError, match="feature"):
        mtl_backward(losses, features=z, shared_params=enc.parameters(), method=m, level="param")


def test_graddrop_batch_reduced_masks_use_activation_signs():
    g = torch.Generator().manual_seed(4)
    S = torch.randn(2, 6, 5, generator=g, dtype=F64)
    Z = torch.randn(6, 5, generator=g, dtype=F64)
    with pytest.raises(ConfigurationError, match="features"):
        create("graddrop", batch_reduce=True).aggregate([S], torch.ones(2))
    (d,), _ = create("graddrop", batch_reduce=True, seed=3).aggregate([S], torch.ones(2), features=Z)
    # one mask per (task, feature) shared by the batch: d = Σ_t M_t[None, :] ⊙ S_t
    Gi = (S * Z.sign()).sum(1)
    Pp = 0.5 * (1 + Gi.sum(0) / Gi.abs().sum(0))
    U = torch.rand(1, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    M = ((Pp > U) & (Gi > 0)) | ((Pp < U) & (Gi < 0))
    torch.testing.assert_close(d, (M[:, None, :].to(F64) * S).sum(0))


# ---- CosReg -------------------------------------------------------------------------------------
def test_cosreg_value_and_zero_gradient_task():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(4, 12, generator=g, dtype=F64)
    C = torch.nn.functional.normalize(J, dim=1) @ torch.nn.functional.normalize(J, dim=1).T
    expected = 0.7 * (C.triu(1) ** 2).sum()
    val, logged = create("cosreg", lam=0.7).loss([J[:, :5], J[:, 5:].reshape(4, 7, 1)], torch.ones(4))
    torch.testing.assert_close(val, expected)
    assert abs(logged["cos2_mean"] - float((C.triu(1) ** 2).sum() / 6)) < 1e-12
    J0 = J.clone().requires_grad_(True)
    with torch.no_grad():
        J0[2] = 0.0
    val, _ = create("cosreg").loss([J0], torch.ones(4))
    (grad,) = torch.autograd.grad(val, J0)
    assert bool(torch.isfinite(val)) and bool(torch.isfinite(grad).all())
    one, _ = create("cosreg").loss([torch.randn(1, 5, dtype=F64)], torch.ones(1))
    assert float(one) == 0.0


def test_cosreg_level_sets_uses():
    assert create("cosreg").uses == "param"
    assert create("cosreg", level="feature").uses == "saliency"


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        self.heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(3)])

    def forward(self, x):
        z = self.enc(x)
        return z, [((h(z) - 1) ** 2).mean() for h in self.heads]


@pytest.mark.parametrize("level", ["param", "feature"])
def test_cosreg_gradient_trains_through_the_engine(level):
    """The engine's gradient with CosReg = autograd of Σ L_t + λ Σ_{i<j} cos²(g_i, g_j) (second order)."""
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(8, 4)
    lam = 3.0
    z, losses = net(x)
    wrt = list(net.enc.parameters()) if level == "param" else [z]
    rows = []
    for L in losses:
        gs = torch.autograd.grad(L, wrt, create_graph=True)
        rows.append(torch.cat([q.reshape(-1) for q in gs]))
    U = torch.nn.functional.normalize(torch.stack(rows), dim=1)
    C = U @ U.T
    total = sum(losses) + lam * (C.triu(1) ** 2).sum()
    ref = torch.autograd.grad(total, list(net.parameters()))

    z, losses = net(x)
    rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("ew"),
                       regularizers=[create("cosreg", lam=lam, level=level)])
    for p, r in zip(net.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-6)
    assert rec.regularizer_values["cosreg/total"] > 0
    # the penalty's own gradient is not zero: it does train the encoder
    net.zero_grad(set_to_none=True)
    z, losses = net(x)
    mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=create("ew"))
    assert any(not torch.allclose(p.grad, r) for p, r in zip(net.enc.parameters(), ref))


@pytest.mark.parametrize("name", ["db_mtl", "moco"])
def test_stateful_trackers_refuse_the_feature_level(name):
    """EMAs of representation gradients would average unrelated samples: parameter level only."""
    enc, head = nn.Linear(3, 4), nn.Linear(4, 1)
    z = enc(torch.randn(5, 3))
    losses = [(head(z) ** 2).mean() + 0.1, (head(z) - 1).pow(2).mean()]
    with pytest.raises(ConfigurationError, match="param"):
        mtl_backward(losses, features=z, shared_params=enc.parameters(), method=create(name), level="feature")
