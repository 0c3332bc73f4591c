"""Smooth Tchebycheff scalarisation (STCH) of nadir-normalised log losses, after a log-sum warm-up."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.protocols import SYMMETRIC, Claim, LossWeighting
from ..errors import ConfigurationError
from ._calls import EpochCalls
from ._loss_common import TaskCount, as_vector, check_int
from ._registry import register
from ._utils import positive

EPS = 1e-8


@register
class STCH(LossWeighting):
    """Smooth Tchebycheff: ``T·μ·log Σ_t exp(f_t/μ)`` with ``f_t = log(L_t/n_t + ε)``.

    Reference: Lin et al., "Smooth Tchebycheff Scalarization for Multi-Objective Optimization",
    ICML 2024, arXiv:2402.19078. The paper's ``g_μ(x|λ) = μ log Σ_i exp(λ_i (f_i(x) − z_i*)/μ)``
    is applied, as in the authors' multi-task code (STCH_MTL, built on LibMTL), with uniform
    preferences, to the log of the losses normalised by a nadir vector ``n`` (so the ideal point
    of the normalised log losses is the constant 0, which cancels in the gradient) and scaled
    by T.

    Schedule (the authors' code): for epochs ``0 … warmup_epochs`` the objective is
    ``Σ_t log(L_t + ε)``; the epoch-mean losses of epoch ``warmup_epochs`` (reported through
    :meth:`on_epoch_end`) become the nadir vector ``n``, and STCH is used from the next epoch
    on. Passing ``nadir`` skips the warm-up and uses STCH from the first step.
    ``steps_per_epoch`` (optional, e.g. ``len(loader)``) lets STCH check that
    :meth:`on_epoch_end` is called during the warm-up (more than one call beyond an epoch without
    it raises :class:`~mtlens.errors.ConfigurationError`); without it the first call warns once.

    Not defined for log-transformed losses (``loss_transforms = ("none",)``): STCH takes the log
    of each loss itself.

    Defaults: ``mu = 1.0`` and ``warmup_epochs = 4`` (the authors' code, ``STCH_mu`` and
    ``STCH_warmup_epoch``). ``ε = 1e-8`` (the authors' code uses 1e-20; the difference matters
    only for losses within 1e-8 of 0). The logged weights are ``∂objective/∂L_t``.
    """

    name = "stch"
    nadir: Tensor | None  # buffer
    reference = "Lin et al., Smooth Tchebycheff Scalarization, ICML 2024, arXiv:2402.19078"
    defaults_source = "mu 1.0, warmup_epochs 4 (authors' STCH_MTL code config)"
    stateful = True
    state_attrs = ("_epoch", "_tasks", "_calls")
    user_calls = ("on_epoch_end",)
    loss_transforms = ("none",)
    loss_transform_conflict = (
        "STCH takes the log of each (nadir-normalised) loss itself, so log-transformed losses would be logged "
        "twice, and they are negative whenever L_t < 1"
    )

    claims = {
        "permutation_invariant": SYMMETRIC,
        "rescaling_invariant": Claim("the warm-up objective Σ_t log(L_t + ε) has the update Σ_t ∇L_t / (L_t + ε) "
                                     "(Lin et al., ICML 2024), free of each loss's scale up to ε = 1e-8"),
    }

    def __init__(self, mu: float = 1.0, warmup_epochs: int = 4, nadir: Sequence[float] | None = None,
                 num_tasks: int | None = None, steps_per_epoch: int | None = None):
        self.mu = positive("mu", mu, "stch")
        self.warmup_epochs = check_int("warmup_epochs", warmup_epochs, 0, "stch")
        if steps_per_epoch is not None:
            check_int("steps_per_epoch", steps_per_epoch, 1, "stch")
        self._calls = EpochCalls("stch", steps_per_epoch, "takes its nadir vector from the epoch-mean losses at the "
                                                           "end of the warm-up and stays in the warm-up until then")
        self._tasks = TaskCount("stch", num_tasks)
        if nadir is not None:
            n = as_vector(nadir, "stch", "nadir").to("cpu", torch.float64)
            if bool((n <= 0).any()):
                raise ConfigurationError(
                    f"stch: nadir must be positive (losses are divided by it), got {n.tolist()}")
            self._tasks.bind(n.shape[0])
        self.register_buffer("nadir", None if nadir is None else n)  # set at the end of the warm-up
        self._epoch = 0

    @property
    def in_warmup(self) -> bool:
        return self.nadir is None

    def on_epoch_end(self, mean_losses: Tensor) -> None:
        v = as_vector(mean_losses, "stch", "mean_losses").to("cpu", torch.float64)
        self._tasks.bind(v.shape[0])
        if self.nadir is None and self._epoch == self.warmup_epochs:
            if bool((v <= 0).any()):
                raise ConfigurationError(
                    f"stch: the nadir vector (epoch-mean losses of epoch {self._epoch}) must be positive, "
                    f"got {v.tolist()}; STCH normalises the losses by it"
                )
            self.nadir = v.clone()
        self._epoch += 1
        self._calls.epoch_ended()

    def objective(self, losses: Tensor) -> Tensor:
        self._tasks.bind(losses.shape[0])
        if bool((losses.detach() < 0).any()):
            raise ConfigurationError(
                f"stch: needs non-negative losses (it takes their log), got {losses.detach().tolist()}")
        if self.nadir is None:
            return torch.log(losses + EPS).sum()
        n = self.nadir.to(device=losses.device, dtype=losses.dtype)
        f = torch.log(losses / n + EPS)
        return losses.shape[0] * self.mu * torch.logsumexp(f / self.mu, dim=0)

    def weights(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        with torch.enable_grad():
            leaf = losses.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self.objective(leaf), leaf)
        return g

    def combine(self, losses: Tensor, grad_norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._calls.weighting_call(active=self.in_warmup)
        return self.objective(losses), self.weights(losses)

    def log_values(self) -> dict[str, float]:
        return {"warmup": float(self.in_warmup)}
