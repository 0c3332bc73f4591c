"""Properties every gradient aggregator must have, run over every registered gradient method.

The method list is ``mtlens.methods.available("gradient")`` at collection time, so a new method
file is tested as soon as it registers. A method whose optional solver is not installed is
skipped (MissingDependencyError at construction), nothing else is.

What is checked (see /work/shared/spec/methods.md, "Properties worth testing"):

* finite output of the right shape on every matrix family of ``_matrices.py`` × T ∈ {1, 2, 3,
  11, 40}, or a specific mtlens error where a method documents that the case has no answer
  (``EXPECTED_ERRORS``; FairGrad must raise exactly when no direction improves every task);
* the update never conflicts with a task (``J d ≥ −tol``) for the methods that claim it;
* invariance to the order of the tasks for the deterministic methods;
* ``state_dict`` round-trip: 3 steps, save, 2 steps ≡ load into a fresh instance, same 2 steps
  (also through ``torch.save``/``torch.load(weights_only=True)``);
* scale: ``d(cJ) = c^k d(J)`` for c = 1e∓10 (no absolute epsilon anywhere), and direction
  invariance to per-task rescaling where the paper claims it;
* one engine step at every level a method supports writes finite gradients.

Cost control: methods in ``SLOW`` (iterative solvers calling cvxpy) run T = 40 only on the
``typical`` family.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from _matrices import FAMILIES, TASK_COUNTS, make_jacobian
from torch import nn

from mtlens.engine import GramianWeighting, JacobianAggregator, mtl_backward
from mtlens.errors import MissingDependencyError, MTLensError, NonFiniteError, SolverError
from mtlens.methods import available, create, defaults, get

GRADIENT_METHODS = available("gradient")
SLOW = {"nash_mtl", "cagrad"}
"""Iterative solvers (Nash-MTL's cvxpy CCP, CAGrad's SLSQP): T = 40 only on the typical family."""
PERM_RTOL = {"nash_mtl": 1e-4, "cagrad": 1e-5}
"""Relative tolerance of iterative solvers (their stopping criteria); exact methods use 1e-7."""


def make(name: str, **overrides):
    """Build ``name`` with a fixed seed where it takes one; skip if an optional solver is missing."""
    kwargs = {}
    if "seed" in defaults(name):
        kwargs["seed"] = 0
    kwargs.update(overrides)
    try:
        return create(name, **kwargs)
    except MissingDependencyError as exc:
        pytest.skip(f"{name}: optional dependency missing ({exc})")


def is_random(name: str) -> bool:
    return "seed" in defaults(name)


def default_losses(T: int) -> torch.Tensor:
    return torch.linspace(0.5, 1.5, T, dtype=torch.float64)


def apply(method, J: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
    """The update ``d`` (P,) of ``method`` for the Jacobian ``J`` (T, P).

    Gramian weightings: ``w = weights(J Jᵀ)``, ``d = wᵀ J``. Jacobian aggregators: one block
    ``aggregate([J])`` (for a feature-level method the block is (T, *Z.shape) with Z.shape = (P,)).
    """
    T = J.shape[0]
    losses = default_losses(T) if losses is None else losses
    if isinstance(method, GramianWeighting):
        w = torch.as_tensor(method.weights(J @ J.T, losses), dtype=torch.float64).reshape(-1)
        assert w.shape == (T,), f"{method.name}: weights of shape {tuple(w.shape)} for T={T}"
        return w @ J
    assert isinstance(method, JacobianAggregator)
    combined, head_w = method.aggregate([J.clone()], losses)
    assert len(combined) == 1 and combined[0].shape == J.shape[1:]
    head_w = torch.as_tensor(head_w).reshape(-1)
    assert head_w.shape == (T,) and bool(torch.isfinite(head_w).all())
    return combined[0].to(torch.float64)


def strictly_feasible(J: torch.Tensor) -> bool:
    """Is there a d with g_tᵀd > 0 for every nonzero row (an LP on the unit-normalised rows)?"""
    from scipy.optimize import linprog

    norms = J.norm(dim=1)
    rows = J[norms > 1e-8 * norms.max()] if norms.max() > 0 else J[:0]
    if rows.shape[0] == 0:
        return True
    A = (rows / rows.norm(dim=1, keepdim=True)).numpy()
    P = A.shape[1]
    res = linprog(np.zeros(P), A_ub=-A, b_ub=-np.full(A.shape[0], 1e-3), bounds=[(-1, 1)] * P, method="highs")
    return res.status == 0


# A documented "no answer" case: (predicate(family, T, J) -> bool, error type, why).
EXPECTED_ERRORS = {
    "fairgrad": (lambda family, T, J: not strictly_feasible(J), SolverError,
                 "the alpha-fair problem has no solution when no direction improves every task"),
    "nash_mtl": (lambda family, T, J: not strictly_feasible(J), SolverError,
                 "G α = 1/α has no positive solution when 0 is in the convex hull of the gradients"),
    "pivrg": (lambda family, T, J: not strictly_feasible(J), SolverError,
              "G x = (w/x)^(1/2) has no positive solution when no direction improves every task"),
    "consmtl": (lambda family, T, J: not strictly_feasible(J), SolverError,
                "G x = x^(-1/2) has no positive solution when no direction improves every task"),
    "excess_mtl": (lambda family, T, J: bool((J.norm(dim=1) == 0).any()), NonFiniteError,
                   "ER_t / ER_t(0) is undefined when a task's baseline gradient is zero"),
}


def _task_counts(name: str, family: str) -> tuple[int, ...]:
    if name in SLOW and family != "typical":
        return tuple(T for T in TASK_COUNTS if T != 40)
    return TASK_COUNTS


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_finite_output_or_documented_error(name, family):
    expected = EXPECTED_ERRORS.get(name)
    for T in _task_counts(name, family):
        method = make(name)
        J = make_jacobian(family, T)
        if expected is not None and expected[0](family, T, J):
            with pytest.raises(expected[1]):
                apply(method, J)
            continue
        d = apply(method, J)
        assert d.shape == (J.shape[1],)
        assert bool(torch.isfinite(d).all()), f"{name} produced a non-finite update on {family}, T={T}"


# ---- scale: 1e-10 and 1e10 gradients behave like gradients of norm 1 ----------------------------
DEGREE = {"fairgrad": 0, "nash_mtl": 0, "moco": 0}
"""d(cJ) = c^k d(J): k = 1 for most methods; 0 where the update's norm is fixed by construction
(FairGrad with α = 1 and Nash-MTL solve G w = 1/w, so ‖d‖² = T; MoCo's default normalisation
h_t = g_t/‖g_t‖·L_t)."""
HOMOGENEITY_EXEMPT = {
    "ntkmtl": "max_norm = 1 clips the update (authors' code): absolute; tested with max_norm=0 in test_new_methods",
    "pivrg": "max_norm = 1 clips the update (authors' code): absolute; tested with max_norm=0 in test_new_methods",
    "consmtl": "max_norm = 1 clips the update (authors' code): absolute; λ = 0 equals PIVRG (test_consmtl_forum)",
    "pcd": "eps = 1e-8 added to the EMA of squared norms (TorchJD, reference code) is absolute",
    "excess_mtl": "eps = 1e-7 in the AdaGrad denominator (official code) is absolute: scale dependent",
}


@pytest.mark.parametrize("name", GRADIENT_METHODS)
@pytest.mark.parametrize("c", [1e-10, 1e10], ids=["1e-10", "1e10"])
def test_scale_homogeneity(name, c):
    """No absolute epsilon: scaling every gradient by c scales the update by c^k exactly."""
    if name in HOMOGENEITY_EXEMPT:
        pytest.skip(HOMOGENEITY_EXEMPT[name])
    k = DEGREE.get(name, 1)
    rtol = PERM_RTOL.get(name, 1e-7)
    for T in (2, 3, 11):
        J = make_jacobian("typical", T)
        d1 = apply(make(name), J)
        d2 = apply(make(name), c * J) / c**k
        assert float((d1 - d2).norm()) <= rtol * float(d1.norm()) + 1e-300, (
            f"{name}: update at scale {c:g} is not {c:g}^{k} × the update at scale 1 (T={T}): "
            f"relative difference {float((d1 - d2).norm() / d1.norm()):.3g}"
        )


# ---- non-conflict ------------------------------------------------------------------------------
ALL = FAMILIES
NONCONFLICT = {
    # min-norm point of the hull: G w* ≥ ‖d‖² componentwise (KKT)
    "mgda": ALL,
    # projections onto the dual cone of the rows
    "upgrad": ALL,
    "dualproj": ALL,
    # equal projections of the unit gradients; needs 1 in the range of the unit-row matrix, true
    # unless independent unit rows are missing (rank-deficient / rank-1 J conflict)
    "config": tuple(f for f in ALL if f not in ("rank_deficient", "rank1")),
    # solves G w = 1/w > 0 ⇒ g_tᵀd = 1/w_t > 0 whenever it returns (checked where it solves)
    "fairgrad": ALL,
    "nash_mtl": ALL,
    "pivrg": ALL,
    "consmtl": ALL,
}
SOLVE_ONLY = {"fairgrad", "nash_mtl", "pivrg", "consmtl"}
"""The claim holds when a solution exists (some d improves every task): only those cases are run."""


def _nonconflict_cases():
    out = [pytest.param(name, fam, id=f"{name}-{fam}") for name, fams in NONCONFLICT.items() for fam in fams]
    return out + [pytest.param("pcgrad", fam, id=f"pcgrad-{fam}") for fam in ALL]


def _check_nonconflict(J: torch.Tensor, d: torch.Tensor, name: str, family: str) -> None:
    norms = J.norm(dim=1)
    ref = max(float(d.norm()), float(norms.max()))
    tol = 1e-6 * norms * ref
    prods = J @ d
    bad = prods < -tol
    assert not bool(bad.any()), (
        f"{name} conflicts with task(s) {bad.nonzero().flatten().tolist()} on {family}: "
        f"J·d = {prods[bad].tolist()}, tolerance {tol[bad].tolist()}"
    )


@pytest.mark.parametrize("name,family", _nonconflict_cases())
def test_update_does_not_conflict(name, family):
    if name not in GRADIENT_METHODS:
        pytest.skip(f"{name} is not registered (yet)")
    counts = (2,) if name == "pcgrad" else _task_counts(name, family)  # PCGrad's guarantee: two tasks
    checked = 0
    for T in counts:
        J = make_jacobian(family, T)
        if name in SOLVE_ONLY and not strictly_feasible(J):
            continue  # no solution exists: the documented SolverError is tested above
        _check_nonconflict(J, apply(make(name), J), name, f"{family}, T={T}")
        checked += 1
    if name in SOLVE_ONLY and checked == 0:
        pytest.skip(f"no {family} case has a solution")


# ---- permutation invariance --------------------------------------------------------------------
PERM_CASES = [
    ("typical", 3), ("typical", 11), ("rank_deficient", 11), ("identical_rows", 3), ("zero_rows", 11),
]


ORDER_DEPENDENT = {"pcd": "task 0 is the primary objective by definition"}


@pytest.mark.parametrize("name", [n for n in GRADIENT_METHODS if not is_random(n) and n not in ORDER_DEPENDENT])
def test_task_order_does_not_matter(name):
    """Permuting J's rows (and the losses) gives the same update; stateful methods over 3 steps."""
    rtol = PERM_RTOL.get(name, 1e-7)
    for family, T in PERM_CASES:
        perm = torch.randperm(T, generator=torch.Generator().manual_seed(T))
        a, b = make(name), make(name)
        for step in range(3):
            J = make_jacobian(family, T, seed=step)
            L = default_losses(T) + 0.1 * step
            try:
                d1 = apply(a, J, L)
            except MTLensError as exc:  # a documented "no answer" case must not depend on the order
                with pytest.raises(type(exc)):
                    apply(b, J[perm], L[perm])
                break
            d2 = apply(b, J[perm], L[perm])
            scale = max(float(d1.norm()), float(J.norm(dim=1).max()) * 1e-3)
            assert float((d1 - d2).norm()) <= rtol * scale, (
                f"{name}: task order changes the update on {family}, T={T}, step {step}: "
                f"‖Δd‖ = {float((d1 - d2).norm()):.3g}, ‖d‖ = {float(d1.norm()):.3g}"
            )


