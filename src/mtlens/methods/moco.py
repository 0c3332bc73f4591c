"""MoCo: momentum-tracked task gradients and simplex weights updated by a projected step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..engine.decision import Decision
from ..engine.gramian import combine_blocks, gramian_from_blocks
from ..engine.numerics import ZERO_REL
from ..engine.protocols import SYMMETRIC, Claim, JacobianAggregator
from ..errors import ConfigurationError, NonFiniteError, ShapeError
from ._registry import register
from ._utils import check, check_block_shapes, in_range, nonzero_rows, positive

if TYPE_CHECKING:
    from ..engine.gradients import TaskGradients
from .db_mtl import check_blocks, task_sq_norms

NORMALIZE = ("loss", "l2", "none")


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v`` (T,) onto the probability simplex (sort-based, exact).

    As :func:`mtlens.methods._cross.project_simplex` (Duchi et al., ICML 2008): shifted by its
    maximum first, so entries of any size project to within ``4 T eps`` of the exact result (1e17
    next to 1 raised a raw error before). Raises :class:`~mtlens.errors.NonFiniteError` on a
    non-finite ``v``."""
    if not bool(torch.isfinite(v).all()):
        raise NonFiniteError(f"moco: simplex projection of a non-finite vector {v.tolist()}")
    z = v - v.max()
    T = z.shape[0]
    u, _ = torch.sort(z, descending=True)
    css = torch.cumsum(u, 0) - 1.0
    k = torch.arange(1, T + 1, dtype=v.dtype, device=v.device)
    cond = (u - css / k > 0) & torch.isfinite(css)  # an overflowed css (±1e308 entries) fails exactly, not +inf
    rho = int(torch.nonzero(cond).max())  # index 0 always passes: u_0 = 0, css_0 = −1
    theta = css[rho] / (rho + 1)
    return (z - theta).clamp_min(0.0)


