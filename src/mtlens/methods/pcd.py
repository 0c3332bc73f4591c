"""PCD (Priority-Constrained Descent): follow the primary task, guarantee progress on the others."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..engine.numerics import ZERO_REL
from ..engine.protocols import GramianWeighting
from ..errors import ConfigurationError, ShapeError, SolverError, require
from ._registry import register
from ._solvers import check_gramian, to_weights
from ._utils import check, in_range

INFEASIBLE = ("primary", "raise")
EIG_RTOL = 1e-13
"""Eigenvalues of the cosine matrix of the normalised gradients below ``EIG_RTOL · λ_max`` are dropped from the
coordinates."""


@register
class PCD(GramianWeighting):
    """Priority-Constrained Descent: task 0 is the primary objective, the others get a guaranteed share.

    Reference: "Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
    Multi-Objective Optimization", TMLR 2026 (openreview.net/forum?id=HT01yGHLEt,
    arXiv:2606.29521); reference code github.com/DaraVaram/priority-constrained-descent; also
    TorchJD 0.18's ``PCD`` aggregator, against which this is tested. With the normalised
    gradients ``g̃_i = s_i g_i``, ``s_i = 1/√(v̂_i + ε)`` (``v̂_i``: bias-corrected EMA of
    ``‖g_i‖²`` with decay β over the calls)::

        d̃ = argmin_d ½‖d − g̃_1‖²   s.t.   g̃_jᵀ d ≥ τ_j ‖g̃_j‖²,  j = 2..T,

    and the update is d̃ rescaled to ‖g_1‖. By the KKT conditions ``d̃ = g̃_1 + Σ_j μ_j g̃_j``
    (μ ≥ 0), so the weights are ``w = (1, μ) ⊙ s · ‖g_1‖/‖d̃‖``.

    Solver (ours): the QP is solved exactly on the unit gradients ``ĝ_j = g̃_j/‖g̃_j‖`` (constraint
    ``ĝ_jᵀd ≥ τ_j‖g̃_j‖``, so each task is on its own scale), in the coordinates of their cosine
    matrix's eigenbasis (``R Rᵀ``, R's rows the unit gradients in an r-dimensional orthonormal basis
    of their span), with the Goldfarb–Idnani dual active-set method of ``quadprog`` (identity
    Hessian, so strictly convex); its Lagrange multipliers divided by ``‖g̃_j‖`` are μ. TorchJD
    solves the same QP with its own dual active-set iteration written on G; the reference code
    enumerates working sets.

    The task order matters: put the primary task first. Special cases (as TorchJD): ``g_1 = 0``
    gives a zero update; a zero secondary gradient's constraint ``0 ≥ 0`` always holds (μ = 0);
    when the constraints contradict each other (T ≥ 3, e.g. two opposite secondary gradients)
    ``infeasible="primary"`` (default, TorchJD's behaviour) drops them and follows g_1
    (``log_values()["pcd/infeasible"] = 1``), ``infeasible="raise"`` raises SolverError.

    Hyper-parameters (defaults, TorchJD 0.18 ``PCD``): ``tau=0.02`` (a float, or one value per
    secondary task), ``beta=0.999``, ``eps=1e-8`` (absolute, added to the EMA: it makes the
    weights depend on the scale of gradients of norm ≲ 1e-4). Needs ``quadprog`` (extra ``qp``).
    """

    name = "pcd"
    ema: Tensor | None  # buffer
    reference = ("Priority-Constrained Descent for Hierarchical Multi-Objective Optimization, TMLR 2026, "
                 "arXiv:2606.29521")
    defaults_source = "tau = 0.02, beta = 0.999, eps = 1e-8 (TorchJD 0.18 PCD, after the reference code)"
    stateful = True
    state_attrs = ("_steps",)
    head_rule = "own gradient, unit weights (TorchJD's mtl_backward, the library PCD ships in)"

    disclaims = {
        "homogeneous": "eps = 1e-8 added to the EMA of squared norms (TorchJD, reference code) is absolute",
        "permutation_invariant": "task 0 is the primary objective by definition",
    }

    def __init__(self, tau: float | Sequence[float] = 0.02, beta: float = 0.999, eps: float = 1e-8,
                 infeasible: str = "primary") -> None:
        require("quadprog", "qp", "pcd")
        if isinstance(tau, (int, float)) and not isinstance(tau, bool):
            self.tau: float | tuple[float, ...] = in_range("tau", tau, 0.0, 1.0, self.name)
        else:
            try:
                taus = tuple(float(t) for t in tau)  # type: ignore[union-attr]
            except TypeError as exc:
                raise ConfigurationError(f"pcd: tau must be a number in [0, 1] or a list of them, got {tau!r}") from exc
            check(len(taus) > 0 and all(0.0 <= t <= 1.0 for t in taus),
                  f"pcd: every tau must be in [0, 1], got {list(taus)}")
            self.tau = taus
        check(isinstance(beta, (int, float)) and 0.0 <= beta < 1.0, f"pcd: beta must be in [0, 1), got {beta!r}")
        check(isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0,
              f"pcd: eps must be a finite number ≥ 0, got {eps!r}")
        check(infeasible in INFEASIBLE, f"pcd: infeasible={infeasible!r}; choose one of {INFEASIBLE}")
        self.beta, self.eps, self.infeasible = float(beta), float(eps), infeasible
        self.register_buffer("ema", None)  # EMA of the squared gradient norms (T,), float64
        self._steps = 0
        self._log: dict[str, float] = {}

    def _taus(self, T: int) -> np.ndarray:
        if isinstance(self.tau, float):
            return np.full(T - 1, self.tau)
        if len(self.tau) != T - 1:
            raise ShapeError(f"pcd: tau has {len(self.tau)} values but there are {T - 1} secondary tasks")
        return np.asarray(self.tau, dtype=np.float64)

    def _scales(self, sq: np.ndarray) -> np.ndarray:
        T = sq.shape[0]
        if self.ema is None:
            self.ema, self._steps = torch.zeros(T, dtype=torch.float64), 0
        elif self.ema.shape[0] != T:
            raise ShapeError(f"pcd: built up its moving average for {self.ema.shape[0]} tasks, got {T}; create a "
                             "new method object for a different task set")
        self._steps += 1
        ema = self.beta * self.ema.numpy() + (1.0 - self.beta) * sq
        self.ema = torch.from_numpy(ema)
        den = np.sqrt(ema / (1.0 - self.beta ** self._steps) + self.eps)
        return np.where(den > 0, 1.0 / np.where(den > 0, den, 1.0), 0.0)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        G, _ = check_gramian(gramian, losses, self.name)
        T = G.shape[0]
        taus = self._taus(T)
        sq = np.clip(np.diag(G), 0.0, None)
        s = self._scales(sq)
        self._log = {"pcd/infeasible": 0.0, "pcd/active": 0.0}
        w = np.zeros(T)
        if not sq[0] > 0.0:
            return to_weights(w, gramian)
        Gn = G * np.outer(s, s)
        mult = self._solve(Gn, taus)
        dsq = float(mult @ Gn @ mult)
        magnitude = float(np.abs(mult) @ np.sqrt(np.clip(np.diag(Gn), 0.0, None))) ** 2
        if dsq > 10 * np.finfo(np.float64).eps * magnitude:
            w = mult * s * math.sqrt(sq[0] / dsq)
        self._log["pcd/active"] = float((mult[1:] > 0).sum())
        return to_weights(w, gramian)

    def _solve(self, Gn: np.ndarray, taus: np.ndarray) -> np.ndarray:
        import quadprog

        T = Gn.shape[0]
        mult = np.zeros(T)
        mult[0] = 1.0
        diag = np.clip(np.diag(Gn), 0.0, None)
        sec = np.flatnonzero(diag[1:] > ZERO_REL * diag.max()) + 1  # the secondary tasks with a gradient
        if not sec.size:
            return mult
        # on the unit gradients ĝ_j = g̃_j/n_j (n_j = ‖g̃_j‖): the constraint j reads ĝ_jᵀd ≥ τ_j n_j and
        # its multiplier λ_j gives μ_j = λ_j/n_j; every task on its own scale, so norms 1e12 apart (a
        # gradient below 1e-4, where eps sets its scale) are solved as accurately as equal ones
        live = np.concatenate(([0], sec))
        n = np.sqrt(diag[live])
        Cn = Gn[np.ix_(live, live)] / np.outer(n, n)
        lam, V = np.linalg.eigh(0.5 * (Cn + Cn.T))
        keep = lam > EIG_RTOL * lam.max()
        R = V[:, keep] * np.sqrt(lam[keep])  # rows: the unit gradients in an orthonormal basis of their span
        C = R[1:].T
        b = taus[sec - 1] * n[1:]
        a = n[0] * R[0]  # g̃_1
        if bool((C.T @ a >= b).all()):
            return mult  # g̃_1 already satisfies every constraint
        try:
            _, _, _, _, lagr, _ = quadprog.solve_qp(np.eye(R.shape[1]), a.copy(), C.copy(), b.copy(), 0)
        except ValueError as exc:  # "constraints are inconsistent, no solution"
            if self.infeasible == "raise":
                raise SolverError(
                    f"pcd: the priority constraints cannot all hold ({exc}); pass infeasible='primary' to follow "
                    "the primary gradient in that case (TorchJD's behaviour)") from exc
            self._log["pcd/infeasible"] = 1.0
            return mult
        mult[sec] = np.clip(lagr, 0.0, None) / n[1:]
        return mult

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