# ---- state round-trip --------------------------------------------------------------------------
def _sequence(T=3, P=12, n=5):
    g = torch.Generator().manual_seed(7)
    Js = [torch.randn(T, P, generator=g, dtype=torch.float64) * (1 + k) for k in range(n)]
    Ls = [torch.rand(T, generator=g, dtype=torch.float64) + 0.5 for _ in range(n)]
    return Js, Ls


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_state_dict_round_trip(name):
    Js, Ls = _sequence()
    a = make(name)
    for J, L in zip(Js[:3], Ls[:3]):
        apply(a, J, L)
    state = copy.deepcopy(a.state_dict())
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # checkpoints must load safely
    after_a = [apply(a, J, L) for J, L in zip(Js[3:], Ls[3:])]

    b = make(name, seed=12345) if is_random(name) else make(name)
    b.load_state_dict(loaded)
    after_b = [apply(b, J, L) for J, L in zip(Js[3:], Ls[3:])]
    for k, (x, y) in enumerate(zip(after_a, after_b)):
        msg = f"{name}: step {k + 4} differs after reload"
        torch.testing.assert_close(y, x, rtol=1e-12, atol=0.0, msg=msg)
    if is_random(name):  # the seed alone would not reproduce these draws: the state did
        c = make(name, seed=12345)
        fresh = [apply(c, J, L) for J, L in zip(Js[3:], Ls[3:])]
        assert any(not torch.allclose(x, y) for x, y in zip(fresh, after_a))


