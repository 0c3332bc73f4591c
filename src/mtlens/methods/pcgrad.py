"""PCGrad: project each task gradient onto the normal planes of the gradients it conflicts with."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ..engine.protocols import SCALE_FREE, Claim, GramianWeighting
from ._registry import register
from ._solvers import check_gramian, to_weights
from ._utils import Seeded, visiting_order_lists, visiting_orders


@register
class PCGrad(Seeded, GramianWeighting):
    """PCGrad ("gradient surgery"): sum of the task gradients after conflict projections.

    Reference: Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020,
    arXiv:2001.06782 (Algorithm 1).

    For each task i, ``g_i^PC`` starts at ``g_i``; the other tasks j ≠ i are visited in a
    random order drawn independently for every i, and whenever ``g_i^PC · g_j < 0`` (with the
    ORIGINAL ``g_j``) the projection ``g_i^PC ← g_i^PC − (g_i^PC·g_j / ‖g_j‖²) g_j`` is applied.
    The update is the SUM ``Σ_i g_i^PC`` (Algorithm 1; some ports use the mean).

    On the Gramian: every ``g_i^PC = Σ_k C_ik g_k`` is a combination of the original
    gradients; ``g_i^PC · g_j = (C G)_ij`` so the coefficient matrix C is tracked exactly and
    the returned weights are ``w = 1ᵀC``. For T = 2 the result never conflicts with either task.
    A zero gradient ``g_j`` is never projected on (its inner product is 0).

    Computation: row i of C depends on task i's own order alone, so all tasks' projections run at
    once, position by position in the orders (T − 1 vectorised steps on the T×T matrix C instead of
    T(T − 1) scalar ones; for T ≤ :data:`SMALL_T` the task-by-task loop in Python floats is faster and
    runs instead); each task still applies its projections in its own order, one after the
    other. The orders are drawn as by a task-by-task loop (one ``torch.randperm(T − 1)`` per task, in
    task order: :func:`~mtlens.methods._utils.visiting_orders`), so a seeded run gives the same orders
    (``last_orders``: T lists, list i the tasks i visited in order), the same projections and the same
    weights up to the rounding of the inner products (``tests/methods/test_decision_equivalence.py``
    checks both against the task-by-task loop). Where an inner product is zero up to round-off (a
    projected gradient that is numerically 0, e.g. collinear gradients), whether it counts as a
    conflict depends on the order of a dot product's additions, as it did on the BLAS build before.

    Args:
        seed: seed of the method's own ``torch.Generator`` for the visiting orders. ``None``
            (default) draws the seed from torch's global RNG at construction, so
            ``torch.manual_seed`` makes runs reproducible. The generator state is in
            ``state_dict()`` (:class:`~mtlens.methods._utils.Seeded`).

    Defaults and source: no hyper-parameters in the paper; random order per i, sum reduction
    as in Algorithm 1.
    """

    name = "pcgrad"
    reference = "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020, arXiv:2001.06782"
    defaults_source = "Algorithm 1 of the paper (random order per task, sum of projected gradients)"
    stateful = True

    claims = {
        "homogeneous": SCALE_FREE,
        "non_conflicting": Claim("Yu et al., NeurIPS 2020: for two tasks each projected gradient is orthogonal to "
                                 "the other task's, so their sum conflicts with neither", when="two_tasks"),
    }

    def __init__(self, seed: int | None = None) -> None:
        self._seed(seed)
        self._log: dict[str, float] = {}
        self.last_orders: list[list[int]] = []

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        G, _ = check_gramian(gramian, losses, self.name)
        T = G.shape[0]
        w: list[float] | np.ndarray
        if T <= SMALL_T:
            self.last_orders = visiting_order_lists(self.generator, T)
            w, n_proj = _project_task_by_task(G.tolist(), self.last_orders)
        else:
            orders = visiting_orders(self.generator, T)
            self.last_orders = orders.tolist()
            w, n_proj = _project_position_by_position(G, orders)
        self._log = {"projections": float(n_proj)}
        return to_weights(np.asarray(w), gramian)

    def log_values(self) -> dict[str, float]:
        return dict(self._log)


SMALL_T = 10
"""Up to this many tasks the projections (PCGrad's, GradVac's corrections) run task by task in Python floats;
above it, position by position in numpy. The two give the same projections and weights up to rounding; the
switch is where their times cross, measured as in ``benchmarks/decision_cost.py`` (each call between Gramian
products, the rows alternating): PCGrad 0.16 / 0.17 ms, GradVac 0.28 / 0.30 ms (Python / numpy) at T = 10;
0.20 / 0.18 ms and 0.37 / 0.34 ms at T = 12 (2-core development machine, shared)."""


def _project_task_by_task(G: list[list[float]], orders: list[list[int]]) -> tuple[list[float], int]:
    """Algorithm 1 as written, on the Gramian (T lists of T floats, symmetric): ``(w, projections)``, ``w = 1ᵀC``."""
    T = len(G)
    w = [0.0] * T
    n_proj = 0
    for i in range(T):
        c = [0.0] * T  # row i of C: g_i^PC = Σ_k c_k g_k
        c[i] = 1.0
        for j in orders[i]:
            gj = G[j]
            gjj = gj[j]
            if gjj <= 0.0:
                continue
            dot = sum([a * b for a, b in zip(c, gj)])  # g_i^PC · g_j
            if dot < 0.0:
                c[j] -= dot / gjj
                n_proj += 1
        for k in range(T):
            w[k] += c[k]
    return w, n_proj


def _project_position_by_position(G: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, int]:
    """The same projections for every task at once, one position of the orders at a time: ``(w, projections)``.

    ``G`` (T, T) float64 symmetric, ``orders`` (T, T-1) int64 (:func:`~mtlens.methods._utils.visiting_orders`).
    At position p every task i projects its current ``g_i^PC`` (row i of C) on the task ``orders[i, p]`` it
    visits there; row i depends on task i's own visits alone, so the T updates of a position are independent.
    """
    T = G.shape[0]
    C = np.eye(T)
    visits = orders.T  # (T-1, T): visits[p, i] is the task i visits at position p
    gathered = G[visits]  # (T-1, T, T): gathered[p, i] = (g_j · g_k)_k for j = visits[p, i]
    d = np.diag(G)[visits]  # ‖g_j‖² of the task each i visits
    positive = d > 0.0
    d_div = np.where(positive, d, np.inf)  # a zero gradient is never projected on: its coefficient is 0
    negative = np.empty((T - 1, T), dtype=bool)
    cells = np.arange(T) * T + visits  # flat indices of the entries (i, visits[p, i]) of C
    C_flat = C.reshape(-1)  # a view
    for p in range(T - 1):
        dots = np.einsum("ik,ik->i", C, gathered[p])  # g_i^PC · g_j = C[i] @ G[:, j]
        np.less(dots, 0.0, out=negative[p])
        # (g_i^PC·g_j / ‖g_j‖²) where it is negative, else 0 (subtracting 0 leaves C[i, j] exactly as it is)
        C_flat[cells[p]] -= np.minimum(dots, 0.0) / d_div[p]
    return C.sum(axis=0), int(np.count_nonzero(negative & positive))
