"""Our aggregators against TorchJD's (``torchjd.aggregation``) on the same matrices.

For every aggregator both libraries have, the update directions must agree (cosine ≥ 1 − tol)
and the ratio of the update norms must be the scale convention our method documents:

==============  =========================================  ====================================
ours            TorchJD                                    ‖d_ours‖ / ‖d_torchjd‖
==============  =========================================  ====================================
upgrad          UPGrad()  (mean of projections)            1   (same mean convention)
dualproj        DualProj()                                 1
config          ConFIG()                                   1
fairgrad        FairGrad(alpha)                            1
mgda            MGDA(epsilon=1e-12, max_iters=3000)        1   (TorchJD: Frank-Wolfe, inexact)
pcgrad (T=2)    PCGrad()                                   1   (sum)
gradvac (T=2)   GradVac(beta=0.5), 3 steps                 1   (sum)
cagrad          CAGrad(c)                                  T   (ours, rescale=0: official ×T)
imtl_g          IMTLG()                                    1   (Σα = 1)
aligned_mtl     AlignedMTL()                               T   (ours ω = 1, TorchJD 1/T)
nash_mtl        NashMTL(T, 1.0, 1, 20)                     1   (both clipped to norm 1)
excess_mtl      ExcessMTL(0.01, n_warmup_steps=1), 5 steps T   (ours sums to T, TorchJD to 1)
graddrop        GradDrop() under the same seed            1   (same U draws: exact)
rgw             Random() under the same seed              1   (same normal draws: exact)
==============  =========================================  ====================================

Tolerances: 1 − cos ≤ 1e-9 for exact methods (our UPGrad/DualProj are run with TorchJD's
ridge, ``reg_eps = 1e-4, ridge="trace"``, and our default 1e-12, ``ridge="relative"``, against
TorchJD's projector with the same 1e-12;
the two ridges give results 1e-3 (T = 11) to 1e-2 (T = 40) apart in 1 − cos), 1e-5 for MGDA
(T ≤ 11; TorchJD's Frank-Wolfe converges slowly) and CAGrad (ours exact vs Clarabel), 1e-4 for
Nash-MTL (both stop the CCP at a residual of 1e-3; matrices where TorchJD silently falls back to
equal weights are detected and skipped). Randomised methods cannot be matched draw for draw
except where both consume the same generator stream (GradDrop, RGW);
PCGrad and GradVac are deterministic only for T = 2. db_mtl and moco have no TorchJD
counterpart. The matrices have trace(G) ≥ 1e-4: below it TorchJD's dual-cone projector zeroes
the Gramian (``norm_eps``) and returns the plain mean, which we do not (see ``_qp.py``).
"""

from __future__ import annotations

import pytest
import torch
from _matrices import make_jacobian

from mtlens.errors import MissingDependencyError
from mtlens.methods import available, create

A = pytest.importorskip("torchjd.aggregation")

pytestmark = pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")

MATRICES = [("typical", 2, 0), ("typical", 3, 0), ("typical", 11, 0), ("typical", 40, 0), ("typical", 3, 1),
            ("typical", 11, 1)]
DEGENERATE = [("identical_rows", 3, 0), ("zero_rows", 11, 0), ("rank_deficient", 11, 0)]


def _ours(name, **kw):
    if name not in available("gradient"):
        pytest.skip(f"{name} is not registered (yet)")
    try:
        return create(name, **kw)
    except MissingDependencyError as exc:
        pytest.skip(str(exc))


def _weights_update(method, J):
    T = J.shape[0]
    w = torch.as_tensor(method.weights(J @ J.T, torch.ones(T, dtype=torch.float64)), dtype=torch.float64)
    return w @ J


def _compare(d, e, tol, ratio, ratio_rtol, what):
    cos = float(d @ e / (d.norm() * e.norm()))
    assert 1 - cos <= tol, f"{what}: 1 − cos = {1 - cos:.3g} > {tol:g}"
    r = float(d.norm() / e.norm())
    assert abs(r - ratio) <= ratio_rtol * ratio, f"{what}: norm ratio {r:.9g}, documented {ratio}"


GRAMIAN_PAIRS = {
    # name: (our kwargs, torchjd factory(T), 1 − cos tol, ratio(T), ratio rtol)
    "upgrad": ({"reg_eps": 1e-4, "ridge": "trace"}, lambda T: A.UPGrad(), 1e-9, lambda T: 1.0, 1e-9),
    "dualproj": ({"reg_eps": 1e-4, "ridge": "trace"}, lambda T: A.DualProj(), 1e-9, lambda T: 1.0, 1e-9),
    "config": ({}, lambda T: A.ConFIG(), 1e-9, lambda T: 1.0, 1e-9),
    "fairgrad": ({}, lambda T: A.FairGrad(alpha=1.0), 1e-9, lambda T: 1.0, 1e-6),
    "cagrad": ({"c": 0.5, "rescale": 0}, lambda T: A.CAGrad(c=0.5), 1e-5, lambda T: float(T), 1e-4),
    "imtl_g": ({}, lambda T: A.IMTLG(), 1e-9, lambda T: 1.0, 1e-9),
    "aligned_mtl": ({}, lambda T: A.AlignedMTL(), 1e-9, lambda T: float(T), 1e-9),
}


