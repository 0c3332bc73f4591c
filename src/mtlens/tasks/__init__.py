"""mtlens.tasks: task specs, losses, exact streaming metrics and the Δ conventions.

>>> from mtlens.tasks import segmentation_task, depth_task, delta_p_task
>>> tasks = {"seg": segmentation_task("seg", 13), "depth": depth_task("depth")}
>>> [t.metrics for t in tasks.values()]
[{'miou': True, 'pixacc': True}, {'abs_err': False, 'rel_err': False}]
"""

from .delta import (
    DELTA_CONVENTIONS,
    DeltaConvention,
    compute_deltas,
    delta_m,
    delta_p_metric,
    delta_p_task,
    mean_rank,
    metric_ranks,
    metric_value,
    relative_improvements,
)
from .losses import (
    IGNORE_INDEX,
    REGRESSION_LOSSES,
    classification_loss,
    depth_loss,
    depth_valid_mask,
    l1_loss,
    mse_loss,
    normal_loss,
    normal_valid_mask,
    segmentation_loss,
)
from .metrics import (
    NORMAL_THRESHOLDS,
    REGRESSION_METRICS,
    ClassificationMetric,
    DepthMetric,
    Metric,
    NormalMetric,
    RegressionMetric,
    SegmentationMetric,
)
from .spec import BenchmarkSpec, TaskSpec, available_benchmarks, get_benchmark, register_benchmark
from .task_specs import (
    CLASSIFICATION_METRICS,
    DEPTH_METRICS,
    NORMAL_METRICS,
    SEGMENTATION_METRICS,
    classification_task,
    depth_task,
    normal_task,
    regression_task,
    segmentation_task,
)

__all__ = [
    "BenchmarkSpec",
    "CLASSIFICATION_METRICS",
    "ClassificationMetric",
    "DELTA_CONVENTIONS",
    "DEPTH_METRICS",
    "DeltaConvention",
    "DepthMetric",
    "IGNORE_INDEX",
    "Metric",
    "NORMAL_METRICS",
    "NORMAL_THRESHOLDS",
    "NormalMetric",
    "REGRESSION_LOSSES",
    "REGRESSION_METRICS",
    "RegressionMetric",
    "SEGMENTATION_METRICS",
    "SegmentationMetric",
    "TaskSpec",
    "available_benchmarks",
    "classification_loss",
    "classification_task",
    "compute_deltas",
    "delta_m",
    "delta_p_metric",
    "delta_p_task",
    "depth_loss",
    "depth_task",
    "depth_valid_mask",
    "get_benchmark",
    "l1_loss",
    "mean_rank",
    "metric_ranks",
    "metric_value",
    "mse_loss",
    "normal_loss",
    "normal_task",
    "normal_valid_mask",
    "regression_task",
    "register_benchmark",
    "relative_improvements",
    "segmentation_loss",
    "segmentation_task",
]
