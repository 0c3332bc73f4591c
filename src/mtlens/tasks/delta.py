"""Overall multi-task performance against single-task baselines, in its three conventions.

Papers print three incompatible quantities under the one name "Δm". For metric m of model M
against the single-task baseline B, with s_m = +1 if higher is better and −1 otherwise::

    r_m = s_m · (M_m − B_m) / B_m · 100

================== ============================================== ====== ===========================
name               formula                                        better used by
================== ============================================== ====== ===========================
``delta_p_task``   mean over tasks of (mean over its metrics r_m) higher Rep-MTL, DB-MTL, LibMTL
``delta_p_metric`` mean over all metrics of r_m                   higher Rep-MTL, DB-MTL (NYUv2)
``delta_m``        −(mean over all metrics of r_m)                lower  MTAN, CAGrad, Nash-MTL, FAMO
================== ============================================== ====== ===========================

Always print the convention's name with the number (see :data:`DELTA_CONVENTIONS`).

Arguments of every function:

* ``results``, ``baseline``: metric values, either nested ``{task: {metric: value}}``, flat
  ``{"task/metric": value}``, or flat ``{metric: value}`` when the metric name belongs to one
  task only (e.g. NYUv2's ``miou``, ``abs_err``, ...). Extra keys are ignored.
* ``spec``: ``{task: {metric: higher_is_better}}`` (``BenchmarkSpec.metric_directions()``).

Published values are means over seeds of per-seed Δ computed from unrounded metrics, so a
recomputation from a printed table of means agrees only to about ±0.15.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ..errors import ConfigurationError, NonFiniteError

MetricValues = Mapping[str, Any]
DirectionSpec = Mapping[str, Mapping[str, bool]]


def _check_spec(spec: DirectionSpec) -> None:
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigurationError("spec must be a non-empty dict {task: {metric: higher_is_better}}")
    for task, metrics in spec.items():
        if not isinstance(metrics, Mapping) or not metrics:
            raise ConfigurationError(f"spec['{task}'] must be a non-empty dict {{metric: higher_is_better}}")
        for m, hib in metrics.items():
            if not isinstance(hib, bool):
                raise ConfigurationError(
                    f"spec['{task}']['{m}'] = {hib!r}; the direction must be True (higher is better) "
                    "or False (lower is better)"
                )


def _owners(spec: DirectionSpec) -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    for task, metrics in spec.items():
        for m in metrics:
            owners.setdefault(m, []).append(task)
    return owners


def metric_value(values: MetricValues, task: str, metric: str, spec: DirectionSpec, what: str) -> float:
    """The value of ``task``'s ``metric`` in ``values`` (nested, "task/metric" or unique metric key)."""
    if not isinstance(values, Mapping):
        raise ConfigurationError(f"{what} must be a dict of metric values, got {type(values).__name__}")
    if task in values and isinstance(values[task], Mapping):
        sub = values[task]
        if metric not in sub:
            raise ConfigurationError(
                f"{what} has no metric '{metric}' for task '{task}' (it has {sorted(sub)})"
            )
        raw = sub[metric]
    elif f"{task}/{metric}" in values:
        raw = values[f"{task}/{metric}"]
    elif metric in values:
        owners = _owners(spec)[metric]
        if len(owners) > 1:
            raise ConfigurationError(
                f"{what}: the key '{metric}' is ambiguous (tasks {owners} all have it); key the values "
                f"as '{task}/{metric}' or as {{task: {{metric: value}}}}"
            )
        raw = values[metric]
    else:
        raise ConfigurationError(
            f"{what} has no value for task '{task}', metric '{metric}' (looked for "
            f"{what}['{task}']['{metric}'], {what}['{task}/{metric}'] and {what}['{metric}']); "
            f"keys present: {sorted(values)[:12]}"
        )
    try:
        val = float(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{what}: {task}/{metric} = {raw!r} is not a number") from exc
    if not math.isfinite(val):
        raise NonFiniteError(f"{what}: {task}/{metric} = {val}; Δ needs finite metric values")
    return val


def relative_improvements(results: MetricValues, baseline: MetricValues,
                          spec: DirectionSpec) -> dict[str, dict[str, float]]:
    """``{task: {metric: r_m}}`` with ``r_m = s_m (M_m − B_m) / B_m · 100`` (percent, + = better)."""
    _check_spec(spec)
    out: dict[str, dict[str, float]] = {}
    for task, metrics in spec.items():
        out[task] = {}
        for m, higher in metrics.items():
            b = metric_value(baseline, task, m, spec, "baseline")
            v = metric_value(results, task, m, spec, "results")
            if b == 0.0:
                raise ConfigurationError(
                    f"baseline {task}/{m} is 0: the relative improvement (M − B) / B is undefined; "
                    "drop this metric from the spec or use a baseline with a non-zero value"
                )
            out[task][m] = (1.0 if higher else -1.0) * (v - b) / b * 100.0
    return out


def delta_p_task(results: MetricValues, baseline: MetricValues, spec: DirectionSpec) -> float:
    """Δp (task-weighted): mean over tasks of the mean r_m of each task's metrics; higher is better.

    Used by Rep-MTL (arXiv:2507.21049), DB-MTL (arXiv:2308.12029) and LibMTL.

    >>> spec = {"seg": {"miou": True}, "depth": {"abs_err": False, "rel_err": False}}
    >>> base = {"miou": 50.0, "abs_err": 0.5, "rel_err": 0.2}
    >>> round(delta_p_task({"miou": 55.0, "abs_err": 0.5, "rel_err": 0.2}, base, spec), 6)
    5.0
    """
    r = relative_improvements(results, baseline, spec)
    return sum(sum(v.values()) / len(v) for v in r.values()) / len(r)


def delta_p_metric(results: MetricValues, baseline: MetricValues, spec: DirectionSpec) -> float:
    """Δp (metric-weighted): mean over all metrics of r_m; higher is better.

    Used by Rep-MTL (arXiv:2507.21049) and DB-MTL (arXiv:2308.12029) on NYUv2.

    >>> spec = {"seg": {"miou": True}, "depth": {"abs_err": False, "rel_err": False}}
    >>> base = {"miou": 50.0, "abs_err": 0.5, "rel_err": 0.2}
    >>> round(delta_p_metric({"miou": 55.0, "abs_err": 0.5, "rel_err": 0.2}, base, spec), 6)
    3.333333
    """
    r = relative_improvements(results, baseline, spec)
    vals = [x for v in r.values() for x in v.values()]
    return sum(vals) / len(vals)


def delta_m(results: MetricValues, baseline: MetricValues, spec: DirectionSpec) -> float:
    """Δm (MTAN convention): −(mean over all metrics of r_m), the average relative drop; lower is better.

    Introduced by Maninis et al. ("Attentive Single-Tasking of Multiple Tasks", CVPR 2019);
    the number printed on NYUv2 / Cityscapes by MTAN's benchmark code (arXiv:1803.10704),
    CAGrad (arXiv:2110.14048), Nash-MTL (arXiv:2202.01017), FAMO (arXiv:2306.03792) and
    Aligned-MTL. Equal to ``-delta_p_metric``.
    """
    return -delta_p_metric(results, baseline, spec)


class DeltaConvention(NamedTuple):
    """A Δ convention for tables: its function, its direction and the papers that print it."""

    function: Callable[[MetricValues, MetricValues, DirectionSpec], float]
    higher_is_better: bool
    used_by: str


DELTA_CONVENTIONS: dict[str, DeltaConvention] = {
    "delta_p_task": DeltaConvention(delta_p_task, True, "Rep-MTL, DB-MTL, LibMTL (task-weighted)"),
    "delta_p_metric": DeltaConvention(delta_p_metric, True, "Rep-MTL, DB-MTL (NYUv2, metric-weighted)"),
    "delta_m": DeltaConvention(delta_m, False, "MTAN, CAGrad, Nash-MTL, FAMO, Aligned-MTL"),
}
"""``name → (function, higher_is_better, used_by)``; print the name with every value."""


def mean_rank(results: Mapping[str, MetricValues], spec: DirectionSpec) -> dict[str, float]:
    """Mean rank (MR) of each method over all metrics; lower is better.

    For every metric of ``spec`` the methods are ranked by their value in the metric's direction
    (1 = best); tied values share the average of the ranks they span [our choice, as
    ``scipy.stats.rankdata(method="average")``]; a method's MR is the mean of its ranks over all
    metrics, each metric counting once (so a task with more metrics weighs more, as in the
    papers). MR is printed beside Δm by Nash-MTL (Navon et al., ICML 2022, arXiv:2202.01017) and
    FAMO (Liu et al., NeurIPS 2023, arXiv:2306.03792), and by later papers (e.g. NTKMTL). MR depends
    on which methods are compared: it is only comparable within one table.

    Args:
        results: ``{method: metric values}`` (each nested, flat "task/metric" or unique metric key,
            as everywhere in this module); at least one method.
        spec: ``{task: {metric: higher_is_better}}``.

    Returns:
        ``{method: MR}`` with MR in ``[1, number of methods]`` (float).

    Raises:
        ConfigurationError: empty ``results``, a bad spec, or a method missing a metric.
        NonFiniteError: a non-finite metric value.

    >>> spec = {"a": {"acc": True}, "b": {"err": False}}
    >>> mean_rank({"x": {"a/acc": 90, "b/err": 0.2}, "y": {"a/acc": 80, "b/err": 0.1}}, spec)
    {'x': 1.5, 'y': 1.5}
    """
    from scipy.stats import rankdata

    _check_spec(spec)
    if not isinstance(results, Mapping) or not results:
        raise ConfigurationError("mean_rank needs a non-empty dict {method: metric values}")
    names = list(results)
    ranks = {n: [] for n in names}
    for task, metrics in spec.items():
        for m, higher in metrics.items():
            vals = [metric_value(results[n], task, m, spec, f"results['{n}']") for n in names]
            goodness = [-v if higher else v for v in vals]  # rank 1 = best
            for n, r in zip(names, rankdata(goodness, method="average")):
                ranks[n].append(float(r))
    return {n: sum(r) / len(r) for n, r in ranks.items()}


def compute_deltas(results: MetricValues, baseline: MetricValues, spec: DirectionSpec,
                   conventions: list[str] | tuple[str, ...] | None = None) -> dict[str, float]:
    """``{convention name: value}`` for the named conventions (default: all three)."""
    names = list(DELTA_CONVENTIONS) if conventions is None else list(conventions)
    unknown = [n for n in names if n not in DELTA_CONVENTIONS]
    if unknown:
        raise ConfigurationError(f"unknown Δ convention(s) {unknown}; choose from {list(DELTA_CONVENTIONS)}")
    return {n: DELTA_CONVENTIONS[n].function(results, baseline, spec) for n in names}
