"""The 2023–2026 methods: SI, NTKMTL(-SR), GO4Align, PCD, CR-MOGM, PIVRG, SDMGrad, MoDo.

Agreement on fixed inputs with the library that has them (TorchJD 0.18: PCD, CR-MOGM,
SDMGrad, MoDo), with the authors' formulas transcribed from their code (NTKMTL, PIVRG,
GO4Align; github.com/jianke0604/NTKMTL ``methods/weight_methods.py`` and
``methods/cluster_methods.py``), hand-computed golden values, the second-batch capability and
the cross-Gramian.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _matrices import make_jacobian
from torch import nn

from mtlens.engine import cross_gramian, mtl_backward
from mtlens.errors import ConfigurationError, NonFiniteError, ShapeError
from mtlens.methods import available, create, describe

NEW = ["si", "ntkmtl", "ntkmtl_sr", "go4align", "pcd", "cr_mogm", "pivrg", "sdmgrad", "modo"]


def test_registered_and_counted():
    assert set(NEW) <= set(available())
    assert len(available()) >= 37
    rows = {r["name"]: r for r in describe()}
    assert rows["sdmgrad"]["needs_second_batch"] and rows["modo"]["needs_second_batch"]
    assert not rows["ntkmtl"]["needs_second_batch"]
    assert rows["si"]["loss_transform"] == "log"


# -- SI ---------------------------------------------------------------------------------------
def test_si_is_equal_weights_on_log_losses():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    losses = {"a": 3.0 * w[0] ** 2, "b": 100.0 * w[1] ** 2}
    rec = mtl_backward(losses, method=create("si"))
    # ∇ log L_t = ∇L_t / L_t: 2/w for both tasks, whatever their scales (3 and 100)
    torch.testing.assert_close(w.grad, torch.tensor([2.0 / 1.0, 2.0 / 2.0]), rtol=1e-6, atol=0)
    assert rec.weights.tolist() == [1.0, 1.0]


# -- NTKMTL -----------------------------------------------------------------------------------
def _ntkmtl_official(J: torch.Tensor, ntk_exp: float, max_norm: float) -> torch.Tensor:
    """The authors' ``ntkgrad`` + ``overwrite_grad`` (×T) + ``clip_grad_norm_``, transcribed."""
    grads = J.T  # (P, T), their layout
    GTG = grads.t().mm(grads)
    w = torch.pow(torch.trace(GTG) / GTG.diagonal(), ntk_exp)
    g = (grads @ w) * J.shape[0]
    if max_norm > 0 and g.norm() > max_norm:
        g = g * (max_norm / g.norm())
    return g


@pytest.mark.parametrize("T", [2, 3, 11])
@pytest.mark.parametrize("ntk_exp,max_norm", [(0.5, 1.0), (0.75, 0.0), (0.5, 1e6)])
def test_ntkmtl_matches_authors_code(T, ntk_exp, max_norm):
    J = make_jacobian("typical", T)
    m = create("ntkmtl", ntk_exp=ntk_exp, max_norm=max_norm)
    d = m.weights(J @ J.T, torch.ones(T, dtype=torch.float64)) @ J
    torch.testing.assert_close(d, _ntkmtl_official(J, ntk_exp, max_norm), rtol=1e-10, atol=0)
    assert m.head_weights(torch.zeros(T)).tolist() == [1.0] * T


def test_ntkmtl_golden_and_scale_without_clipping():
    G = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    w = create("ntkmtl", max_norm=0).weights(G, torch.ones(2))
    torch.testing.assert_close(w, 2 * torch.tensor([5.0 ** 0.5, (5 / 4) ** 0.5], dtype=torch.float64))
    J = make_jacobian("typical", 3)
    m = create("ntkmtl", max_norm=0)
    d1 = m.weights(J @ J.T, torch.ones(3)) @ J
    d2 = m.weights(1e10 * (J @ J.T), torch.ones(3)) @ (1e5 * J)
    torch.testing.assert_close(d2 / 1e5, d1, rtol=1e-9, atol=0)
    # a zero-gradient task gets weight 0, not inf
    J[1] = 0
    assert create("ntkmtl").weights(J @ J.T, torch.ones(3))[1] == 0


