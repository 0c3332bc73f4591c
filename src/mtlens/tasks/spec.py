"""Declarative task and benchmark specifications (the contract between data, models and train).

A :class:`TaskSpec` says what a task predicts, its loss and its metrics (with the direction of
each); a :class:`BenchmarkSpec` ties a dataset to its tasks and its default model preset.

Batches (what a DataLoader over ``BenchmarkSpec.datasets(...)[split]`` yields):

* single-input benchmarks: ``{"input": Tensor[B, ...], "targets": {task: Tensor[B, ...]}}``;
* multi-input benchmarks (Office-31/Home: each task has its own images):
  ``datasets(...)[split]`` is ``{task: Dataset}`` and each task's loader yields
  ``{"input": Tensor[B, ...], "target": Tensor[B, ...]}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..errors import ConfigurationError
from ..registry import PLUGIN_HINT, Registry


@dataclass
class TaskSpec:
    """One task: its kind, output channels, loss and metrics.

    Attributes:
        name: task name used everywhere (losses, metrics, heads).
        kind: "segmentation" | "depth" | "normal" | "classification" | "regression".
        out_channels: channels (dense) or outputs (vector) of the task's head.
        loss: ``loss(pred, target) -> scalar Tensor`` (batch mean).
        make_metrics: factory of a metric object with ``update(pred, target)``,
            ``compute() -> {metric name: float}``, ``reset()``.
        metrics: ``{metric name: higher_is_better}`` in the order papers print them.
        units: ``{metric name: unit}`` where a metric has a physical unit (QM9's MAEs: "meV", "D",
            ...); printed beside the values. Empty for unit-free metrics (percentages, ...).
    """

    name: str
    kind: str
    out_channels: int
    loss: Callable[[Tensor, Tensor], Tensor]
    make_metrics: Callable[[], Any]
    metrics: dict[str, bool]
    units: dict[str, str] = field(default_factory=dict)


@dataclass
class BenchmarkSpec:
    """A benchmark: dataset factory + task specs + default model preset.

    Attributes:
        name: registry name ("multimnist", "nyuv2", "cityscapes", "office-31", ...).
        tasks: ``{task name: TaskSpec}`` in canonical order.
        multi_input: each task has its own inputs (Office); see the module docstring.
        dense: per-pixel tasks (heads upsample to the input size).
        default_model: model preset name (``mtlens.models.create``).
        in_channels: input channels.
        make_datasets: ``(root, seed, **options) -> {"train"|"val"|"test": Dataset or {task: Dataset}}``;
            a validation split is carved deterministically from train when the data has none.
        needs_root: the user must supply a data directory (no bundled data).
        description: one line for ``mtlens datasets``.
        source: where to get the data and its licence.
        bind: optional ``(spec, datasets) -> {task: TaskSpec}``: tasks whose loss or metrics
            depend on the loaded data (QM9: MAE in physical units needs the training-set std);
            see :meth:`bound`.
        default_data: for a benchmark that needs no root, a zero-argument check of its default
            data source: ``None`` when it is usable, else what is missing and how to get it
            (``mtlens datasets`` prints it instead of "no root needed").
    """

    name: str
    tasks: dict[str, TaskSpec]
    multi_input: bool
    dense: bool
    default_model: str
    in_channels: int
    make_datasets: Callable[..., dict[str, Any]]
    needs_root: bool = True
    description: str = ""
    source: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    bind: Callable[[BenchmarkSpec, dict[str, Any]], dict[str, TaskSpec]] | None = None
    default_data: Callable[[], str | None] | None = None

    def bound(self, datasets: dict[str, Any]) -> BenchmarkSpec:
        """This spec with its tasks specialised to ``datasets`` (itself when ``bind`` is None).

        Call it with what :meth:`datasets` returned before using the tasks' metrics (the Trainer
        does); e.g. QM9's MAE scales by the std of the training targets.
        """
        if self.bind is None:
            return self
        from dataclasses import replace

        return replace(self, tasks=self.bind(self, datasets), bind=None)

    def data_status(self) -> str | None:
        """``None`` when the data is there without a root; else what the user must supply."""
        if self.needs_root:
            return "needs data.root"
        return None if self.default_data is None else self.default_data()

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def metric_directions(self, tasks: Sequence[str] | None = None) -> dict[str, dict[str, bool]]:
        """``{task: {metric: higher_is_better}}`` of ``tasks`` (default: all, in the benchmark's order),
        the ``spec`` argument of the Δ functions: the one place metric directions come from."""
        names = self.task_names if tasks is None else list(tasks)
        return {t: dict(self.tasks[t].metrics) for t in names}

    def datasets(self, root: str | None = None, seed: int = 0, **options: Any) -> dict[str, Any]:
        if self.needs_root and root is None:
            raise ConfigurationError(
                f"benchmark '{self.name}' needs its data directory: pass root=... "
                f"(--set data.root=PATH). {self.source}"
            )
        return self.make_datasets(root=root, seed=seed, **options)


# the built-in benchmarks register themselves when mtlens.tasks.benchmarks is imported (first lookup);
# a later registration of a name replaces the earlier one (a test or plugin redefining a benchmark)
_BENCHMARKS: Registry[Callable[[], BenchmarkSpec]] = Registry(
    "benchmark", builtins="mtlens.tasks.benchmarks", replace=True, hint=PLUGIN_HINT
)


def register_benchmark(name: str) -> Callable[[Callable[[], BenchmarkSpec]], Callable[[], BenchmarkSpec]]:
    """Decorator for a zero-argument factory returning a :class:`BenchmarkSpec`."""

    def deco(fn: Callable[[], BenchmarkSpec]) -> Callable[[], BenchmarkSpec]:
        return _BENCHMARKS.register(name, fn)

    return deco


def get_benchmark(name: str) -> BenchmarkSpec:
    """A fresh :class:`BenchmarkSpec` of benchmark ``name`` (:func:`mtlens.registry.normalise_name` spelling)."""
    return _BENCHMARKS.get(name)()


def available_benchmarks() -> list[str]:
    return _BENCHMARKS.names()
