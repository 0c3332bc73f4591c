"""Property assertions for multi-task methods, one per property a method can claim.

A method states what it guarantees on its class (``claims``, ``disclaims``, ``failures``; see
:class:`~mtlens.engine.protocols.Method` and :class:`~mtlens.engine.protocols.Claim`); the test
suite runs the assertion of each claimed property over every method that claims it. Use them for
a method of your own the same way::

    from mtlens.methods import testing
    testing.assert_non_conflicting(J, testing.update(method, J), name=method.name)

Properties (``Method.claims`` keys):

* ``"non_conflicting"`` (gradient methods): the update ``d`` never conflicts with a task,
  ``g_t·d ≥ 0`` for every t, up to a tolerance relative to ``‖g_t‖·max(‖d‖, max_s ‖g_s‖)``;
* ``"permutation_invariant"``: permuting the tasks (rows of J and the losses) leaves the update
  unchanged (gradient methods) or permutes the weights alike (loss weightings), over several
  steps for stateful methods;
* ``"homogeneous"`` (gradient methods): ``d(cJ) = c^k d(J)`` with ``k = Claim.degree``, for
  ``c = 1e∓10`` — no absolute epsilon anywhere;
* ``"rescaling_invariant"``: per-task rescaling ``g_t → c_t g_t`` (gradient methods) or
  ``L_t → c_t L_t`` (loss weightings: the update ``Σ_t w_t ∇L_t``) leaves the update's direction
  unchanged;
* ``"weights_total"`` (loss weightings): the weights sum to ``T`` or to ``1`` (``Claim.total``).

Conditions (``Claim.when`` and ``Method.failures`` keys), predicates on J: :data:`CONDITIONS`.
Every function raises ``AssertionError`` with a message naming the method and the numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..engine.protocols import GramianWeighting, JacobianAggregator, LossWeighting, Method

MethodFactory = Callable[[], Method]
"""A zero-argument callable returning a fresh method (stateful methods are compared from scratch)."""


def default_losses(T: int) -> Tensor:
    """The losses (T,), float64, that the gradient-method assertions pass when none are given."""
    return torch.linspace(0.5, 1.5, T, dtype=torch.float64)


def update(method: Method, J: Tensor, losses: Tensor | None = None) -> Tensor:
    """The update ``d`` (P,) of a gradient ``method`` for the Jacobian ``J`` (T, P), float64.

    Gramian weightings: ``w = weights(J Jᵀ)``, ``d = wᵀ J``. Jacobian aggregators: one block
    ``aggregate([J])`` (for a feature-level method the block is (T, *Z.shape) with Z.shape = (P,)).
    """
    T = J.shape[0]
    losses = default_losses(T) if losses is None else losses
    if isinstance(method, GramianWeighting):
        w = torch.as_tensor(method.weights(J @ J.T, losses), dtype=torch.float64).reshape(-1)
        assert w.shape == (T,), f"{method.name}: weights of shape {tuple(w.shape)} for T={T}"
        return w @ J
    assert isinstance(method, JacobianAggregator), f"{method.name} is not a gradient method"
    combined, head_w = method.aggregate([J.clone()], losses)
    assert len(combined) == 1 and combined[0].shape == J.shape[1:]
    head_w = torch.as_tensor(head_w).reshape(-1)
    assert head_w.shape == (T,) and bool(torch.isfinite(head_w).all())
    return combined[0].to(torch.float64)


# ---- conditions --------------------------------------------------------------------------------
def _nonzero_unit_rows(J: Tensor) -> Tensor:
    norms = J.norm(dim=1)
    rows = J[norms > 1e-8 * norms.max()] if float(norms.max()) > 0 else J[:0]
    return rows / rows.norm(dim=1, keepdim=True)


def common_descent(J: Tensor) -> bool:
    """Is there a ``d`` with ``g_t·d > 0`` for every nonzero row (an LP on the unit rows, scipy HiGHS)?"""
    from scipy.optimize import linprog

    A = _nonzero_unit_rows(J).numpy()
    if A.shape[0] == 0:
        return True
    P = A.shape[1]
    res = linprog(np.zeros(P), A_ub=-A, b_ub=-np.full(A.shape[0], 1e-3), bounds=[(-1, 1)] * P, method="highs")
    return res.status == 0


def equal_projections_solvable(J: Tensor) -> bool:
    """Does some ``d`` have the same positive projection on every nonzero unit row, ``U d = 1``?
    (ConFIG's direction solves it in the least-squares sense; e.g. false for opposite rows.)"""
    U = _nonzero_unit_rows(J)
    if U.shape[0] == 0:
        return True
    ones = torch.ones(U.shape[0], dtype=U.dtype)
    d = torch.linalg.pinv(U) @ ones
    return float((U @ d - ones).norm()) <= 1e-8 * U.shape[0] ** 0.5


CONDITIONS: dict[str, Callable[[Tensor], bool]] = {
    "always": lambda _J: True,
    "two_tasks": lambda J: J.shape[0] == 2,
    "common_descent": common_descent,
    "no_common_descent": lambda J: not common_descent(J),
    "equal_projections_solvable": equal_projections_solvable,
    "zero_gradient": lambda J: bool((J.norm(dim=1) == 0).any()),
}
"""Predicates on J (T, P) named by ``Claim.when`` and ``Method.failures``."""


def holds(condition: str, J: Tensor) -> bool:
    """Whether ``condition`` (a key of :data:`CONDITIONS`) holds for ``J``."""
    if condition not in CONDITIONS:
        raise KeyError(f"unknown condition {condition!r}; known: {sorted(CONDITIONS)}")
    return CONDITIONS[condition](J)


# ---- gradient methods --------------------------------------------------------------------------
def assert_finite_or_documented_error(method: Method, J: Tensor, where: str = "") -> None:
    """``update(method, J)`` is finite and of shape (P,), or — where J meets a condition of
    ``method.failures`` — raises exactly the documented error type."""
    for condition, (error, why) in type(method).failures.items():
        if holds(condition, J):
            try:
                update(method, J)
            except error:
                return
            raise AssertionError(f"{method.name} did not raise {error.__name__} on {where} ({why})")
    d = update(method, J)
    assert d.shape == (J.shape[1],), f"{method.name}: update of shape {tuple(d.shape)} on {where}"
    assert bool(torch.isfinite(d).all()), f"{method.name} produced a non-finite update on {where}"


def assert_non_conflicting(J: Tensor, d: Tensor, name: str, where: str = "", rtol: float = 1e-6) -> None:
    """``g_t·d ≥ −rtol·‖g_t‖·max(‖d‖, max_s ‖g_s‖)`` for every task t."""
    norms = J.norm(dim=1)
    ref = max(float(d.norm()), float(norms.max()))
    tol = rtol * norms * ref
    prods = J @ d
    bad = prods < -tol
    assert not bool(bad.any()), (
        f"{name} conflicts with task(s) {bad.nonzero().flatten().tolist()} on {where}: "
        f"J·d = {prods[bad].tolist()}, tolerance {tol[bad].tolist()}"
    )


def assert_permutation_invariant(
    make: MethodFactory,
    jacobians: Sequence[Tensor],
    losses: Sequence[Tensor],
    perm: Tensor,
    rtol: float = 1e-7,
    where: str = "",
) -> None:
    """Two fresh methods, one fed ``J[perm]``/``L[perm]``, give the same update at every step.

    A documented error (any mtlens error) on the original order must be raised on the permuted one
    too; the sequence then stops."""
    from ..errors import MTLensError

    a, b = make(), make()
    for step, (J, L) in enumerate(zip(jacobians, losses)):
        try:
            d1 = update(a, J, L)
        except MTLensError as exc:  # a documented "no answer" case must not depend on the order
            try:
                update(b, J[perm], L[perm])
            except type(exc):
                return
            raise AssertionError(
                f"{a.name}: {type(exc).__name__} in one task order only ({where}, step {step})"
            ) from exc
        d2 = update(b, J[perm], L[perm])
        scale = max(float(d1.norm()), float(J.norm(dim=1).max()) * 1e-3)
        assert float((d1 - d2).norm()) <= rtol * scale, (
            f"{a.name}: task order changes the update on {where}, step {step}: "
            f"‖Δd‖ = {float((d1 - d2).norm()):.3g}, ‖d‖ = {float(d1.norm()):.3g}"
        )


def assert_homogeneous(
    make: MethodFactory, J: Tensor, c: float, degree: int = 1, rtol: float = 1e-7, where: str = ""
) -> None:
    """``d(cJ) = c^degree · d(J)`` to ``rtol`` relative to ``‖d(J)‖`` (fresh methods for both)."""
    d1 = update(make(), J)
    d2 = update(make(), c * J) / c**degree
    name = make().name
    assert float((d1 - d2).norm()) <= rtol * float(d1.norm()) + 1e-300, (
        f"{name}: update at scale {c:g} is not {c:g}^{degree} × the update at scale 1 ({where}): "
        f"relative difference {float((d1 - d2).norm() / d1.norm()):.3g}"
    )


def assert_rescaling_invariant(
    make: MethodFactory, J: Tensor, scales: Tensor, tol: float = 1e-9, where: str = ""
) -> None:
    """The direction of the update is unchanged when each task's gradient is rescaled
    (``J → diag(scales) J``, ``scales`` (T, 1) > 0): cosine > 1 − ``tol``."""
    d1 = update(make(), J)
    d2 = update(make(), scales * J)
    cos = float(d1 @ d2 / (d1.norm() * d2.norm()))
    assert cos > 1 - tol, f"{make().name}: direction changes under per-task rescaling (cos = {cos}), {where}"


# ---- loss weightings ---------------------------------------------------------------------------
def loss_weights(method: Method, losses: Tensor) -> Tensor:
    """The weights (T,), float64, a loss weighting returns for ``losses`` (T,) (unit gradient norms
    for a method that needs them, GradNorm)."""
    assert isinstance(method, LossWeighting), f"{method.name} is not a loss weighting"
    norms = torch.ones_like(losses) if method.needs_grad_norms else None
    w = torch.as_tensor(method.weights(losses, grad_norms=norms)).to(torch.float64).reshape(-1)
    assert w.shape == losses.shape, f"{method.name}: weights of shape {tuple(w.shape)} for {losses.shape[0]} losses"
    assert bool(torch.isfinite(w).all()), f"{method.name}: non-finite weights {w.tolist()}"
    return w


def assert_weights_permute(make: MethodFactory, losses: Sequence[Tensor], perm: Tensor, rtol: float = 1e-9) -> None:
    """Two fresh weightings, one fed ``L[perm]``, return ``w[perm]`` at every call."""
    a, b = make(), make()
    for step, L in enumerate(losses):
        w1, w2 = loss_weights(a, L), loss_weights(b, L[perm])
        ok = torch.allclose(w2, w1[perm], rtol=rtol, atol=1e-12)
        assert ok, f"{a.name}: weights do not permute with the tasks (call {step}): {w1.tolist()} → {w2.tolist()}"


def assert_weights_total(method: Method, losses: Tensor, total: str, rtol: float = 1e-6) -> None:
    """The weights sum to ``T`` (``total="T"``) or to ``1`` (``total="1"``), to ``rtol`` (float32
    rounding by default: GradNorm keeps its weights in float32)."""
    T = losses.shape[0]
    want = {"T": float(T), "1": 1.0}[total]
    got = float(loss_weights(method, losses).sum())
    assert abs(got - want) <= rtol * want, f"{method.name}: weights sum to {got}, not {total} (= {want})"


def assert_loss_rescaling_invariant(make: MethodFactory, losses: Tensor, scales: Tensor, rtol: float = 1e-6) -> None:
    """Rescaling each loss ``L_t → c_t L_t`` leaves the update ``Σ_t w_t ∇L_t`` unchanged up to a
    common factor: ``w(c ⊙ L) ⊙ c ∝ w(L)`` (fresh weightings for both)."""
    w1 = loss_weights(make(), losses)
    w2 = loss_weights(make(), scales * losses) * scales
    r = w2 / w1
    assert float((r - r.mean()).abs().max()) <= rtol * float(r.abs().mean()), (
        f"{make().name}: the update's direction changes when the losses are rescaled by {scales.tolist()}: "
        f"w(c⊙L)⊙c / w(L) = {r.tolist()} is not constant"
    )
