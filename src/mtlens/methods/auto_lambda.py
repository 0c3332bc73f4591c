"""Auto-Lambda: task weights learned by a one-step look-ahead on a validation batch (bilevel)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..engine.protocols import Claim, LossWeighting
from ..errors import ShapeError
from ._calls import MetaStepCalls
from ._loss_common import InternalOptimizer, TaskCount, check_num_tasks, float_dtype
from ._registry import register
from ._utils import check, positive

FD_RADIUS = 0.01
"""Finite-difference radius ε = 0.01 / ‖∇_θ' L_val‖ of the authors' ``compute_hessian``."""


@register
class AutoLambda(LossWeighting):
    """Auto-Lambda: λ minimises the validation loss after one virtual training step (bilevel).

    Reference: Liu, James, Davison & Johns, "Auto-Lambda: Disentangling Dynamic
    Task Relationships", TMLR 2022, arXiv:2202.03091; we follow the authors' code
    (github.com/lorenmt/auto-lambda, ``auto_lambda.py`` and ``trainer_dense.py``). Before each step:

    1. virtual step ``θ' = θ − α (m + ∇_θ Σ_t λ_t L_t^{tr}(θ) + wd·θ)`` with the optimiser's
       learning rate α, momentum buffer term m and weight decay (all parameters, heads included);
    2. ``d = ∇_θ' Σ_{t ∈ primary} L_t^{val}(θ')`` on an independent batch;
    3. ``∇_λ L^{val}(θ') ≈ −α ∇²_{λθ} L^{tr} d``, the mixed second derivative by central finite
       differences, ``(∇_λ L^{tr}(θ + εd) − ∇_λ L^{tr}(θ − εd)) / 2ε`` with ``ε = 0.01/‖d‖`` —
       and since ``Σ λ_t L_t`` is linear in λ, ``∇_λ L^{tr} = (L_t^{tr})_t``;
    4. one Adam step on λ with that gradient.

    The step then differentiates ``Σ_t λ_t L_t`` on its own batch (λ not normalised; the heads get
    the same weights). The validation batch: as the authors, an independent batch of the
    training set ("a copy of train_loader with different data order"); the mtlens trainer draws
    it from a second seeded stream (``needs_lookahead``). Extra cost per step: 4 forward and
    2 backward passes (one of them a full backward at θ').

    Hyper-parameters (defaults, the authors' ``trainer_dense.py``): ``init=0.1``
    (``--autol_init``), ``lr=1e-4`` (``--autol_lr``, Adam), ``primary=None`` (every task is primary:
    ``--task all``, the multi-task setting; a list of task indices for auxiliary learning),
    ``num_tasks`` (None: λ is created at the first call). LibMTL's port parameterises the
    weights by a softmax and uses ``outer_lr=1e-3``; we keep the authors' raw λ.
    """

    name = "auto_lambda"
    reference = "Liu et al., Auto-Lambda: Disentangling Dynamic Task Relationships, TMLR 2022, arXiv:2202.03091"
    defaults_source = "init = 0.1, lr = 1e-4 (Adam), all tasks primary (authors' trainer_dense.py)"
    stateful = True
    state_attrs = ("_lam", "_tasks")
    needs_lookahead = True

    claims = {
        "permutation_invariant": Claim("equal initial λ (the authors' code)"),
    }

    def __init__(self, init: float = 0.1, lr: float = 1e-4, primary: Sequence[int] | None = None,
                 num_tasks: int | None = None) -> None:
        self.init = positive("init", init, self.name)
        self.lr = positive("lr", lr, self.name)
        if primary is not None:
            primary = [int(i) for i in primary]
            check(len(primary) > 0 and len(set(primary)) == len(primary) and min(primary) >= 0,
                  f"auto_lambda: primary must be a non-empty list of distinct task indices, got {primary!r}")
        self.primary = primary
        self._tasks = TaskCount(self.name, check_num_tasks(num_tasks, self.name))
        self._lam = InternalOptimizer(self, "lambda", self.lr, 0.0, self.init)
        self._log: dict[str, float] = {}
        self._meta_calls = MetaStepCalls(self.name)

    def _lambda(self, T: int, like: Tensor) -> Tensor:
        self._tasks.bind(T)
        if self.primary is not None and max(self.primary) >= T:
            raise ShapeError(f"auto_lambda: primary task index {max(self.primary)} but only {T} tasks")
        return self._lam.ensure(T, like.device, float_dtype(like.dtype))

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        return self._lambda(losses.shape[0], losses).detach().to(losses.dtype).clone()

    def combine(self, losses: Tensor, grad_norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._meta_calls.weighting_call()  # a step without meta_step: raises on the second in a row
        return super().combine(losses, grad_norms)

    def meta_step(self, lookahead: Any) -> None:
        self._meta_calls.meta_step_called()
        la = lookahead
        L_tr = la.train_losses()
        T = L_tr.shape[0]
        lam = self._lambda(T, L_tr).detach()
        g = la.grads((lam.to(L_tr.dtype) * L_tr).sum())
        theta1 = la.sgd_step(g)
        with la.at(theta1):
            L_val = la.val_losses()
            idx = list(range(T)) if self.primary is None else self.primary
            d = la.grads(L_val[idx].sum())
        norm = float(torch.sqrt(sum((x.double() ** 2).sum() for x in d)))
        if not norm > 0.0:  # the validation loss is flat at θ': no signal for λ this step
            self._log = {"auto_lambda/hessian_norm": 0.0}
            return
        eps = FD_RADIUS / norm
        with torch.no_grad():
            plus = [p + eps * x for p, x in zip(la.params, d)]
            minus = [p - eps * x for p, x in zip(la.params, d)]
            with la.at(plus):
                lp = la.train_losses().detach().to(torch.float64)
            with la.at(minus):
                lm = la.train_losses().detach().to(torch.float64)
        hess = (lp - lm) / (2.0 * eps)
        self._lam.step(-la.lr * hess)
        updated = self._lam.value
        assert updated is not None  # created by weights(), just updated
        self._log = {"auto_lambda/hessian_norm": float(hess.norm()),
                     **{f"auto_lambda/lambda/{t}": float(v) for t, v in enumerate(updated.detach().cpu())}}

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
