"""MOML: multi-objective meta learning of the task weights (bilevel, one inner step)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..engine.protocols import Claim, LossWeighting
from ._calls import MetaStepCalls
from ._loss_common import InternalOptimizer, TaskCount, check_num_tasks, float_dtype
from ._registry import register
from ._solvers import min_norm_simplex
from ._utils import positive


def _cross(rows_a: list[list[Tensor]], rows_b: list[list[Tensor]]) -> np.ndarray:
    """``M[i, j] = ⟨a_i, b_j⟩`` over all parameter blocks, in float64."""
    Ta, Tb = len(rows_a), len(rows_b)
    M = torch.zeros(Ta, Tb, dtype=torch.float64)
    for k in range(len(rows_a[0])):
        A = torch.stack([r[k].reshape(-1) for r in rows_a]).to(torch.float64)
        B = torch.stack([r[k].reshape(-1) for r in rows_b]).to(torch.float64)
        M += (A @ B.T).cpu()
    return M.numpy()


@register
class MOML(LossWeighting):
    """MOML: task weights ``softmax(α)``, α updated by a multi-objective (MGDA) hypergradient step.

    Reference: Ye, Lin, Wang, Zhang & Kwok (Ye et al.), "Multi-Objective Meta Learning",
    NeurIPS 2021 (Artificial Intelligence 2024); we follow LibMTL's implementation
    (``bacth_forward_MOML`` in ``LibMTL/trainer.py``, github.com/median-research-group/LibMTL,
    one inner step). Before each step, with ``s = softmax(α)`` and ``g_f`` the per-task
    gradients of the training losses (all parameters):

    1. inner step ``θ' = θ − η_in Σ_t s_t g_{f,t}`` (plain SGD);
    2. per-task validation gradients ``g_{F,t}`` at θ' on an independent batch;
    3. hypergradient of each outer objective, ``∇_α F_t = −η_in g_{F,t} g_fᵀ J_softmax(α)`` (T×T);
    4. MGDA on these T hypergradients (rows normalised to unit ℓ2 norm, LibMTL's
       ``ntype='l2'``; exact min-norm point of their convex hull) gives the common descent
       direction of α; one Adam step on α with it.

    The step then differentiates ``Σ_t softmax(α)_t L_t`` on its own batch. LibMTL draws the
    inner and outer batches as two half-size training batches and updates the model on a third,
    full-size one; the mtlens trainer (``needs_lookahead``) uses the step's own batch as the inner
    batch and one independent full-size batch as the outer one. Extra cost per step: 2 forward
    and 2T backward passes.

    Hyper-parameters (defaults, LibMTL ``config.py``): ``inner_lr=0.1`` (``--inner_lr``),
    ``outer_lr=1e-3`` (``--outer_lr``, Adam on α), α starts at 1/T (uniform weights).
    """

    name = "moml"
    reference = "Ye et al., Multi-Objective Meta Learning, NeurIPS 2021 (AIJ 2024)"
    defaults_source = "inner_lr = 0.1, outer_lr = 1e-3 (Adam), α = 1/T (LibMTL config.py / trainer.py)"
    stateful = True
    state_attrs = ("_alpha", "_tasks")
    needs_lookahead = True

    claims = {
        "permutation_invariant": Claim("equal initial α = 1/T; the weights softmax(α) treat the tasks alike"),
        "weights_total": Claim("the weights are softmax(α) (LibMTL's MOML)", total="1"),
    }

    def __init__(self, inner_lr: float = 0.1, outer_lr: float = 1e-3, num_tasks: int | None = None) -> None:
        self.inner_lr = positive("inner_lr", inner_lr, self.name)
        self.outer_lr = positive("outer_lr", outer_lr, self.name)
        self._tasks = TaskCount(self.name, check_num_tasks(num_tasks, self.name))
        self._alpha = InternalOptimizer(self, "alpha", self.outer_lr, 0.0, 0.0)
        self._log: dict[str, float] = {}
        self._meta_calls = MetaStepCalls(self.name)

    def _a(self, T: int, like: Tensor) -> Tensor:
        self._tasks.bind(T)
        return self._alpha.ensure(T, like.device, float_dtype(like.dtype), init=1.0 / T)

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        return torch.softmax(self._a(losses.shape[0], losses).detach(), dim=0).to(losses.dtype)

    def combine(self, losses: Tensor, grad_norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._meta_calls.weighting_call()  # a step without meta_step: raises on the second in a row
        return super().combine(losses, grad_norms)

    def meta_step(self, lookahead: Any) -> None:
        self._meta_calls.meta_step_called()
        la = lookahead
        L_tr = la.train_losses()
        T = L_tr.shape[0]
        s = torch.softmax(self._a(T, L_tr).detach().to(torch.float64), dim=0)
        g_f = [la.grads(L_tr[t], retain_graph=t < T - 1) for t in range(T)]
        with torch.no_grad():
            step = [sum(float(s[t]) * g_f[t][k] for t in range(T)) for k in range(len(la.params))]
        theta1 = [(p - self.inner_lr * g).detach() for p, g in zip(la.params, step)]  # plain SGD (LibMTL)
        with la.at(theta1):
            L_val = la.val_losses()
            g_F = [la.grads(L_val[t], retain_graph=t < T - 1) for t in range(T)]
        J_soft = (torch.diag(s) - torch.outer(s, s)).numpy()
        H = -self.inner_lr * _cross(g_F, g_f) @ J_soft  # row t: ∇_α F_t
        n = np.linalg.norm(H, axis=1)
        Hn = np.where(n[:, None] > 0, H / np.where(n[:, None] > 0, n[:, None], 1.0), 0.0)
        sol = min_norm_simplex(Hn @ Hn.T).weights
        grad = torch.as_tensor(sol @ Hn, dtype=torch.float64)
        self._alpha.step(grad)
        alpha = self._alpha.value
        assert alpha is not None  # created by weights(), just updated
        w = torch.softmax(alpha.detach(), dim=0)
        self._log = {**{f"moml/weight/{t}": float(v) for t, v in enumerate(w.cpu())},
                     "moml/hypergrad_norm": float(np.linalg.norm(sol @ Hn))}

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