def test_ntkmtl_sr_sub_batch_ntk():
    """λ_t = max over chunks of (B/B_j)² ‖S_t[chunk j]‖² (the diagonal sub-batch NTK), weights (Σλ/λ_t)^e."""
    g = torch.Generator().manual_seed(0)
    S = torch.randn(2, 8, 3, generator=g, dtype=torch.float64)
    m = create("ntkmtl_sr", n_sub=4, ntk_exp=0.5)
    (comb,), w = m.aggregate([S], torch.ones(2))
    lam = torch.stack([max(16.0 * S[t, 2 * j:2 * j + 2].pow(2).sum() for j in range(4)) for t in range(2)])
    want = (lam.sum() / lam) ** 0.5
    torch.testing.assert_close(w, want)
    torch.testing.assert_close(comb, want[0] * S[0] + want[1] * S[1])
    # the same from explicit sub-batch losses: L^(j) = mean over chunk j of per-sample losses
    z = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, dtype=torch.float64)
    per_sample = (z @ a) ** 2
    full = torch.autograd.grad(per_sample.mean(), z, retain_graph=True)[0]
    sub = [torch.autograd.grad(c.mean(), z, retain_graph=True)[0] for c in per_sample.chunk(4)]
    lam_explicit = max(float(s.pow(2).sum()) for s in sub)
    m1 = create("ntkmtl_sr", n_sub=4)
    m1.aggregate([full.unsqueeze(0).repeat(2, 1, 1)], torch.ones(2))
    lam_ours = max(16.0 * float(full[2 * j:2 * j + 2].pow(2).sum()) for j in range(4))
    assert lam_ours == pytest.approx(lam_explicit, rel=1e-12)
    with pytest.raises(ShapeError, match="n_sub"):
        create("ntkmtl_sr", n_sub=16).aggregate([S], torch.ones(2))
    with pytest.raises(ConfigurationError, match="feature"):
        create("ntkmtl_sr").aggregate([S, S], torch.ones(2))


# -- GO4Align ---------------------------------------------------------------------------------
def _go4align_official(loss_seq, num_groups, eta):
    """The authors' GO4ALIGN.get_weighted_loss (their local k-means replaced by sklearn with many restarts)."""
    from sklearn.cluster import KMeans

    T = len(loss_seq[0])
    p = np.full(T, 1.0 / T)
    out = []
    for L in loss_seq:
        L = np.asarray(L, dtype=np.float64)
        scale = L.sum() / L
        p = p * np.exp(-eta * L)
        p = p / p.sum()
        w = scale * p
        km = KMeans(n_clusters=num_groups, random_state=42, n_init=50).fit(w[:, None])
        out.append((km.cluster_centers_[km.labels_, 0], km.inertia_, w))
    return out


def test_go4align_matches_authors_code():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(3)
    seq = [rng.uniform(0.05, 3.0, size=7) for _ in range(5)]
    m = create("go4align", num_groups=3, robust_step_size=0.5)
    for L, (want, inertia, gamma) in zip(seq, _go4align_official(seq, 3, 0.5)):
        w = m.weights(torch.tensor(L)).numpy()
        ours = float(((gamma - w) ** 2).sum())
        assert ours <= inertia * (1 + 1e-9)  # exact 1-D k-means: never worse than sklearn
        if abs(ours - inertia) <= 1e-12 * max(inertia, 1e-300):
            np.testing.assert_allclose(w, want, rtol=1e-9)


def test_go4align_golden_one_group_and_few_tasks():
    m = create("go4align", num_groups=1, robust_step_size=1.0)
    L = torch.tensor([1.0, 3.0], dtype=torch.float64)
    p = np.array([0.5, 0.5]) * np.exp(-np.array([1.0, 3.0]))
    p /= p.sum()
    gamma = np.array([4.0, 4.0 / 3.0]) * p
    torch.testing.assert_close(m.weights(L), torch.tensor([gamma.mean()] * 2, dtype=torch.float64))
    # 2 tasks, 5 groups: each task is its own group (γ unchanged)
    m5 = create("go4align", num_groups=5, robust_step_size=1.0)
    torch.testing.assert_close(m5.weights(L), torch.tensor(gamma, dtype=torch.float64))
    with pytest.raises(NonFiniteError, match="positive"):
        create("go4align").weights(torch.tensor([1.0, 0.0]))
    with pytest.raises(ConfigurationError):
        create("go4align", num_groups=0)


