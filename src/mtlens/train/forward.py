"""The model's forward pass for a run's tasks, shared by training steps and evaluation."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from ..errors import DataError

__all__ = ["AMP_DTYPES", "TaskForward", "batch_parts", "task_batch_parts"]

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
                x, target = task_batch_parts(self.spec, batch.get(t) if isinstance(batch, dict) else batch, t)
                z, pred = self.predict(x, [t])
                losses[t] = self.spec.tasks[t].loss(pred[t].float(), target)
                feats[t] = z
            return losses, feats
        x, targets = batch_parts(self.spec, batch, self.tasks)
        z, preds = self.predict(x, self.tasks)
        for t in self.tasks:
            losses[t] = self.spec.tasks[t].loss(preds[t].float(), targets[t])
        return losses, z


def batch_parts(spec: Any, batch: Any, tasks: list[str]) -> tuple[Any, Any]:
    """``(batch["input"], batch["targets"])`` of a single-input batch, checked to hold a target for each of ``tasks``.

    A batch of another form (a tuple from a ``TensorDataset``, a missing key or task) raises
    :class:`~mtlens.errors.DataError` naming the benchmark and the form its datasets must yield, instead of a
    bare ``TypeError``/``KeyError`` from inside the loop."""
    try:
        x, targets = batch["input"], batch["targets"]
        for t in tasks:
            targets[t]  # noqa: B018 - each task's target must be there
        return x, targets
    except (KeyError, TypeError, IndexError) as exc:
        raise _form_error(spec, batch, exc, '{"input": x, "targets": {task: y}} with a target for every task '
                          + str(list(tasks))) from None


def task_batch_parts(spec: Any, part: Any, task: str) -> tuple[Any, Any]:
    """``(part["input"], part["target"])`` of task ``task``'s batch on a multi-input benchmark (checked as
    :func:`batch_parts`)."""
    try:
        return part["input"], part["target"]
    except (KeyError, TypeError, IndexError) as exc:
        raise _form_error(spec, part, exc, f'{{"input": x, "target": y}} for task \'{task}\' (a multi-input '
                          "benchmark: each task's dataset yields its own inputs and target)") from None


def _form_error(spec: Any, batch: Any, exc: Exception, want: str) -> DataError:
    got = f"a {type(batch).__name__}"
    if isinstance(batch, dict):
        got += f" with keys {sorted(map(str, batch))}"
        if isinstance(batch.get("targets"), dict):
            got += f" (targets: {sorted(map(str, batch['targets']))})"
    return DataError(
        f"benchmark '{getattr(spec, 'name', '?')}': a batch must be {want}; got {got} "
        f"({type(exc).__name__}: {exc}). Make the datasets of its make_datasets yield that form "
        '(docs/benchmark.md, "Your own benchmark, model and method")'
    )