@register
class MoCo(JacobianAggregator):
    """MoCo: multi-objective gradient correction with momentum-tracked task gradients.

    Reference: Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023, arXiv:2210.04883,
    Algorithm 1. At step ``k = 1, 2, ...``::

        h_t = normalised g_t                     (see ``normalize``)
        y_t ← y_t − β_k (y_t − h_t),             β_k = β / k^{β_σ}   (y starts at 0)
        λ   ← Π_Δ(λ − γ_k (Y Yᵀ + ρ I) λ),       γ_k = γ / k^{γ_σ}   (λ starts at 1/T)
        d   = Σ_t λ_t y_t

    ``Π_Δ`` is the Euclidean projection onto the simplex, as in the paper (LibMTL replaces it
    by a softmax of the updated vector; we follow the paper). Task-specific (head) parameters
    get their own task's gradient with unit weight (``head_rule``; LibMTL, whose MoCo corrects the
    shared parameters only — the paper's Algorithm 1 treats all parameters as one vector, which
    would need tracked head gradients; we follow the code). The decision's ``weights`` are ``λ``.

    Hyper-parameters (defaults, from the authors' code as shared in LibMTL): ``beta=0.5``,
    ``beta_sigma=0.5``, ``gamma=0.1``, ``gamma_sigma=0.5``, ``rho=0.0``;
    ``normalize="loss"``: ``h_t = g_t / ‖g_t‖ · L_t`` as in that code (the paper's Algorithm 1
    uses the raw ``g_t`` = ``normalize="none"``; ``"l2"`` gives unit gradients). ``"loss"``
    needs non-negative losses. A zero gradient stays zero under normalisation.

    Parameter level only (``levels = ("param",)``, as LibMTL): tracking representation gradients
    across batches would average unrelated samples.

    Stateful: ``y`` (blocks), ``λ`` and the step count are in ``state_dict()``; blocks of a new
    shape raise :class:`ShapeError` (call :meth:`reset` to restart deliberately).
    """

    name = "moco"
    lam: Tensor | None  # buffer
    levels = ("param",)
    reference = "Fernando et al., Mitigating Gradient Bias in Multi-objective Learning, arXiv:2210.04883"
    defaults_source = "beta, beta_sigma, gamma, gamma_sigma, rho, loss normalisation: authors' code (LibMTL)"
    stateful = True
    state_attrs = ("_step", "_y")
    head_rule = "own gradient, unit weights (LibMTL's MoCo corrects the shared parameters only)"
    loss_transforms = ("none",)  # with the default normalize='loss'; any transform with 'l2' / 'none'
    loss_transform_conflict = (
        "normalize='loss' scales each task gradient by its loss, which must be non-negative, and "
        "log-transformed losses log(L_t + 1e-8) are negative whenever L_t < 1; use normalize='l2' or 'none'"
    )

    claims = {
        "permutation_invariant": SYMMETRIC,
        "homogeneous": Claim("Fernando et al., MoCo: the default normalisation h_t = g_t/‖g_t‖·L_t removes the "
                             "gradients' scale", degree=0),
    }

    def loss_transform_problem(self, transform: str) -> str | None:
        """Log losses conflict only with ``normalize='loss'`` (the default)."""
        return self.loss_transform_conflict if transform == "log" and self.normalize == "loss" else None

    def __init__(self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
                 gamma_sigma: float = 0.5, rho: float = 0.0, normalize: str = "loss") -> None:
        self.beta = in_range("beta", beta, 0.0, 1.0, self.name)
        check(self.beta > 0.0, f"{self.name}: beta must be > 0 (beta = 0 never tracks the gradients)")
        self.beta_sigma = in_range("beta_sigma", beta_sigma, 0.0, 100.0, self.name)
        self.gamma = positive("gamma", gamma, self.name)
        self.gamma_sigma = in_range("gamma_sigma", gamma_sigma, 0.0, 100.0, self.name)
        self.rho = in_range("rho", rho, 0.0, float("inf"), self.name)
        check(normalize in NORMALIZE, f"{self.name}: normalize={normalize!r}; choose one of {NORMALIZE}")
        self.normalize = normalize
        self.register_buffer("lam", None)
        self.reset()

    def reset(self) -> None:
        """Forget the tracked gradients and the weights; restart the step count."""
        self._step = 0
        self._y: list[Tensor] | None = None
        self.lam = None  # buffer: the weights λ (T,), float64
        self.last_weights: Tensor | None = None

    def _normalised(self, blocks: list[Tensor], losses: Tensor) -> list[Tensor]:
        if self.normalize == "none":
            return blocks
        T = blocks[0].shape[0]
        sq = task_sq_norms(blocks)
        _, live = nonzero_rows(sq, ZERO_REL)
        scale = torch.where(live, 1.0 / sq.clamp_min(1e-300).sqrt(), torch.zeros_like(sq))
        if self.normalize == "loss":
            L = torch.as_tensor(losses, dtype=torch.float64).reshape(-1).to(scale.device)
            if L.shape[0] != T:
                raise ShapeError(f"{self.name}: {L.shape[0]} losses for {T} tasks")
            if bool((L < 0).any()) or not bool(torch.isfinite(L).all()):
                raise ConfigurationError(
                    f"{self.name}: normalize='loss' scales each gradient by its loss and needs finite "
                    f"non-negative losses, got {L.tolist()}; use normalize='l2' or 'none'"
                )
            scale = scale * L
        return [b * scale.to(b.dtype).reshape(T, *([1] * (b.ndim - 1))) for b in blocks]

    def decide(self, grads: TaskGradients) -> Decision:
        combined, head_w = self.aggregate(grads.jacobian_blocks(), grads.objective_losses)
        assert self.lam is not None  # aggregate() sets it
        return Decision(combined=combined, head_weights=head_w, weights=self.lam.clone(),
                        values=self.log_values())

    def aggregate(self, jacobian: Sequence[Tensor], losses: Tensor) -> tuple[list[Tensor], Tensor]:
        blocks = check_blocks(jacobian, self.name)
        T = blocks[0].shape[0]
        if self._y is not None:
            check_block_shapes(self._y, blocks, self.name,
                               "the tracked gradients no longer match. Use one instance per model and level, "
                               "or reset().")
        else:
            self._y = [torch.zeros_like(b) for b in blocks]
            self.lam = torch.full((T,), 1.0 / T, dtype=torch.float64)
        h = self._normalised(blocks, losses)
        self._step += 1
        beta_k = self.beta / self._step ** self.beta_sigma
        gamma_k = self.gamma / self._step ** self.gamma_sigma
        prev = [y.to(g.device, g.dtype) for y, g in zip(self._y, h)]
        self._y = [y - beta_k * (y - g) for y, g in zip(prev, h)]
        Gy = gramian_from_blocks(self._y).cpu()
        lam = self.lam
        assert lam is not None  # created with the tracked gradients on the first step
        step = gamma_k * (Gy @ lam + self.rho * lam)
        self.lam = project_simplex(lam - step)
        self.last_weights = self.lam.clone()
        combined = combine_blocks(self.lam.to(blocks[0].device), self._y)
        return combined, torch.ones(T, dtype=torch.float64)

    def log_values(self) -> dict[str, float]:
        if self.lam is None:
            return {}
        return {f"moco/lambda_{t}": float(v) for t, v in enumerate(self.lam)}