@pytest.mark.parametrize("name", list(GRAMIAN_PAIRS))
def test_same_direction_and_documented_scale(name):
    kw, factory, tol, ratio, rrtol = GRAMIAN_PAIRS[name]
    for family, T, seed in MATRICES:
        J = make_jacobian(family, T, seed=seed)
        d = _weights_update(_ours(name, **kw), J)
        e = factory(T)(J)
        _compare(d, e, tol, ratio(T), rrtol, f"{name} vs TorchJD on {family} T={T} seed={seed}")


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "config"])
def test_degenerate_matrices_agree(name):
    """Exact projection methods also agree on rank-deficient, zero- and identical-row J."""
    kw, factory, tol, ratio, rrtol = GRAMIAN_PAIRS[name]
    for family, T, seed in DEGENERATE:
        J = make_jacobian(family, T, seed=seed)
        d = _weights_update(_ours(name, **kw), J)
        e = factory(T)(J)
        _compare(d, e, max(tol, 1e-7), ratio(T), max(rrtol, 1e-3), f"{name} vs TorchJD on {family} T={T}")


@pytest.mark.parametrize("name,torchjd_cls", [("upgrad", "UPGrad"), ("dualproj", "DualProj")])
def test_default_ridge_matches_torchjd_with_same_ridge(name, torchjd_cls):
    """Our default reg_eps = 1e-12 equals TorchJD's projector run with reg_eps = 1e-12.

    With TorchJD's default reg_eps = 1e-4 the two differ by 1 − cos ≈ 1e-3 at T = 11 and 1e-2 at
    T = 40 (P = 60): TorchJD's ridge is not negligible when G has small eigenvalues."""
    from torchjd.linalg import QuadprogProjector

    for family, T, seed in MATRICES:
        J = make_jacobian(family, T, seed=seed)
        d = _weights_update(_ours(name), J)
        e = getattr(A, torchjd_cls)(projector=QuadprogProjector(reg_eps=1e-12))(J)
        _compare(d, e, 1e-9, 1.0, 1e-8, f"{name} (default ridge) vs TorchJD(reg_eps=1e-12) on {family} T={T}")


def test_mgda_against_frank_wolfe():
    """TorchJD's MGDA is Frank-Wolfe (Algorithm 2 of Sener & Koltun), ours the exact min-norm point:
    directions agree to 1e-5 for T ≤ 11 after 3000 FW iterations, and our norm is never larger
    (FW approaches the minimum norm from above). TorchJD returns NaN on a zero row (0/0 in its
    line search), so zero_rows is not compared; with 0 in the hull (rank-deficient) both are ~0."""
    for family, T, seed in MATRICES + [("identical_rows", 3, 0)]:
        J = make_jacobian(family, T, seed=seed)
        d = _weights_update(_ours("mgda"), J)
        e = A.MGDA(epsilon=1e-12, max_iters=3000)(J)
        assert float(d.norm()) <= float(e.norm()) * (1 + 1e-12), f"mgda: FW found a smaller norm on T={T}"
        if T <= 11:
            _compare(d, e, 1e-5, 1.0, 2e-3, f"mgda vs TorchJD MGDA on {family} T={T} seed={seed}")
    J = make_jacobian("rank_deficient", 11)
    d = _weights_update(_ours("mgda"), J)
    e = A.MGDA(epsilon=1e-12, max_iters=3000)(J)
    scale = float(J.norm(dim=1).max())
    assert float(d.norm()) <= 1e-7 * scale and float(e.norm()) <= 1e-3 * scale


def test_nash_mtl_agrees_where_torchjd_solves():
    """Nash-MTL: same direction (1 − cos ≤ 1e-4, both stop the CCP at a residual of 1e-3) and the same
    norm (both clip to max_norm = 1). TorchJD catches solver errors and silently keeps its initial
    weights (all ones); we detect that case through the bargaining condition α_t (Gα)_t = const and
    check that ours satisfies it instead."""
    compared = 0
    for family, T, seed in MATRICES:
        J = make_jacobian(family, T, seed=seed)
        G = J @ J.T
        ours = _ours("nash_mtl")
        w = torch.as_tensor(ours.weights(G, torch.ones(T, dtype=torch.float64)), dtype=torch.float64)
        prod = w * (G @ w)
        assert float(prod.std() / prod.mean()) < 1e-3, f"ours violates α(Gα) = const on T={T}"
        theirs = A.NashMTL(n_tasks=T, max_norm=1.0, update_weights_every=1, optim_niter=20)
        e = theirs(J)
        wt = torch.linalg.lstsq(J.T, e.unsqueeze(1)).solution.flatten()
        pt = wt * (G @ wt)
        if float(pt.std() / pt.mean()) > 1e-2:  # TorchJD's silent fallback
            continue
        _compare(w @ J, e, 1e-4, 1.0, 1e-3, f"nash_mtl vs TorchJD on {family} T={T} seed={seed}")
        compared += 1
    assert compared >= 4


