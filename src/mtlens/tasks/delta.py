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

Always print the convention's name with the number (see :data:`DELTA_CONVENTIONS`). The
conventions, their sources and a worked example: docs/delta.md.

Arguments of every function:

* ``results``, ``baseline``: metric values, either nested ``{task: {metric: value}}``, flat
  ``{"task/metric": value}``, or flat ``{metric: value}`` when the metric name belongs to one
  task only (e.g. NYUv2's ``miou``, ``abs_err``, ...). Extra keys are ignored.
* ``spec``: ``{task: {metric: higher_is_better}}`` (``BenchmarkSpec.metric_directions()``).

Published values are means over seeds of per-seed Δ computed from unrounded metrics, so a
recomputation from a printed table of means agrees only to about ±0.15.

Next to Δ, papers since Nash-MTL print the **mean rank** (MR) of each method among the methods
of one table: :func:`metric_ranks` and :func:`mean_rank` (lower is better).
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


def compute_deltas(results: MetricValues, baseline: MetricValues, spec: DirectionSpec,
                   conventions: list[str] | tuple[str, ...] | None = None) -> dict[str, float]:
    """``{convention name: value}`` for the named conventions (default: all three)."""
    names = list(DELTA_CONVENTIONS) if conventions is None else list(conventions)
    unknown = [n for n in names if n not in DELTA_CONVENTIONS]
    if unknown:
        raise ConfigurationError(f"unknown Δ convention(s) {unknown}; choose from {list(DELTA_CONVENTIONS)}")
    return {n: DELTA_CONVENTIONS[n].function(results, baseline, spec) for n in names}


# -- Mean Rank ------------------------------------------------------------------------------------

RANK_TIES = ("average", "min")
"""Tie rules of :func:`metric_ranks`: ``"average"`` (tied methods share the mean of their ranks,
so the ranks of every metric sum to n(n+1)/2) or ``"min"`` (competition ranking 1, 1, 3)."""
RANK_WEIGHTINGS = ("metric", "task")
"""``"metric"``: MR is the mean over all metrics (Nash-MTL, FAMO, NTKMTL); ``"task"``: the mean over
tasks of each task's mean rank (every task counts once, whatever its number of metrics)."""


def metric_ranks(results: Mapping[str, MetricValues], spec: DirectionSpec, *,
                 ties: str = "average") -> dict[str, dict[str, dict[str, float]]]:
    """Rank of every method on every metric among the methods in ``results`` (1 = best).

    Args:
        results: ``{method: metric values}`` for the methods of one table (one benchmark, one
            setting), each in any form :func:`metric_value` accepts. The single-task baseline is
            ranked like any other entry if it is included; papers leave it out.
        spec: ``{task: {metric: higher_is_better}}``.
        ties: ``"average"`` (default; tied methods share the mean of the ranks they span) or
            ``"min"`` (they all get the best of them).

    Returns:
        ``{method: {task: {metric: rank}}}``; ranks are floats in ``[1, n_methods]``.

    Raises:
        ConfigurationError: fewer than one method, a missing metric, an unknown tie rule.
        NonFiniteError: a non-finite metric value (a diverged run must be dropped explicitly).

    >>> spec = {"a": {"acc": True}, "b": {"err": False}}
    >>> r = metric_ranks({"X": {"a/acc": 90, "b/err": 0.2}, "Y": {"a/acc": 80, "b/err": 0.1}}, spec)
    >>> r["X"], r["Y"]
    ({'a': {'acc': 1.0}, 'b': {'err': 2.0}}, {'a': {'acc': 2.0}, 'b': {'err': 1.0}})
    """
    _check_spec(spec)
    if ties not in RANK_TIES:
        raise ConfigurationError(f"ties={ties!r}; choose one of {RANK_TIES}")
    if not isinstance(results, Mapping) or not results:
        raise ConfigurationError("results must be a non-empty dict {method: metric values}")
    methods = list(results)
    out: dict[str, dict[str, dict[str, float]]] = {m: {} for m in methods}
    for task, metrics in spec.items():
        for m in out.values():
            m[task] = {}
        for metric, higher in metrics.items():
            score = {name: (1.0 if higher else -1.0) * metric_value(results[name], task, metric, spec,
                                                                     f"results['{name}']")
                     for name in methods}
            for name in methods:
                better = sum(1 for o in methods if score[o] > score[name])
                tied = sum(1 for o in methods if score[o] == score[name])  # includes itself
                rank = better + 1.0 if ties == "min" else better + (tied + 1) / 2.0
                out[name][task][metric] = rank
    return out


def mean_rank(results: Mapping[str, MetricValues], spec: DirectionSpec, *, ties: str = "average",
              weighting: str = "metric") -> dict[str, float]:
    """Mean Rank (MR) of each method among the methods of one table; lower is better.

    For every metric the methods are ranked (1 = best, the metric's direction from ``spec``) and
    MR is the mean of a method's ranks over all metrics (``weighting="metric"``, the definition
    of Navon et al., Nash-MTL, ICML 2022, arXiv:2202.01017, Sec. 6, used again by FAMO,
    arXiv:2306.03792, and NTKMTL, arXiv:2510.18258), or the mean over tasks of each task's mean
    rank (``weighting="task"``). MR depends on which methods are compared: compute it over the
    rows of one table (one benchmark, one backbone) and print it with that set.

    Args and errors: as :func:`metric_ranks`; ``weighting`` is ``"metric"`` or ``"task"``.

    Returns:
        ``{method: MR}`` in the order of ``results``; values in ``[1, n_methods]``.

    >>> spec = {"seg": {"miou": True, "pixacc": True}, "depth": {"abs_err": False}}
    >>> res = {"A": {"miou": 50, "pixacc": 70, "abs_err": 0.4},
    ...        "B": {"miou": 52, "pixacc": 69, "abs_err": 0.5}}
    >>> mean_rank(res, spec)
    {'A': 1.3333333333333333, 'B': 1.6666666666666667}
    >>> mean_rank(res, spec, weighting="task")
    {'A': 1.25, 'B': 1.75}
    """
    if weighting not in RANK_WEIGHTINGS:
        raise ConfigurationError(f"weighting={weighting!r}; choose one of {RANK_WEIGHTINGS}")
    ranks = metric_ranks(results, spec, ties=ties)
    out: dict[str, float] = {}
    for name, per_task in ranks.items():
        if weighting == "metric":
            vals = [r for task in per_task.values() for r in task.values()]
            out[name] = sum(vals) / len(vals)
        else:
            out[name] = sum(sum(t.values()) / len(t) for t in per_task.values()) / len(per_task)
    return out