# ---- scale behaviour ---------------------------------------------------------------------------
SCALE_INVARIANT = {
    "imtl_g": {},  # equal projections on the unit gradients: IMTL-G's definition
    "mgda": {"normalization": "l2"},  # min-norm point of the unit gradients
    "config": {},  # built from unit gradients only
    "db_mtl": {},  # first step: every EMA gradient rescaled to the largest norm
}


@pytest.mark.parametrize("name,hp", list(SCALE_INVARIANT.items()), ids=list(SCALE_INVARIANT))
def test_direction_invariant_to_task_rescaling(name, hp):
    if name not in GRADIENT_METHODS:
        pytest.skip(f"{name} is not registered (yet)")
    for T in (2, 3, 11):
        J = make_jacobian("typical", T)
        D = 10 ** (torch.rand(T, 1, generator=torch.Generator().manual_seed(T), dtype=torch.float64) * 4 - 2)
        d1 = apply(make(name, **hp), J)
        d2 = apply(make(name, **hp), D * J)
        cos = float(d1 @ d2 / (d1.norm() * d2.norm()))
        assert cos > 1 - 1e-9, f"{name}: direction changes under per-task rescaling (cos = {cos}), T={T}"


def test_aligned_mtl_equalises_orthogonal_components():
    """Aligned-MTL's claim is a condition number of 1 for the aligned gradients, not invariance of the
    direction to per-task rescaling (false in general: TorchJD's AlignedMTL gives cos ≈ 0.99 for
    rescaled rows). What holds: for orthogonal task gradients of any norms, the update has equal
    components along the unit gradients (σ_min U Vᵀ has equal-norm orthogonal rows)."""
    if "aligned_mtl" not in GRADIENT_METHODS:
        pytest.skip("aligned_mtl is not registered (yet)")
    T, P = 4, 12
    Q, _ = torch.linalg.qr(torch.randn(P, T, dtype=torch.float64))
    J = Q.T * torch.tensor([[0.1], [1.0], [5.0], [30.0]], dtype=torch.float64)
    d = apply(make("aligned_mtl"), J)
    comp = (J / J.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(comp, comp.mean().expand(T), rtol=1e-9, atol=0.0)


# ---- one engine step at every supported level --------------------------------------------------
class _Net(nn.Module):
    def __init__(self, T):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(T)])

    def forward(self, x):
        z = self.enc(x)
        return z, {f"t{i}": (h(z) ** 2).mean() + 0.1 for i, h in enumerate(self.heads)}


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_engine_step_writes_finite_gradients(name):
    cls = get(name)
    for level in cls.levels:
        net = _Net(3)
        method = make(name)
        for _ in range(2):
            net.zero_grad(set_to_none=True)
            z, losses = net(torch.randn(4, 5))
            rec = mtl_backward(losses, features=z, shared_params=net.enc.parameters(), method=method,
                               level=level)
            assert not rec.skipped
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads), f"{name} at {level}"
        assert any(float(g.abs().sum()) > 0 for g in grads[:4]), f"{name} at {level}: no encoder update"
