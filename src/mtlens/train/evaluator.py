"""Evaluation: per-task metrics and losses, and their comparison with the single-task baseline.

* :class:`TaskEvaluator` accumulates predictions in the torchmetrics shape — :meth:`~TaskEvaluator.reset`,
  :meth:`~TaskEvaluator.update` per batch, :meth:`~TaskEvaluator.compute` at the end — for every
  task's declared metrics (``TaskSpec.make_metrics``) and its mean loss.
* :func:`evaluate` runs a model over a split's loaders into an evaluator.
* :class:`BaselineComparison` turns metrics into Δ (the three named conventions of
  :mod:`mtlens.tasks.delta`), the model-selection score and the per-task scores PIVRG-like methods
  receive. Metric directions come from the benchmark spec (``BenchmarkSpec.metric_directions``),
  nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigurationError, DataError
from ..tasks.delta import compute_deltas, delta_p_task, relative_improvements
from .forward import TaskForward, batch_parts, task_batch_parts
from .loaders import to_device

__all__ = ["BaselineComparison", "TaskEvaluator", "evaluate"]


class TaskEvaluator:
    """Metrics and mean losses of a run's tasks over one pass of a split.

    >>> import torch
    >>> from mtlens.tasks import get_benchmark
    >>> ev = TaskEvaluator(get_benchmark("multimnist"), ["left", "right"])
    >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])  # 3 samples, the first 2 of 10 classes
    >>> logits = torch.cat([logits, torch.full((3, 8), -9.0)], dim=1)
    >>> for task in ("left", "right"):
    ...     ev.update(task, logits, torch.tensor([0, 1, 1]))
    >>> ev.compute()["metrics"]["left"]  # accuracy in percent: 2 of 3
    {'acc': 66.66666...}
    """

    def __init__(self, spec: Any, tasks: list[str]) -> None:
        self.spec, self.tasks = spec, list(tasks)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._meters = {t: self.spec.tasks[t].make_metrics() for t in self.tasks}
        for m in self._meters.values():
            m.reset()
        self._loss_sum = dict.fromkeys(self.tasks, 0.0)
        self._count = dict.fromkeys(self.tasks, 0)

    def update(self, task: str, pred: torch.Tensor, target: Any) -> None:
        """Add a batch of ``task``'s predictions (any float dtype; scored in float32) and targets."""
        pred = pred.float()
        self._meters[task].update(pred, target)
        n = int(target.shape[0])
        self._loss_sum[task] += float(self.spec.tasks[task].loss(pred, target)) * n
        self._count[task] += n

    def compute(self) -> dict[str, Any]:
        """``{"metrics": {task: {metric: value}}, "losses": {task: mean loss}}``.

        Raises:
            DataError: a task's metrics lack one of its declared metrics.
        """
        metrics = {}
        for t in self.tasks:
            values = {k: float(v) for k, v in self._meters[t].compute().items()}
            missing = [k for k in self.spec.tasks[t].metrics if k not in values]
            if missing:
                raise DataError(f"metrics of task '{t}' returned {sorted(values)}, missing declared {missing}")
            metrics[t] = {k: values[k] for k in self.spec.tasks[t].metrics}
        return {"metrics": metrics, "losses": {t: self._loss_sum[t] / max(self._count[t], 1) for t in self.tasks}}


@torch.no_grad()
def evaluate(forward: TaskForward, loaders: Mapping[str, Any], evaluator: TaskEvaluator) -> dict[str, Any]:
    """Run the model (eval mode) over ``loaders`` (:func:`~mtlens.train.loaders.eval_loaders`) and
    return ``evaluator.compute()`` (the evaluator is reset first)."""
    forward.model.eval()
    evaluator.reset()
    tasks = evaluator.tasks
    for key, loader in loaders.items():
        for batch in loader:
            batch = to_device(batch, forward.device)
            if forward.multi_input:
                x, target = task_batch_parts(forward.spec, batch, key)
                _, preds = forward.predict(x, [key])
                evaluator.update(key, preds[key], target)
            else:
                x, targets = batch_parts(forward.spec, batch, tasks)
                _, preds = forward.predict(x, tasks)
                for t in tasks:
                    evaluator.update(t, preds[t], targets[t])
    return evaluator.compute()


class BaselineComparison:
    """A run's metrics against its single-task baseline: Δ, the selection score, per-task scores.

    Args:
        spec: the :class:`~mtlens.tasks.BenchmarkSpec` (metric directions).
        tasks: the run's tasks.
        baseline: ``{"metrics": {"val": ..., "test": ...}, ...}`` or None (no baseline).
        selection: ``train.selection`` — ``auto``, ``delta_p_task``, ``val_loss`` or ``last``.
    """

    def __init__(self, spec: Any, tasks: list[str], baseline: dict[str, Any] | None, selection: str = "auto"):
        self.tasks, self.baseline, self.selection = list(tasks), baseline, selection
        self.directions: dict[str, dict[str, bool]] = spec.metric_directions(self.tasks)

    def _split(self, split: str) -> dict[str, Any] | None:
        b = self.baseline
        return b["metrics"].get(split) if b is not None else None

    def criterion(self) -> str:
        """The selection criterion in force (``auto`` → ``delta_p_task`` with validation baseline
        metrics, else ``val_loss``). ConfigurationError: ``delta_p_task`` without them."""
        if self.selection == "auto":
            return "delta_p_task" if self._split("val") else "val_loss"
        if self.selection == "delta_p_task" and not self._split("val"):
            raise ConfigurationError(
                "train.selection='delta_p_task' needs the baseline's validation metrics; the baseline "
                "file has "
                "only test metrics. Use selection=val_loss, or baseline=auto"
            )
        return self.selection

    def score(self, val: dict[str, Any], epoch: int) -> float:
        """The epoch's selection score (higher is better): Δp_task, minus the summed validation
        loss, or the epoch number (``last``)."""
        crit = self.criterion()
        if crit == "last":
            return float(epoch)
        if crit == "val_loss":
            return -float(sum(val["losses"].values()))
        base = self._split("val")
        assert base is not None  # criterion() is delta_p_task only with validation baseline metrics
        return float(delta_p_task(val["metrics"], base, self.directions))

    def deltas(self, metrics: dict[str, dict[str, float]], split: str) -> dict[str, float] | None:
        """Δ in the three named conventions against the baseline's ``split`` metrics (None without them)."""
        base = self._split(split)
        if not base:
            return None
        return {k: float(v) for k, v in compute_deltas(metrics, base, self.directions).items()}

    def task_scores(self, val: dict[str, Any], method: str) -> torch.Tensor:
        """Each task's relative drop (%, higher = worse) against the baseline's validation metrics,
        ``-mean_m r_m`` (float64, one per task), for methods with ``needs_task_scores`` (PIVRG)."""
        base = self._split("val")
        if not base:
            raise ConfigurationError(
                f"'{method}' weights the tasks by their performance against single-task baselines "
                "(needs_task_scores); it needs the baseline's validation metrics: set baseline=auto"
            )
        r = relative_improvements(val["metrics"], base, self.directions)
        return torch.tensor([-sum(r[t].values()) / len(r[t]) for t in self.tasks], dtype=torch.float64)
