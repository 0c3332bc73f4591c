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
from ._utils import Seeded, in_range

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
        beta = self.beta
        C = np.eye(T)
        n_corr = 0
        for i in range(T):
            others = [j for j in range(T) if j != i]
            order = [others[k] for k in torch.randperm(len(others), generator=self.generator).tolist()]
            cg = C[i] @ G  # (g_i^PC · g_k) for every k
            for j in order:
                gjj = G[j, j]
                nrm_i2 = float(cg @ C[i])
                if gjj <= 0.0 or nrm_i2 <= 0.0:
                    continue
                nrm_i, nrm_j = math.sqrt(nrm_i2), math.sqrt(gjj)
                phi = max(-1.0, min(1.0, float(cg[j]) / (nrm_i * nrm_j)))
                target = float(phi_hat[i, j])
                sin_t = math.sqrt(max(0.0, 1.0 - target * target))
                if phi < target and sin_t > _MIN_SIN:
                    sin_p = math.sqrt(max(0.0, 1.0 - phi * phi))
                    coef = nrm_i * (target * sin_p - phi * sin_t) / (nrm_j * sin_t)
                    C[i, j] += coef
                    cg = cg + coef * G[j]
                    n_corr += 1
                phi_hat[i, j] = (1.0 - beta) * target + beta * phi
        self.steps += 1
        w = C.sum(axis=0)
        off = phi_hat[~np.eye(T, dtype=bool)]
        self._log = {"corrections": float(n_corr), "mean_target": float(off.mean()) if off.size else 0.0}
        return to_weights(w, gramian)

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
