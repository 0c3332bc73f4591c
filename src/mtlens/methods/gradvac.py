"""GradVac: raise pairwise gradient cosines towards EMA targets (Gradient Vaccine)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..engine.protocols import SCALE_FREE, GramianWeighting
from ..errors import ShapeError
from ._registry import register
from ._solvers import check_gramian, to_weights
from ._utils import Seeded, in_range, visiting_order_lists, visiting_orders
from .pcgrad import SMALL_T

_MIN_SIN = 1e-8  # a target cosine within ~5e-17 of 1 cannot be reached by a finite correction


@register
class GradVac(Seeded, GramianWeighting):
    """Gradient Vaccine: adaptive, EMA-targeted gradient alignment (a generalisation of PCGrad).

    Reference: Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving
    Multi-task Optimization in Massively Multilingual Models", ICLR 2021, arXiv:2010.05874.

    For each task i, ``g_i^PC`` starts at ``g_i`` and the other tasks j are visited in a random
    order drawn per i (as in PCGrad). With ``φ_ij = cos(g_i^PC, g_j)`` (ORIGINAL ``g_j``) and
    the EMA target ``φ̂_ij``: if ``φ_ij < φ̂_ij``,

        g_i^PC ← g_i^PC + ‖g_i^PC‖ (φ̂_ij √(1−φ_ij²) − φ_ij √(1−φ̂_ij²)) / (‖g_j‖ √(1−φ̂_ij²)) · g_j

    which makes the cosine exactly ``φ̂_ij``; then, at every visit, ``φ̂_ij ← (1−β) φ̂_ij + β φ_ij``
    (targets start at 0, so the first step equals PCGrad). The update is ``Σ_i g_i^PC``. All of
    it runs on the Gramian (``g_i^PC = Σ_k C_ik g_k``), the returned weights are ``w = 1ᵀC``.

    Computation: task i's corrections and target updates touch row i of C and of φ̂ alone, so, as in
    :class:`~mtlens.methods.pcgrad.PCGrad`, all tasks run at once, position by position in their orders
    (T − 1 vectorised steps; for T ≤ :data:`~mtlens.methods.pcgrad.SMALL_T` the task-by-task loop in Python
    floats, which is faster there). The orders are drawn as by the task-by-task loop
    (:func:`~mtlens.methods._utils.visiting_orders`), each task visits its others in its own order, and
    every visited pair's target is updated as in that loop, so a seeded run gives the same corrections,
    targets and weights up to the rounding of the inner products
    (``tests/methods/test_decision_equivalence.py`` checks them against the task-by-task loop).

    Granularity: this is the paper's whole-model variant (one cosine per task pair over all
    shared parameters, or over Z at feature level). The paper's experiments apply GradVac per
    layer (a separate φ̂ per parameter group); that variant needs the Jacobian blocks, not G,
    and is not what this class does.

    Differences from other codes, on purpose: LibMTL updates φ̂ only when a correction was
    applied; the paper's Algorithm 1 (and TorchJD) updates it at every visit, as here. A pair
    with a zero gradient (cosine undefined) is skipped and its target left unchanged (no
    ``+1e-8`` in denominators, which would make the method scale dependent).

    Args:
        beta: EMA rate β of the targets, in [0, 1]. Default 0.5: the project spec, LibMTL
            (``GradVac_beta=0.5``) and TorchJD use it. The paper leaves β as a hyper-parameter;
            other sources report a small rate (β = 1e-2, slowly moving targets) for its
            multilingual experiments — not confirmed here from the paper's text. Pass
            ``beta=0.01`` for that regime.
        seed: seed of the method's generator for the visiting orders (``None``: drawn from
            torch's global RNG at construction).

    State (``state_dict``): the T×T target matrix φ̂ (buffer ``phi_hat``, float64), the step
    count and the generator's state.
    """

    name = "gradvac"
    phi_hat: Tensor | None  # buffer
    reference = ("Wang et al., Gradient Vaccine: Investigating and Improving Multi-task Optimization in "
                 "Massively Multilingual Models, ICLR 2021, arXiv:2010.05874")
    defaults_source = "beta=0.5 (project spec; LibMTL GradVac_beta and TorchJD defaults)"
    stateful = True
    state_attrs = ("steps",)

    claims = {
        "homogeneous": SCALE_FREE,
    }

    def __init__(self, beta: float = 0.5, seed: int | None = None) -> None:
        self.beta = in_range("beta", beta, 0.0, 1.0, self.name)
        self._seed(seed)
        self.register_buffer("phi_hat", None)
        self.steps = 0
        self._log: dict[str, float] = {}

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        G, _ = check_gramian(gramian, losses, self.name)
        T = G.shape[0]
        if self.phi_hat is None:
            self.phi_hat = torch.zeros(T, T, dtype=torch.float64)
        elif self.phi_hat.shape != (T, T):
            raise ShapeError(f"gradvac: its EMA targets are for {self.phi_hat.shape[0]} tasks but the "
                             "Gramian "
                             f"has {T}; build a new method object for a different task set")
        phi_hat = self.phi_hat.numpy()  # a view: the updates below write the buffer
        w: list[float] | np.ndarray
        if T <= SMALL_T:
            w, n_corr = _vaccinate_task_by_task(G.tolist(), visiting_order_lists(self.generator, T), phi_hat,
                                                self.beta)
        else:
            w, n_corr = _vaccinate_position_by_position(G, visiting_orders(self.generator, T), phi_hat, self.beta)
        self.steps += 1
        off = phi_hat[~np.eye(T, dtype=bool)]
        self._log = {"corrections": float(n_corr), "mean_target": float(off.mean()) if off.size else 0.0}
        return to_weights(np.asarray(w), gramian)

    def log_values(self) -> dict[str, float]:
        return dict(self._log)


def _vaccinate_task_by_task(G: list[list[float]], orders: list[list[int]], phi_hat: np.ndarray,
                            beta: float) -> tuple[list[float], int]:
    """Algorithm 1 as written, on the Gramian (T lists of T floats, symmetric): ``(w, corrections)``.

    ``phi_hat`` (T, T) float64 is updated in place (every visited pair with both gradients non-zero).
    """
    T = len(G)
    targets = phi_hat.tolist()
    w = [0.0] * T
    n_corr = 0
    for i in range(T):
        c = [0.0] * T  # row i of C: g_i^PC = Σ_k c_k g_k
        c[i] = 1.0
        cg = list(G[i])  # (g_i^PC · g_k)_k
        row = targets[i]
        for j in orders[i]:
            gjj = G[j][j]
            nrm_i2 = sum([a * b for a, b in zip(cg, c)])
            if gjj <= 0.0 or nrm_i2 <= 0.0:
                continue
            nrm_i, nrm_j = math.sqrt(nrm_i2), math.sqrt(gjj)
            phi = max(-1.0, min(1.0, cg[j] / (nrm_i * nrm_j)))
            target = row[j]
            sin_t = math.sqrt(max(0.0, 1.0 - target * target))
            if phi < target and sin_t > _MIN_SIN:
                sin_p = math.sqrt(max(0.0, 1.0 - phi * phi))
                coef = nrm_i * (target * sin_p - phi * sin_t) / (nrm_j * sin_t)
                c[j] += coef
                cg = [a + coef * b for a, b in zip(cg, G[j])]
                n_corr += 1
            row[j] = (1.0 - beta) * target + beta * phi
        for k in range(T):
            w[k] += c[k]
    phi_hat[...] = targets
    return w, n_corr


def _vaccinate_position_by_position(G: np.ndarray, orders: np.ndarray, phi_hat: np.ndarray,
                                    beta: float) -> tuple[np.ndarray, int]:
    """The same corrections for every task at once, one position of the orders at a time: ``(w, corrections)``.

    ``G`` (T, T) float64 symmetric, ``orders`` (T, T-1) int64 (:func:`~mtlens.methods._utils.visiting_orders`),
    ``phi_hat`` (T, T) float64 updated in place. At position p every task i treats the task ``orders[i, p]`` it
    visits there; row i of C, of ``C G`` and of φ̂ depend on task i's own visits alone.
    """
    T = G.shape[0]
    C = np.eye(T)
    CG = G.copy()  # row i: (g_i^PC · g_k)_k
    rows = np.arange(T)
    visits = orders.T  # (T-1, T): visits[p, i] is the task i visits at position p
    gathered = G[visits]  # (T-1, T, T): gathered[p, i] = (g_j · g_k)_k for j = visits[p, i]
    d = np.diag(G)[visits]
    positive = d > 0.0
    nrm_j = np.sqrt(np.where(positive, d, 1.0))  # used only where positive
    # Each pair (i, j) is visited once in a call: its target is the one from before the call.
    targets = phi_hat[rows, visits]  # (T-1, T)
    sin_t = np.sqrt(np.maximum(0.0, 1.0 - targets * targets))
    reachable = sin_t > _MIN_SIN
    den = nrm_j * np.where(reachable, sin_t, 1.0)  # ‖g_j‖ sin φ̂ where a correction can happen
    live = np.empty((T - 1, T), dtype=bool)  # both gradients non-zero: the cosine exists, the target moves
    phis = np.empty((T - 1, T))
    corrected = np.empty((T - 1, T), dtype=bool)
    cells = rows * T + visits  # flat indices of the entries (i, visits[p, i]) of a T×T matrix
    C_flat, CG_flat = C.reshape(-1), CG.reshape(-1)  # views
    for p in range(T - 1):
        nrm_i2 = np.einsum("ik,ik->i", CG, C)  # ‖g_i^PC‖²
        ok = np.logical_and(positive[p], nrm_i2 > 0.0, out=live[p])
        nrm_i = np.sqrt(np.where(ok, nrm_i2, 1.0))
        phi = np.maximum(CG_flat[cells[p]] / (nrm_i * nrm_j[p]), -1.0, out=phis[p])
        np.minimum(phi, 1.0, out=phi)
        target = targets[p]
        hit = np.logical_and(ok & reachable[p], phi < target, out=corrected[p])
        sin_p = np.sqrt(np.maximum(0.0, 1.0 - phi * phi))
        coef = np.where(hit, nrm_i * (target * sin_p - phi * sin_t[p]) / den[p], 0.0)
        C_flat[cells[p]] += coef  # adding 0 leaves the rows without a correction exactly as they are
        CG += coef[:, None] * gathered[p]
    phi_hat[rows, visits] = np.where(live, (1.0 - beta) * targets + beta * phis, targets)
    return C.sum(axis=0), int(np.count_nonzero(corrected))