def test_go4align_state_round_trip():
    a = create("go4align", num_groups=2)
    for k in range(3):
        a.weights(torch.tensor([1.0 + k, 2.0, 0.5]))
    b = create("go4align", num_groups=2)
    b.load_state_dict(a.state_dict())
    L = torch.tensor([0.7, 1.1, 2.0])
    torch.testing.assert_close(a.weights(L), b.weights(L))


# -- TorchJD agreement: PCD, CR-MOGM, SDMGrad, MoDo -------------------------------------------
A = pytest.importorskip("torchjd.aggregation")

PCD_CASES = [("typical", 2), ("typical", 3), ("typical", 11), ("typical", 40), ("opposite_rows", 3),
             ("rank_deficient", 11), ("zero_rows", 11), ("rank1", 3), ("identical_rows", 3)]


@pytest.mark.parametrize("family,T", PCD_CASES)
def test_pcd_agrees_with_torchjd(family, T):
    ours, theirs = create("pcd"), A.PCD()
    for step in range(4):  # the EMA of squared norms carries over
        J = make_jacobian(family, T, seed=step)
        d = ours.weights(J @ J.T, torch.ones(T, dtype=torch.float64)) @ J
        e = theirs(J)
        assert float((d - e).norm()) <= 1e-9 * max(float(e.norm()), float(J.norm(dim=1).max())), (family, T, step)


def test_pcd_vector_tau_and_infeasible_modes():
    J = make_jacobian("typical", 3)
    tau = [0.1, 0.5]
    d = create("pcd", tau=tau).weights(J @ J.T, torch.ones(3)) @ J
    torch.testing.assert_close(d, A.PCD(tau=torch.tensor(tau, dtype=torch.float64))(J), rtol=1e-9, atol=0)
    # two exactly opposite secondaries with τ > 0 cannot both progress
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    m = create("pcd", tau=0.5)
    d = m.weights(J @ J.T, torch.ones(3)) @ J
    torch.testing.assert_close(d, J[0])
    assert m.log_values()["pcd/infeasible"] == 1.0
    from mtlens.errors import SolverError
    with pytest.raises(SolverError, match="priority constraints"):
        create("pcd", tau=0.5, infeasible="raise").weights(J @ J.T, torch.ones(3))
    with pytest.raises(ShapeError, match="tau"):
        create("pcd", tau=[0.1]).weights(J @ J.T, torch.ones(3))


def test_pcd_guarantees_progress_on_secondaries():
    """The constraint g̃_jᵀd̃ ≥ τ‖g̃_j‖² with τ > 0 makes every secondary task's directional
    derivative along d positive whenever the QP is feasible."""
    for T in (3, 11):
        J = make_jacobian("typical", T, seed=5)
        m = create("pcd", tau=0.2)
        d = m.weights(J @ J.T, torch.ones(T)) @ J
        if m.log_values()["pcd/infeasible"] == 0.0:
            assert bool(((J[1:] @ d) > 0).all())


@pytest.mark.parametrize("base,kw,factory", [
    ("upgrad", {"reg_eps": 1e-4, "ridge": "trace"}, lambda: A.UPGradWeighting()),
    ("imtl_g", {}, lambda: A.IMTLGWeighting()),
    ("mgda", {}, None),
])
def test_cr_mogm_agrees_with_torchjd(base, kw, factory):
    ours = create("cr_mogm", base=base, base_kwargs=kw, alpha=0.7)
    ref_base = create(base, **kw)
    theirs = A.GramianWeightedAggregator(A.CRMOGMWeighting(factory(), alpha=0.7)) if factory else None
    lam = None
    for step in range(5):
        J = make_jacobian("typical", 3, seed=step)
        w = ours.weights(J @ J.T, torch.ones(3))
        hat = ref_base.weights(J @ J.T, torch.ones(3))
        lam = hat if lam is None else 0.7 * lam + 0.3 * hat  # the paper's recursion, λ_0 = λ̂_1
        torch.testing.assert_close(w, lam, rtol=1e-10, atol=1e-14)
        if theirs is not None:
            torch.testing.assert_close(w @ J, theirs(J), rtol=1e-8, atol=1e-12)


