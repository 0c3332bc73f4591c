"""The record one engine step returns: what later layers need, without recomputation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class StepRecord:
    """Result of :func:`mtlens.engine.mtl_backward`.

    Attributes:
        task_names: task names in the order of every per-task tensor below.
        losses: raw task losses (T,), detached.
        objective_losses: the losses the method saw (after the loss transform), detached.
        weights: task weights (T,) the update used, or ``None`` for Jacobian aggregators that
            do not reduce to weights on the shared parameters.
        head_weights: weights (T,) of each task's gradient on its task-specific parameters
            (gradient methods; the method's head rule, docs/methods.md).
        level: "param", "feature" or "loss" (loss-level method, one backward).
        gramian: ``G = J Jᵀ`` (T×T, float64) at ``level`` when it was computed: the Jacobian of
            the losses the method saw (``objective_losses``, i.e. after the loss transform).
        saliencies: ``S_t = ∂L_t/∂Z`` of the RAW losses stacked (T, *Z.shape), detached, when
            computed (the loss transform is undone exactly).
        regularizer_values: named values the regularisers logged (λ-weighted totals included).
        method_values: scalars the method logged (solver iterations, ...).
        skipped: ``True`` when the step was skipped (non-finite policy ``"skip"`` or a
            GradScaler overflow); nothing was written into ``.grad`` then.
        reason: why the step was skipped.
    """

    task_names: list[str]
    losses: Tensor
    objective_losses: Tensor
    level: str
    weights: Tensor | None = None
    head_weights: Tensor | None = None
    gramian: Tensor | None = None
    saliencies: Tensor | None = None
    regularizer_values: dict[str, float] = field(default_factory=dict)
    method_values: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    reason: str = ""

    @property
    def grad_norms(self) -> Tensor | None:
        """Per-task gradient norms ``‖g_t‖`` at ``level`` (from the Gramian's diagonal)."""
        if self.gramian is None:
            return None
        return self.gramian.diagonal().clamp_min(0).sqrt()

    def to_dict(self, prefix: str = "") -> dict[str, Any]:
        """Plain floats, ready for JSONL/TensorBoard."""
        out: dict[str, Any] = {}
        for i, t in enumerate(self.task_names):
            out[f"{prefix}loss/{t}"] = float(self.losses[i])
            if self.weights is not None:
                out[f"{prefix}weight/{t}"] = float(self.weights[i])
        norms = self.grad_norms
        if norms is not None:
            for i, t in enumerate(self.task_names):
                out[f"{prefix}grad_norm/{t}"] = float(norms[i])
        for k, v in self.regularizer_values.items():
            out[f"{prefix}reg/{k}"] = float(v)
        for k, v in self.method_values.items():
            out[f"{prefix}method/{k}"] = float(v)
        if self.skipped:
            out[f"{prefix}skipped"] = 1.0
        return out

    def detach_(self) -> StepRecord:
        for name in ("losses", "objective_losses", "weights", "head_weights", "gramian", "saliencies"):
            v = getattr(self, name)
            if isinstance(v, torch.Tensor):
                setattr(self, name, v.detach())
        return self
