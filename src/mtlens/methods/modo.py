"""MoDo: multi-objective gradient with double sampling (weights from two batches)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._cross import CrossGramianWeighting, project_simplex
from ._registry import register
from ._utils import check, positive


@register
class MoDo(CrossGramianWeighting):
    """MoDo: ``λ ← Π_Δ(λ − γ (A λ + ρ λ))`` with the cross-Gramian ``A`` of two independent batches.

    Reference: Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning:
    Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023 (JMLR 2024),
    arXiv:2305.20057, Algorithm 1 (Eq. 2.9): ``A = J_ξ J_ξ'ᵀ`` from two independent mini-batches
    is an unbiased estimate of ``G``, so the projected gradient step on ``½ λᵀGλ + ρ/2 ‖λ‖²``
    is unbiased ("double sampling"). ``λ`` starts at 1/T and persists across steps; the update
    is ``Σ_t λ_t ∇L_t(ζ)`` on the step's own batch ζ (the three-batch form of the authors'
    ``three_grads=True``, LibMTL and TorchJD's second example — their two-batch form updates with
    ``λ`` on the sum of the ξ and ξ' gradients instead; the engine differentiates the
    weighted loss sum, so the heads get the same weights). No normalisation of A (as the
    authors' code and TorchJD): γ acts on the gradients' scale.

    Needs a second batch (``needs_second_batch``): **two extra forward passes and 2T extra
    backward passes per step**.

    Hyper-parameters (defaults, the authors' code — ``gamma_modo=0.1``, ``rho_modo=0.1`` in
    ``LibMTL/LibMTL/weighting/MoDo.py`` of github.com/heshandevaka/Trade-Off-MOL — and TorchJD 0.18
    ``MoDoWeighting``): ``gamma=0.1`` (γ), ``rho=0.1`` (ρ). The weights sum to 1.
    """

    name = "modo"
    reference = ("Chen et al., Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and "
                 "Conflict-Avoidance, NeurIPS 2023, arXiv:2305.20057")
    defaults_source = "gamma = 0.1, rho = 0.1 (authors' code, Trade-Off-MOL; TorchJD 0.18 MoDoWeighting)"

    def __init__(self, gamma: float = 0.1, rho: float = 0.1) -> None:
        super().__init__()
        self.gamma = positive("gamma", gamma, self.name)
        check(isinstance(rho, (int, float)) and rho >= 0, f"modo: rho must be ≥ 0, got {rho!r}")
        self.rho = float(rho)

    def observe_cross_gramian(self, cross_gramian: Tensor) -> None:
        A = self._check(cross_gramian)
        assert self.lam is not None  # set by _check
        lam = self.lam.numpy()
        new = project_simplex(lam - self.gamma * (A @ lam + self.rho * lam))
        self.lam, self.out = torch.from_numpy(new), torch.from_numpy(new.copy())
        self._log = {f"modo/lambda/{t}": float(x) for t, x in enumerate(self.out)}