def test_sum_convention_with_pref_vector():
    """pref_vector = ones gives the sum of the projections: T × the default mean, as in TorchJD."""
    for T in (2, 3, 11):
        J = make_jacobian("typical", T)
        ones = [1.0] * T
        for name, cls in (("upgrad", A.UPGrad), ("dualproj", A.DualProj)):
            d = _weights_update(_ours(name, pref_vector=ones, reg_eps=1e-4, ridge="trace"), J)
            e = cls(pref_vector=torch.ones(T, dtype=torch.float64))(J)
            _compare(d, e, 1e-9, 1.0, 1e-9, f"{name}(pref_vector=ones) vs TorchJD")
            mean = _weights_update(_ours(name, reg_eps=1e-4, ridge="trace"), J)
            torch.testing.assert_close(d, T * mean, rtol=1e-9, atol=1e-12)


def test_fairgrad_other_alpha():
    for alpha in (0.5, 2.0):
        for family, T, seed in MATRICES[:4]:
            J = make_jacobian(family, T, seed=seed)
            d = _weights_update(_ours("fairgrad", alpha=alpha), J)
            e = A.FairGrad(alpha=alpha)(J)
            _compare(d, e, 1e-8, 1.0, 1e-5, f"fairgrad(alpha={alpha}) vs TorchJD on T={T}")


@pytest.mark.parametrize("family", ["typical", "identical_rows", "opposite_rows", "rank1", "zero_rows"])
def test_pcgrad_two_tasks(family):
    J = make_jacobian(family, 2)
    d = _weights_update(_ours("pcgrad", seed=0), J)
    e = A.PCGrad()(J)
    if float(e.norm()) == 0.0:
        assert float(d.norm()) <= 1e-12 * float(J.norm())
        return
    _compare(d, e, 1e-12, 1.0, 1e-12, f"pcgrad vs TorchJD on {family}")


def test_gradvac_two_tasks_over_steps():
    ours = _ours("gradvac", seed=0, beta=0.5)
    theirs = A.GradVac(beta=0.5)
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        J = torch.randn(2, 15, generator=g, dtype=torch.float64)
        d = _weights_update(ours, J)
        e = theirs(J)
        _compare(d, e, 1e-9, 1.0, 1e-6, f"gradvac vs TorchJD at step {step}")


def test_excess_mtl_over_steps():
    ours = _ours("excess_mtl", robust_step_size=0.01, baseline_steps=1)
    theirs = A.ExcessMTL(robust_step_size=0.01, n_warmup_steps=1)
    g = torch.Generator().manual_seed(5)
    T = 3
    for step in range(5):
        J = torch.randn(T, 12, generator=g, dtype=torch.float64) * (1 + step)
        (d,), _ = ours.aggregate([J], torch.ones(T, dtype=torch.float64))
        e = theirs(J)
        _compare(d.double(), e, 1e-9, float(T), 1e-6, f"excess_mtl vs TorchJD at step {step}")


def test_graddrop_same_draws():
    """Both draw U with torch.rand(shape, float64) from a generator seeded alike: identical masks."""
    g = torch.Generator().manual_seed(11)
    for T in (2, 3, 11):
        J = torch.randn(T, 40, generator=g, dtype=torch.float64)
        J[:, :5] = J[:, :5].abs()  # some entries with pure sign
        ours = _ours("graddrop", seed=123)
        (d,), _ = ours.aggregate([J], torch.ones(T, dtype=torch.float64))
        torch.manual_seed(123)
        e = A.GradDrop()(J)
        torch.testing.assert_close(d, e, rtol=1e-12, atol=1e-14)
        # with a leak: TorchJD's per-row leak tensor
        ours = _ours("graddrop", seed=7, leak=0.3)
        (d,), _ = ours.aggregate([J], torch.ones(T, dtype=torch.float64))
        torch.manual_seed(7)
        e = A.GradDrop(leak=torch.full((T,), 0.3, dtype=torch.float64))(J)
        torch.testing.assert_close(d, e, rtol=1e-12, atol=1e-14)


def test_rgw_same_draws():
    """RGW and TorchJD's Random both take softmax of a standard-normal draw (float64 here)."""
    for T in (2, 3, 11):
        J = make_jacobian("typical", T)
        d = _weights_update(_ours("rgw", seed=99), J)
        torch.manual_seed(99)
        e = A.Random()(J)
        torch.testing.assert_close(d, e, rtol=1e-12, atol=1e-14)
