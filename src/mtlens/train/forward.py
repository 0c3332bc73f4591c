"""The model's forward pass for a run's tasks, shared by training steps and evaluation."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

__all__ = ["AMP_DTYPES", "TaskForward"]

AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``train.amp`` → autocast dtype (None: no autocast)."""


class TaskForward:
    """Encode, decode and score a batch: ``Z = model.encode(x)``, one head per task, per-task losses.

    Single-input batches are ``{"input", "targets": {task: y}}``; multi-input batches are
    ``{task: {"input", "target"}}`` (one input batch per task). Predictions are cast to float32
    before the losses and metrics; dense tasks are decoded at the input's spatial size.

    Args:
        model: an :class:`~mtlens.models.HPSModel` (``encode``/``decode``).
        spec: the :class:`~mtlens.tasks.BenchmarkSpec` (losses, ``dense``).
        tasks: the tasks trained (all of the benchmark's, or one for a single-task run).
        multi_input: the benchmark's batches carry one input per task.
        device: where the model lives (the autocast device type).
        amp: ``"off"``, ``"bf16"`` or ``"fp16"`` (:data:`AMP_DTYPES`).
    """

    def __init__(self, model: Any, spec: Any, tasks: list[str], multi_input: bool, device: torch.device,
                 amp: str = "off") -> None:
        self.model, self.spec, self.tasks, self.multi_input = model, spec, tasks, multi_input
        self.device = device
        self.amp_dtype = AMP_DTYPES[amp]

    def autocast(self) -> Any:
        """The autocast context of ``train.amp`` (a no-op context when off)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def predict(self, x: torch.Tensor, tasks: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(Z, {task: prediction})`` for input ``x`` under autocast."""
        with self.autocast():
            z = self.model.encode(x)
            out_size = tuple(x.shape[-2:]) if self.spec.dense else None
            return z, self.model.decode(z, tasks=tasks, out_size=out_size)

    def losses(self, batch: Any) -> tuple[dict[str, torch.Tensor], Any]:
        """Per-task losses of a training batch and the shared representation(s) the heads consumed:
        ``Z`` (single input) or ``{task: Z_task}`` (multi-input, explicit for the engine)."""
        losses: dict[str, torch.Tensor] = {}
        if self.multi_input:
            feats = {}
            for t in self.tasks:
                z, pred = self.predict(batch[t]["input"], [t])
                losses[t] = self.spec.tasks[t].loss(pred[t].float(), batch[t]["target"])
                feats[t] = z
            return losses, feats
        z, preds = self.predict(batch["input"], self.tasks)
        for t in self.tasks:
            losses[t] = self.spec.tasks[t].loss(preds[t].float(), batch["targets"][t])
        return losses, z
