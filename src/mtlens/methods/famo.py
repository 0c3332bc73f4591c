"""FAMO: fast adaptive multitask optimisation, loss weights from logits updated by the loss decrease."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.protocols import Claim, LossWeighting
from ..errors import ConfigurationError, ShapeError
from ._calls import AfterStepCalls
from ._loss_common import InternalOptimizer, TaskCount, as_vector, check_num_tasks
from ._registry import register
from ._utils import check, positive

EPS = 1e-8


@register
class FAMO(LossWeighting):
    """FAMO: weights ``w_t = c·z_t/(L_t − b_t + ε)``, ``z = softmax(ξ)``, ``c = (Σ_t z_t/(L_t − b_t + ε))⁻¹``.

    Reference: Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
    arXiv:2306.03792 (Algorithm 2, Appendix C). The update ``Σ_t w_t ∇L_t`` equals the gradient
    of the paper's objective ``c·Σ_t z_t log(L_t − b_t + ε)`` with ``c`` held constant; the
    weights sum to 1. ``b`` is the lower bound of each loss (``min_losses``, 0 by default).

    After ``optimizer.step()``, call :meth:`after_step` with the losses of the updated model on
    the same batch (one extra forward; ``needs_extra_forward = True``). It computes
    ``δ_t = log(L_t^before − b_t + ε) − log(L_t^after − b_t + ε)`` and takes one Adam step on the
    logits with gradient ``∇_ξ softmax(ξ)ᵀ δ`` and weight decay γ. That Adam is internal: its
    state is in :meth:`state_dict`; do not add anything of FAMO's to your optimiser. A loop that
    steps the optimiser twice in a row without calling :meth:`after_step` raises
    :class:`~mtlens.errors.ConfigurationError` naming it. With gradient accumulation (several
    weighting calls before one optimiser step) the last call's losses are the "before" losses.

    Not defined for log-transformed losses (``loss_transforms = ("none",)``): FAMO takes the log
    of each loss itself.

    Defaults: ``lr = 0.025`` (logit step size β, paper and official code) and ``gamma = 1e-3``
    (decay γ of Algorithm 2, also LibMTL's default; the official code's class default is 1e-5),
    ``min_losses = 0``, ``ε = 1e-8`` (official code).
    """

    name = "famo"
    prev_losses: Tensor | None  # buffer
    reference = "Liu et al., FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023, arXiv:2306.03792"
    defaults_source = "lr 0.025 (paper, official code), gamma 1e-3 (paper Alg. 2, LibMTL)"
    stateful = True
    state_attrs = ("_logits", "_tasks")
    needs_extra_forward = True
    user_calls = ("after_step",)
    loss_transforms = ("none",)
    loss_transform_conflict = (
        "FAMO takes the log of each loss itself (log(L_t − min_loss_t)), so log-transformed losses "
        "log(L_t + 1e-8) would be logged twice, and they are negative (below min_losses=0) whenever L_t < 1"
    )

    claims = {
        "permutation_invariant": Claim("equal initial logits; the weights treat the tasks alike"),
        "weights_total": Claim("Liu et al., NeurIPS 2023: c = (Σ_t z_t/(L_t − b_t))⁻¹ normalises the weights",
                               total="1"),
        "rescaling_invariant": Claim("Liu et al., NeurIPS 2023: the update is the gradient of Σ_t z_t log L_t (with b "
                                     "= 0), free of each loss's scale up to ε = 1e-8"),
    }

    def __init__(self, lr: float = 0.025, gamma: float = 1e-3, min_losses: float | Sequence[float] = 0.0,
                 num_tasks: int | None = None):
        self.lr = positive("lr", lr, "famo")
        check(isinstance(gamma, (int, float)) and gamma >= 0 and gamma == gamma and gamma != float("inf"),
              f"famo: gamma (weight decay of the logits) must be a finite number >= 0, got {gamma!r}")
        check_num_tasks(num_tasks, "famo")
        if isinstance(min_losses, (int, float)) and not isinstance(min_losses, bool):
            check(min_losses == min_losses and abs(min_losses) != float("inf"),
                  f"famo: min_losses must be finite, got {min_losses!r}")
            self._min = torch.tensor([float(min_losses)], dtype=torch.float64)
        elif isinstance(min_losses, bool):
            raise ConfigurationError(f"famo: min_losses must be a number or one per task, got {min_losses!r}")
        else:
            self._min = as_vector(min_losses, "famo", "min_losses").to("cpu", torch.float64)
        self._tasks = TaskCount("famo", num_tasks)
        if self._min.numel() > 1:
            check(num_tasks in (None, self._min.numel()),
                  f"famo: min_losses has {self._min.numel()} entries but num_tasks={num_tasks}")
            self._tasks.bind(self._min.numel())
        self._logits = InternalOptimizer(self, "logits", lr=self.lr, weight_decay=float(gamma), init=0.0)  # buffer
        if num_tasks is not None:
            self._logits.ensure(num_tasks, torch.device("cpu"), torch.float32)
        self.register_buffer("prev_losses", None)  # the losses of the last weighting call, awaiting after_step
        self._calls = AfterStepCalls("famo", lambda: self.prev_losses is not None)

    def _shifted(self, losses: Tensor, what: str) -> Tensor:
        b = self._min.to(device=losses.device, dtype=torch.float64)
        d = losses.to(torch.float64) - b + EPS
        if bool((d <= 0).any()):
            raise ConfigurationError(
                f"famo: {what} {losses.tolist()} are not above min_losses {self._min.tolist()}; FAMO takes "
                "log(L_t − min_loss_t), so min_losses must be a lower bound of each loss (for losses that can be "
                "negative, e.g. a Gaussian negative log-likelihood, set min_losses to its lower bound); do not "
                "log-transform the losses for FAMO (loss_transform='none')"
            )
        return d

    def _z(self, T: int, device: torch.device) -> Tensor:
        xi = self._logits.ensure(T, torch.device("cpu"), torch.float32)  # T numbers: kept on the CPU
        return torch.softmax(xi.detach().to(torch.float64), dim=0).to(device)

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        self._calls.weighting_call()
        T = self._tasks.bind(losses.shape[0])
        d = self._shifted(losses.detach(), "losses")
        z = self._z(T, losses.device)
        w = z / d
        w = w / w.sum()  # c·z/D with c = 1/Σ(z/D)
        self.prev_losses = losses.detach().clone()
        return w.to(losses.dtype)

    def after_step(self, new_losses: Tensor) -> None:
        if self.prev_losses is None:
            raise ConfigurationError(
                "famo: after_step() needs the losses of a previous weighting call (mtl_backward/combine) "
                "on the same batch; call it once per step, after optimizer.step()"
            )
        new = as_vector(new_losses, "famo", "new_losses").to(self.prev_losses.device)
        if new.shape != self.prev_losses.shape:
            raise ShapeError(f"famo: after_step got {new.shape[0]} losses for {self.prev_losses.shape[0]} tasks")
        delta = torch.log(self._shifted(self.prev_losses, "losses")) - torch.log(self._shifted(new, "new_losses"))
        z = self._z(self.prev_losses.shape[0], self.prev_losses.device)
        grad = z * (delta - (z * delta).sum())  # (∂softmax(ξ)/∂ξ)ᵀ δ
        self._logits.step(grad)
        self.prev_losses = None
        self._calls.after_step_called()

    def log_values(self) -> dict[str, float]:
        if self._logits.value is None:
            return {}
        return {f"logit/{i}": float(v) for i, v in enumerate(self._logits.value.detach().cpu())}
