"""GradNorm: loss weights learnt so that the weighted gradient norms follow the tasks' training rates."""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.protocols import Claim, LossWeighting
from ..errors import ConfigurationError, NonFiniteError, ShapeError
from ._loss_common import InternalOptimizer, TaskCount, check_num_tasks
from ._registry import register
from ._utils import check, positive


@register
class GradNorm(LossWeighting):
    """GradNorm: learn ``w`` by minimising ``L_grad = Σ_t |w_t‖∇_W L_t‖ − Ḡ·r_t^α|``, then ``Σ_t w_t = T``.

    Reference: Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in
    Deep Multitask Networks", ICML 2018, arXiv:1711.02257 (Algorithm 1). ``W`` is the last shared
    layer: the engine measures the unweighted norms ``‖∇_W L_t‖`` there
    (``needs_grad_norms = True``; choose the layer with ``mtl_backward(grad_norm_params=...)``).
    ``Ḡ = mean_t w_t‖∇_W L_t‖`` and the targets ``Ḡ·r_t^α`` are constants;
    ``r_t = L̃_t / mean(L̃)`` with ``L̃_t = L_t / L_t(0)``, where ``L_t(0)`` are the losses of the
    first call. Each call returns the current weights ``w(t)`` (used for this step's update) and
    then moves them to ``w(t+1)``, as in Algorithm 1.

    Defaults: ``alpha = 1.5`` (the paper's NYUv2 value, LibMTL's default). The paper gives no
    separate optimiser or learning rate for ``w``; ``w`` is trained here by an internal Adam
    with ``lr = 0.025`` — our choice (the logit step size FAMO uses for its loss weights), stated
    as such; LibMTL instead trains ``w`` with the model's optimiser. Not in the paper:
    ``min_weight = 1e-3`` floors each weight before renormalising, because the paper's
    ``‖∇(w_t L_t)‖ = w_t‖∇L_t‖`` holds only for ``w_t > 0`` (LibMTL keeps positivity through a
    softmax parametrisation instead).
    """

    name = "gradnorm"
    initial_losses: Tensor | None  # buffer
    reference = "Chen et al., GradNorm, ICML 2018, arXiv:1711.02257"
    defaults_source = "alpha 1.5 (paper NYUv2, LibMTL); lr 0.025 and min_weight 1e-3 are mtlens choices"
    stateful = True
    state_attrs = ("_w", "_steps", "_tasks")
    needs_grad_norms = True
    loss_transforms = ("none",)
    loss_transform_conflict = (
        "GradNorm's training rates are ratios of losses to the first step's losses, L_t/L_t(0), which need "
        "positive losses, and log-transformed losses log(L_t + 1e-8) are negative whenever L_t < 1"
    )

    claims = {
        "weights_total": Claim("Chen et al., ICML 2018: the weights are renormalised to sum to T after every step",
                               total="T"),
    }

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, min_weight: float = 1e-3,
                 num_tasks: int | None = None):
        check(isinstance(alpha, (int, float)) and 0 <= alpha < float("inf"),
              f"gradnorm: alpha (the asymmetry) must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.lr = positive("lr", lr, "gradnorm")
        self.min_weight = positive("min_weight", min_weight, "gradnorm")
        check(self.min_weight < 1, f"gradnorm: min_weight must be < 1 (weights sum to T), got {min_weight!r}")
        check_num_tasks(num_tasks, "gradnorm")
        self._tasks = TaskCount("gradnorm", num_tasks)
        self._w = InternalOptimizer(self, "task_weights", lr=self.lr, weight_decay=0.0, init=1.0)  # buffer
        if num_tasks is not None:
            self._w.ensure(num_tasks, torch.device("cpu"), torch.float32)
        self.register_buffer("initial_losses", None)
        self._steps = 0
        self._last_lgrad = float("nan")

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        if grad_norms is None:
            raise ConfigurationError(
                "gradnorm needs the per-task gradient norms on the last shared layer: call it through "
                "mtl_backward(..., shared_params=...) (the engine measures them) or pass grad_norms=(T,) "
                "yourself"
            )
        T = self._tasks.bind(losses.shape[0])
        L = losses.detach().to("cpu", torch.float64)
        n = grad_norms.detach().to("cpu", torch.float64).reshape(-1)
        if n.shape[0] != T:
            raise ShapeError(f"gradnorm: got {n.shape[0]} gradient norms for {T} losses")
        if not bool(torch.isfinite(n).all()) or bool((n < 0).any()):
            raise NonFiniteError(f"gradnorm: gradient norms must be finite and >= 0, got {n.tolist()}")
        if self.initial_losses is not None and bool((L <= 0).any()):
            raise ConfigurationError(
                f"gradnorm: the loss ratios L_t/L_t(0) need positive losses at every step, got {L.tolist()}; "
                "with loss_transform='log' a loss below 1 has a negative log and the ratio r_t^alpha is NaN. "
                "Use loss_transform='none' with gradnorm."
            )
        if self.initial_losses is None:
            if bool((L <= 0).any()):
                raise ConfigurationError(
                    f"gradnorm: the first losses {L.tolist()} are its L_t(0) and are divided by; they must "
                    "be > 0 (with loss_transform='log' a loss below 1 is negative: use loss_transform='none')"
                )
            self.initial_losses = L.clone()
        w_param = self._w.ensure(T, torch.device("cpu"), torch.float32)
        w_now = w_param.detach().clone()

        ratio = L / self.initial_losses
        r = ratio / ratio.mean()
        with torch.enable_grad():
            w = w_param.to(torch.float64)
            G = w * n
            target = (G.mean() * r.pow(self.alpha)).detach()
            l_grad = (G - target).abs().sum()
            (grad,) = torch.autograd.grad(l_grad, w_param)
        self._w.step(grad)
        with torch.no_grad():
            w_param.clamp_(min=self.min_weight)
            w_param.mul_(T / w_param.sum())
        self._last_lgrad = float(l_grad.detach())
        self._steps += 1
        return w_now.to(device=losses.device, dtype=losses.dtype)

    def log_values(self) -> dict[str, float]:
        return {} if self._steps == 0 else {"l_grad": self._last_lgrad}