def test_cr_mogm_errors_and_state():
    with pytest.raises(ConfigurationError, match="Gramian weighting"):
        create("cr_mogm", base="ew")
    with pytest.raises(ConfigurationError, match="Gramian weighting"):
        create("cr_mogm", base="graddrop")
    with pytest.raises(ConfigurationError, match="Gramian weighting"):
        create("cr_mogm", base="cr_mogm")
    with pytest.raises(ConfigurationError):
        create("cr_mogm", alpha=1.5)
    J = make_jacobian("typical", 3)
    m = create("cr_mogm", initial_weights=[1.0, 0.0, 0.0], alpha=0.5)
    hat = create("mgda").weights(J @ J.T, torch.ones(3))
    torch.testing.assert_close(m.weights(J @ J.T, torch.ones(3)),
                               0.5 * torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) + 0.5 * hat)


def _cross_cases(seed=0, T=3, P=15, n=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        J1 = torch.randn(T, P, generator=g, dtype=torch.float64)
        J2 = J1 + 0.5 * torch.randn(T, P, generator=g, dtype=torch.float64)
        out.append(J1 @ J2.T)
    return out


@pytest.mark.parametrize("name,kw,factory", [
    ("sdmgrad", {}, lambda: A.SDMGradWeighting()),
    ("sdmgrad", {"lambda_": 0.6, "n_iter": 5, "momentum": 0.0}, lambda: A.SDMGradWeighting(lambda_=0.6, n_iter=5,
                                                                                           momentum=0.0)),
    ("modo", {}, lambda: A.MoDoWeighting()),
    ("modo", {"gamma": 0.5, "rho": 0.0}, lambda: A.MoDoWeighting(gamma=0.5, rho=0.0)),
])
def test_second_batch_methods_agree_with_torchjd(name, kw, factory):
    ours, theirs = create(name, **kw), factory()
    for Ax in _cross_cases():
        ours.observe_cross_gramian(Ax)
        w = ours.weights(torch.ones(3, dtype=torch.float64))
        torch.testing.assert_close(w, theirs(Ax), rtol=1e-9, atol=1e-12)
        assert float(w.sum()) == pytest.approx(1.0) and bool((w >= 0).all())


@pytest.mark.parametrize("name", ["sdmgrad", "modo"])
def test_second_batch_methods_need_the_cross_gramian(name):
    m = create(name)
    with pytest.raises(ConfigurationError, match="cross-Gramian"):
        m.weights(torch.ones(3))
    with pytest.raises(ShapeError):
        m.observe_cross_gramian(torch.ones(2, 3))
    with pytest.raises(NonFiniteError):
        m.observe_cross_gramian(torch.full((3, 3), math.nan))
    a = create(name)
    cases = _cross_cases(seed=1)
    for Ax in cases[:3]:
        a.observe_cross_gramian(Ax)
    b = create(name)
    b.load_state_dict(a.state_dict())
    for Ax in cases[3:]:
        a.observe_cross_gramian(Ax)
        b.observe_cross_gramian(Ax)
        torch.testing.assert_close(a.weights(torch.ones(3)), b.weights(torch.ones(3)))
    with pytest.raises(NotImplementedError):
        create("ew").observe_cross_gramian(cases[0])


def test_cross_gramian_matches_explicit_jacobians():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    heads = [nn.Linear(3, 1) for _ in range(2)]

    def losses(x):
        z = enc(x)
        return [(h(z) ** 2).mean() for h in heads]

    xa, xb = torch.randn(6, 4), torch.randn(6, 4)
    params = list(enc.parameters())

    def jac(ls):
        return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, params, retain_graph=True)])
                            for v in ls]).double()

    want = jac(losses(xa)) @ jac(losses(xb)).T
    got = cross_gramian(losses(xa), losses(xb), params)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    with pytest.raises(ShapeError):
        cross_gramian(losses(xa), losses(xb)[:1], params)


