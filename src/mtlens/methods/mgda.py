"""MGDA: the exact min-norm point of the convex hull of the task gradients (Sener & Koltun 2018)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..engine.protocols import SCALE_FREE, SYMMETRIC, Claim, GramianWeighting
from ..errors import ConfigurationError
from . import _solvers
from ._registry import register
from ._solvers import check_gramian, min_norm_simplex, to_weights

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
_FLOAT_TYPES = (torch.float32, torch.float64)
APPLY_TO = ("normalized", "raw")


@register
class MGDA(GramianWeighting):
    """MGDA: update = the minimum-norm point of the convex hull of the (normalised) task gradients.

    Reference: Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018, arXiv:1810.04650 (MGDA of Désidéri 2012). "MGDA-UB" of the paper is this
    method at ``level="feature"`` (gradients w.r.t. the shared representation Z, one encoder
    backward) — there is no separate registry entry.

    The sub-problem ``min_{w ∈ Δ} wᵀ G̃ w`` is solved EXACTLY (Wolfe's finite active-set
    algorithm, :func:`mtlens.methods._solvers.min_norm_simplex`), not by the approximate
    Frank–Wolfe loop of the official code / LibMTL / TorchJD, and certified per task: every task's
    KKT condition ``g_i·d ≥ ‖d‖² − 1e-13·‖g_i‖·Σ_k w_k‖g_k‖`` holds on its own scale (gradient norms
    1e12 apart alike; ``kkt_gap`` in the log), otherwise :class:`~mtlens.errors.SolverError`. When several weight
    vectors give the same min-norm point, the one of least ‖w‖ is returned (deterministic,
    permutation equivariant; it also sets the heads' weights).

    Args:
        normalization: gradient normalisation before the min-norm problem, as in the official
            code's ``gradient_normalizers``: ``"none"`` (default), ``"l2"`` (g_t/‖g_t‖),
            ``"loss"`` (g_t/L_t), ``"loss+"`` (g_t/(L_t‖g_t‖)). Implemented on the Gramian:
            ``G̃ = N⁻¹ G N⁻¹`` with ``N = diag(n_t)``. ``"loss"``/``"loss+"`` need positive
            losses (a ConfigurationError otherwise). A zero gradient keeps ``n_t = L_t`` (loss+)
            or 1 (l2) so nothing divides by zero.
        apply_to: ``"normalized"`` (default): the update is the min-norm point of the
            normalised gradients, ``Σ_t λ_t g_t/n_t``, i.e. returned weights ``w_t = λ_t/n_t``
            (LibMTL's behaviour). ``"raw"``: the official code's behaviour — the min-norm
            coefficients λ are applied to the raw losses (``w_t = λ_t``; the normalisation only
            changes which λ is found; the paper calls the normalisation optional).

    Defaults and sources: ``normalization="none"`` as in LibMTL (``mgda_gn='none'``) and the
    paper's equations (the paper does not normalise); note that the official repository's
    ``sample.json`` uses ``"loss+"`` (pass ``normalization="loss+", apply_to="raw"`` to match
    that code). Weights sum to 1 in λ (convex combination), like the official code.
    """

    name = "mgda"
    head_rule = ("own gradient, unit weights (paper, Algorithm 2: θ^t ← θ^t − η∇_{θ^t}L^t; the authors' code "
                 "scales the heads by the MGDA weights — we follow the paper)")
    reference = ("Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018, "
                 "arXiv:1810.04650")
    defaults_source = "normalization='none' (LibMTL mgda_gn default; the paper does not normalise)"

    claims = {
        "permutation_invariant": SYMMETRIC,
        "homogeneous": SCALE_FREE,
        "non_conflicting": Claim("Désidéri 2012; Sener & Koltun 2018: the min-norm point of the convex hull has G w* ≥ "
                                 "‖d‖² (KKT)"),
        "rescaling_invariant": Claim("the min-norm point of the unit gradients (normalization='l2')",
                                     hparams={"normalization": "l2"}),
    }

    def __init__(self, normalization: str = "none", apply_to: str = "normalized") -> None:
        if normalization not in NORMALIZATIONS:
            raise ConfigurationError(f"mgda: normalization={normalization!r}; choose one of {NORMALIZATIONS}")
        if apply_to not in APPLY_TO:
            raise ConfigurationError(f"mgda: apply_to={apply_to!r}; choose one of {APPLY_TO}")
        self.normalization = normalization
        self.apply_to = apply_to
        self._log: dict[str, float] = {}

    def _normalizers(self, G: np.ndarray, L: np.ndarray) -> np.ndarray:
        T = G.shape[0]
        if self.normalization == "none":
            return np.ones(T)
        norms = np.sqrt(np.clip(np.diag(G), 0.0, None))
        if self.normalization in ("loss", "loss+") and not np.all(L > 0):
            raise ConfigurationError(
                f"mgda: normalization='{self.normalization}' divides by the task losses and needs them "
                f"positive, got {L.tolist()} (a log loss transform makes losses negative). Use "
                "normalization='l2' or 'none'."
            )
        if self.normalization == "l2":
            return np.where(norms > 0, norms, 1.0)
        if self.normalization == "loss":
            return L.copy()
        return L * np.where(norms > 0, norms, 1.0)  # loss+

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        if self.normalization == "none":
            fast = self._weights_all_tasks(gramian, losses)
            if fast is not None:
                return fast
        G, L = check_gramian(gramian, losses, self.name)
        if self.normalization == "none":  # G̃ = G, w = λ: no arithmetic
            res = min_norm_simplex(G, relative=True)
            w = res.weights
        else:
            n = self._normalizers(G, L)
            res = min_norm_simplex(G / np.outer(n, n), relative=True)
            w = res.weights / n if self.apply_to == "normalized" else res.weights
        self._log = {"min_norm_sq": float(res.value), "solver_iterations": float(res.iterations),
                     "kkt_gap": float(res.kkt_gap), "clipped_eigenvalue": float(res.clipped_eigenvalue)}
        return to_weights(w, gramian)

    def _weights_all_tasks(self, gramian: Tensor, losses: Tensor) -> Tensor | None:
        """The common case without numpy: a finite CPU Gramian of 2–12 tasks (``SMALL_T``), every task in the
        optimal support (two tasks: the closed form, :func:`mtlens.methods._solvers._min_norm_two_tasks_floats`),
        ``normalization="none"``: the same validation (finite, symmetrised as
        ``0.5·G + 0.5·Gᵀ``, finite losses of length T) and the solver's plain-float path with its certificate
        (:func:`mtlens.methods._solvers._min_norm_all_tasks_floats`). ``None`` — the general route, which
        also raises the errors — for anything else. Inside a training step each numpy call on the T×T
        arrays costs ~5 µs after the backward passes; this path makes none."""
        if not (isinstance(gramian, Tensor) and isinstance(losses, Tensor) and gramian.device.type == "cpu"
                and gramian.ndim == 2 and 2 <= gramian.shape[0] <= _solvers.SMALL_T
                and gramian.shape[0] == gramian.shape[1]
                and losses.numel() == gramian.shape[0] and losses.device.type == "cpu"
                and gramian.dtype in _FLOAT_TYPES and losses.dtype in _FLOAT_TYPES):
            return None
        # tolist() of a float32/float64 tensor gives exactly its float64 values (no detach or float64 copy needed)
        raw = gramian.tolist()
        T = len(raw)
        if not all(math.isfinite(x) for row in raw for x in row):
            return None
        if not all(math.isfinite(x) for x in (losses.tolist() if losses.ndim == 1 else losses.reshape(-1).tolist())):
            return None
        G = [[0.5 * raw[i][j] + 0.5 * raw[j][i] for j in range(T)] for i in range(T)]
        s = max(G[i][i] for i in range(T))
        if not s > 0.0:
            return None
        solve = _solvers._min_norm_two_tasks_floats if T == 2 else _solvers._min_norm_all_tasks_floats
        out = solve(G, s, 1e-13, True)
        if out is None:
            return None
        w, value, gap, _ = out
        self._log = {"min_norm_sq": value, "solver_iterations": 1.0, "kkt_gap": gap, "clipped_eigenvalue": 0.0}
        return torch.tensor(w, dtype=torch.float64)

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
