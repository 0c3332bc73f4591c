"""Factories of :class:`~mtlens.tasks.spec.TaskSpec` for the standard task kinds.

Metric names and directions (``{metric: higher_is_better}``) are in the order papers print
them; losses and metric objects are defined in :mod:`mtlens.tasks.losses` and
:mod:`mtlens.tasks.metrics`. Every loss and metric factory is a module-level function or a
``functools.partial`` of a class, so specs pickle (DDP spawn, Ray workers).

>>> spec = segmentation_task("segmentation", 13)
>>> spec.kind, spec.out_channels, spec.metrics
('segmentation', 13, {'miou': True, 'pixacc': True})
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from ..errors import ConfigurationError
from .losses import (
    IGNORE_INDEX,
    REGRESSION_LOSSES,
    classification_loss,
    depth_loss,
    normal_loss,
    segmentation_loss,
)
from .metrics import (
    REGRESSION_METRICS,
    ClassificationMetric,
    DepthMetric,
    NormalMetric,
    RegressionMetric,
    SegmentationMetric,
)
from .spec import TaskSpec

SEGMENTATION_METRICS = {"miou": True, "pixacc": True}
DEPTH_METRICS = {"abs_err": False, "rel_err": False}
NORMAL_METRICS = {
    "mean": False, "median": False, "within_11.25": True, "within_22.5": True, "within_30": True,
}
CLASSIFICATION_METRICS = {"acc": True}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigurationError(f"task name {name!r} must be a non-empty string without '/'")
    return name


def _check_classes(num_classes: int, who: str) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigurationError(f"{who}: num_classes must be an integer ≥ 2, got {num_classes!r}")
    return num_classes


def segmentation_task(name: str, num_classes: int, ignore_index: int = IGNORE_INDEX) -> TaskSpec:
    """Semantic segmentation: pixel-wise CE (label ``ignore_index``, default −1, ignored); mIoU ↑, pix acc ↑.

    Reference: the NYUv2/Cityscapes protocol of MTAN (arXiv:1803.10704) and LibMTL.
    """
    _check_classes(num_classes, f"segmentation_task('{name}')")
    loss = segmentation_loss if ignore_index == IGNORE_INDEX else partial(segmentation_loss,
                                                                           ignore_index=ignore_index)
    return TaskSpec(
        name=_check_name(name), kind="segmentation", out_channels=num_classes, loss=loss,
        make_metrics=partial(SegmentationMetric, num_classes, ignore_index=ignore_index),
        metrics=dict(SEGMENTATION_METRICS),
    )


def depth_task(name: str) -> TaskSpec:
    """Depth estimation: L1 on pixels with depth ≠ 0; absolute error ↓, relative error ↓."""
    return TaskSpec(
        name=_check_name(name), kind="depth", out_channels=1, loss=depth_loss,
        make_metrics=DepthMetric, metrics=dict(DEPTH_METRICS),
    )


def normal_task(name: str, median_resolution: float = 1e-3) -> TaskSpec:
    """Surface normals: 1 − cosine on valid pixels; mean ↓, median ↓ angle, within 11.25/22.5/30° ↑."""
    return TaskSpec(
        name=_check_name(name), kind="normal", out_channels=3, loss=normal_loss,
        make_metrics=partial(NormalMetric, median_resolution=median_resolution),
        metrics=dict(NORMAL_METRICS),
    )


def classification_task(name: str, num_classes: int) -> TaskSpec:
    """Classification: cross-entropy; accuracy ↑ (percent)."""
    _check_classes(num_classes, f"classification_task('{name}')")
    return TaskSpec(
        name=_check_name(name), kind="classification", out_channels=num_classes, loss=classification_loss,
        make_metrics=partial(ClassificationMetric, num_classes), metrics=dict(CLASSIFICATION_METRICS),
    )


def regression_task(name: str, num_outputs: int = 1, loss: str = "mse",
                    metrics: Sequence[str] = ("mae",), scale: float | None = 1.0, unit: str = "") -> TaskSpec:
    """Regression: ``loss`` "mse" (default) or "l1"; metrics from ("mae", "mse"), all ↓.

    Default ``metrics=("mae",)``: the per-target metric of QM9 in LibMTL and Nash-MTL
    (arXiv:2202.01017), so Δ over the spec counts each target once. ``scale``: multiplies the
    reported errors (the target's std when targets are standardised; see
    :class:`~mtlens.tasks.metrics.RegressionMetric`); the loss stays on the standardised values.
    ``unit``: the unit of the (scaled) target, recorded as the MAE's unit (MSE: its square).
    """
    if loss not in REGRESSION_LOSSES:
        raise ConfigurationError(
            f"regression_task('{name}'): loss={loss!r}; choose from {list(REGRESSION_LOSSES)}"
        )
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ConfigurationError(f"regression_task('{name}'): num_outputs must be a positive integer")
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in REGRESSION_METRICS]
    if not metrics or bad or len(set(metrics)) != len(metrics):
        raise ConfigurationError(
            f"regression_task('{name}'): metrics={metrics}; choose distinct names from {REGRESSION_METRICS}"
        )
    return TaskSpec(
        name=_check_name(name), kind="regression", out_channels=num_outputs, loss=REGRESSION_LOSSES[loss],
        make_metrics=partial(RegressionMetric, metrics, scale=scale), metrics=dict.fromkeys(metrics, False),
        units={m: (unit if m == "mae" else f"({unit})^2") for m in metrics} if unit else {},
    )