# -- PIVRG ------------------------------------------------------------------------------------
def _pivrg_official(A: np.ndarray, scores: np.ndarray, bound=2.0, mintemp=10.0) -> np.ndarray:
    """The authors' PIVRG.get_weighted_loss, transcribed (weights before clipping, ×T)."""
    from scipy.optimize import least_squares

    T = A.shape[0]
    temp = np.max([(scores.max() - scores.min()) / np.log(bound), mintemp])
    e = np.exp((scores - scores.max()) / temp)
    w = T * e / e.sum()
    res = least_squares(lambda x: A @ x - np.power(w / x, 0.5), np.ones(T) / T, bounds=(0, np.inf))
    return T * res.x


@pytest.mark.parametrize("scores", [[0.0, 0.0, 0.0], [5.0, -3.0, 12.0], [40.0, 0.0, -40.0]])
def test_pivrg_matches_authors_code(scores):
    J = make_jacobian("typical", 3)
    G = (J @ J.T).numpy()
    m = create("pivrg", max_norm=0)
    m.set_scores(scores)
    w = m.weights(torch.tensor(G), torch.ones(3)).numpy()
    np.testing.assert_allclose(w, _pivrg_official(G, np.asarray(scores)), rtol=1e-6)
    pr = [m.log_values()[f"pivrg/priority/{t}"] for t in range(3)]
    assert max(pr) / min(pr) <= 2.0 + 1e-12  # the bound on the priority ratio
    # the clipped update has norm ≤ 1
    mc = create("pivrg")
    mc.set_scores(scores)
    wc = mc.weights(torch.tensor(G), torch.ones(3))
    assert float((wc @ J).norm()) <= 1.0 + 1e-12


def test_pivrg_scale_without_clipping_and_errors():
    J = make_jacobian("typical", 3)
    m = create("pivrg", max_norm=0)
    d1 = m.weights(J @ J.T, torch.ones(3)) @ J
    d2 = m.weights(1e-10 * (J @ J.T), torch.ones(3)) @ (1e-5 * J)
    # the direction of the unclipped update does not depend on the gradients' scale (J × 1e-5)
    torch.testing.assert_close(d2 / d2.norm(), d1 / d1.norm(), rtol=1e-7, atol=1e-9)
    with pytest.raises(ShapeError):
        m.set_scores([1.0, 2.0])
        m.weights(J @ J.T, torch.ones(3))
    with pytest.raises(NonFiniteError):
        m.set_scores([1.0, math.nan, 0.0])
    with pytest.raises(ConfigurationError):
        create("pivrg", bound=1.0)


_DDP_CROSS = """
import sys, torch, torch.distributed as dist
from torch import nn
from mtlens.engine import cross_gramian
rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
torch.manual_seed(0)
enc = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
heads = [nn.Linear(3, 1).double() for _ in range(2)]
g = torch.Generator().manual_seed(1)
xa, xb = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
def losses(x):
    z = enc(x)
    return [(h(z) ** 2).mean() for h in heads]
A = cross_gramian(losses(xa[rank::2]), losses(xb[rank::2]), enc.parameters())
ref = cross_gramian(losses(xa), losses(xb), enc.parameters(), distributed=False)
assert torch.allclose(A, ref, rtol=1e-10, atol=1e-14), (A, ref)
dist.barrier()  # leave together: a rank tearing gloo down while its peer sends can abort
dist.destroy_process_group()
print("ok", rank)
"""


@pytest.mark.slow
def test_cross_gramian_over_two_gloo_ranks_equals_the_global_batch(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_cross.py"
    script.write_text(_DDP_CROSS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "store")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.startswith("ok")
