"""Properties every gradient aggregator must have, run over every registered gradient method.

The method list is ``mtlens.methods.available("gradient")`` at collection time, so a new method
file is tested as soon as it registers. A method whose optional solver is not installed is
skipped (MissingDependencyError at construction), nothing else is.

What a method guarantees is declared once, on its class (``claims``, ``disclaims``,
``failures``, ``solver_rtol``; :class:`mtlens.engine.protocols.Claim`), and checked here with the
assertions of :mod:`mtlens.methods.testing` — no method name is listed in this module:

* finite output of the right shape on every matrix family of ``_matrices.py`` × T ∈ {1, 2, 3,
  11, 40}, or the error a method's ``failures`` documents where the case has no answer (FairGrad
  must raise exactly when no direction improves every task);
* ``non_conflicting``: the update never conflicts with a task (``J d ≥ −tol``) where the claim's
  condition holds;
* ``permutation_invariant``: invariance to the order of the tasks (every deterministic method
  claims it or says why not);
* ``state_dict`` round-trip: 3 steps, save, 2 steps ≡ load into a fresh instance, same 2 steps
  (also through ``torch.save``/``torch.load(weights_only=True)``);
* ``homogeneous``: ``d(cJ) = c^k d(J)`` for c = 1e∓10 (no absolute epsilon anywhere; every method
  claims it or says why not), and ``rescaling_invariant``: direction invariance to per-task
  rescaling;
* one engine step at every level a method supports writes finite gradients.

Cost control: methods with an iterative solver (``solver_rtol`` set: Nash-MTL's cvxpy CCP,
CAGrad's SLSQP) run T = 40 only on the ``typical`` family.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _matrices import FAMILIES, TASK_COUNTS, make_jacobian
from torch import nn

from mtlens.engine import mtl_backward
from mtlens.errors import MissingDependencyError
from mtlens.methods import available, create, defaults, get
from mtlens.methods import testing as props
from mtlens.methods._utils import Seeded

GRADIENT_METHODS = available("gradient")


def claiming(prop: str) -> list[str]:
    """The gradient methods whose class claims ``prop``."""
    return [n for n in GRADIENT_METHODS if prop in get(n).claims]


def rtol_of(name: str) -> float:
    """The relative accuracy of an iterative solver (its stopping criterion); exact methods 1e-7."""
    return get(name).solver_rtol or 1e-7


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


default_losses = props.default_losses
apply = props.update


def _task_counts(name: str, family: str) -> tuple[int, ...]:
    if get(name).solver_rtol is not None and family != "typical":
        return tuple(T for T in TASK_COUNTS if T != 40)
    return TASK_COUNTS


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_finite_output_or_documented_error(name, family):
    for T in _task_counts(name, family):
        props.assert_finite_or_documented_error(make(name), make_jacobian(family, T), where=f"{family}, T={T}")


# ---- scale: 1e-10 and 1e10 gradients behave like gradients of norm 1 ----------------------------
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_homogeneity_is_claimed_or_disclaimed(name):
    cls = get(name)
    assert ("homogeneous" in cls.claims) != ("homogeneous" in cls.disclaims), (
        f"{name}: declare 'homogeneous' in claims (with its degree) or in disclaims (with the reason)")


@pytest.mark.parametrize("name", claiming("homogeneous"))
@pytest.mark.parametrize("c", [1e-10, 1e10], ids=["1e-10", "1e10"])
def test_scale_homogeneity(name, c):
    """No absolute epsilon: scaling every gradient by c scales the update by c^k exactly."""
    k = get(name).claims["homogeneous"].degree
    for T in (2, 3, 11):
        props.assert_homogeneous(lambda: make(name), make_jacobian("typical", T), c, degree=k, rtol=rtol_of(name),
                                 where=f"T={T}")


# ---- non-conflict ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", claiming("non_conflicting"))
def test_update_does_not_conflict(name, family):
    """Where the claim's condition holds (e.g. some direction improves every task), J d ≥ −tol."""
    when = get(name).claims["non_conflicting"].when
    checked = 0
    for T in _task_counts(name, family):
        J = make_jacobian(family, T)
        if not props.holds(when, J):
            continue
        props.assert_non_conflicting(J, apply(make(name), J), name, f"{family}, T={T}")
        checked += 1
    if checked == 0:
        pytest.skip(f"no {family} case meets the condition {when!r}")


# ---- permutation invariance --------------------------------------------------------------------
PERM_CASES = [
    ("typical", 3), ("typical", 11), ("rank_deficient", 11), ("identical_rows", 3), ("zero_rows", 11),
]


@pytest.mark.parametrize("name", [n for n in GRADIENT_METHODS if not issubclass(get(n), Seeded)])
def test_order_invariance_is_claimed_or_disclaimed(name):
    cls = get(name)
    assert ("permutation_invariant" in cls.claims) != ("permutation_invariant" in cls.disclaims), (
        f"{name}: a deterministic method declares 'permutation_invariant' in claims or in disclaims (with the reason)")


@pytest.mark.parametrize("name", claiming("permutation_invariant"))
def test_task_order_does_not_matter(name):
    """Permuting J's rows (and the losses) gives the same update; stateful methods over 3 steps."""
    for family, T in PERM_CASES:
        perm = torch.randperm(T, generator=torch.Generator().manual_seed(T))
        Js = [make_jacobian(family, T, seed=step) for step in range(3)]
        Ls = [default_losses(T) + 0.1 * step for step in range(3)]
        props.assert_permutation_invariant(lambda: make(name), Js, Ls, perm, rtol=rtol_of(name),
                                           where=f"{family}, T={T}")


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
@pytest.mark.parametrize("name", claiming("rescaling_invariant"))
def test_direction_invariant_to_task_rescaling(name):
    hp = get(name).claims["rescaling_invariant"].hparams
    for T in (2, 3, 11):
        J = make_jacobian("typical", T)
        D = 10 ** (torch.rand(T, 1, generator=torch.Generator().manual_seed(T), dtype=torch.float64) * 4 - 2)
        props.assert_rescaling_invariant(lambda: make(name, **hp), J, D, where=f"T={T}")


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
