"""Task metrics that aggregate exactly over batches (and over DDP ranks).

Each metric keeps additive tensor states (a confusion matrix, sums, counts, a histogram), so
``update`` over any split of a data set into batches — or over ranks, through ``merge`` /
``sync`` — gives the same ``compute()`` as one pass over the whole set. This is the
pixel-weighted aggregation of LibMTL's NYUv2 metrics (``examples/nyu/utils.py``), not the
per-batch averages some MTL code reports.

Units: mIoU, pixel accuracy, the normal "within t°" fractions and classification accuracy are
percentages (as the papers print them: mIoU 53.50, not 0.5350); depth errors are in the units
of the depth maps; normal angles in degrees. Every Δm convention is scale-free per metric, so
the unit choice does not change Δm.

Interface (shape of ``torchmetrics.Metric``): ``update(pred, target)``, ``compute() ->
{name: float}``, ``reset()``, ``merge(other)`` (sum another instance's state into this one) and
``sync(process_group=None)`` (all-reduce the states when ``torch.distributed`` is initialised).
States live on the device of the first ``update`` (CPU for MPS, which lacks float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigurationError, DataError, ShapeError
from .losses import (
    IGNORE_INDEX,
    NORMAL_EPS,
    _dense_pair,
    check_labels,
    depth_valid_mask,
    normal_valid_mask,
    regression_target,
)

NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)
"""Angle thresholds (degrees) of the "within t°" normal metrics (MTAN / LibMTL NYUv2)."""


class Metric:
    """Base class: additive tensor states, ``reset``/``merge``/``sync``; subclasses define the rest.

    Subclasses set ``names`` (metric names returned by ``compute``), implement
    ``_init_states() -> {state: Tensor}``, ``_update(pred, target)`` and ``_compute()``.
    """

    names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    # -- state handling ---------------------------------------------------------------------
    def _init_states(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        """Clear the accumulated state (start of an evaluation)."""
        self._states = self._init_states()
        self._synced = False

    def states(self) -> dict[str, Tensor]:
        """The additive state tensors (detached copies)."""
        return {k: v.detach().clone() for k, v in self._states.items()}

    def _to(self, device: torch.device) -> None:
        if device.type == "mps":
            device = torch.device("cpu")
        for k, v in self._states.items():
            if v.device != device:
                self._states[k] = v.to(device)

    @property
    def device(self) -> torch.device:
        return next(iter(self._states.values())).device

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Accumulate one batch (``pred`` as the model outputs it, ``target`` from the data)."""
        if self._synced:
            raise ConfigurationError(
                f"{type(self).__name__}.update() after sync(): the state already holds every rank's "
                "data; call reset() to start a new evaluation"
            )
        with torch.no_grad():
            self._to(pred.device)
            self._update(pred.detach(), target.detach().to(pred.device))

    def _update(self, pred: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """The metric values over everything accumulated since the last ``reset``."""
        return self._compute()

    def _compute(self) -> dict[str, float]:
        raise NotImplementedError

    def _compatible(self, other: Metric) -> None:
        if type(other) is not type(self):
            raise ConfigurationError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        for k, v in self._states.items():
            if other._states[k].shape != v.shape:
                raise ConfigurationError(
                    f"cannot merge {type(self).__name__} states of different configuration "
                    f"('{k}': {tuple(other._states[k].shape)} vs {tuple(v.shape)})"
                )

    def merge(self, other: Metric) -> Metric:
        """Add ``other``'s state into this one (same class and configuration); returns ``self``."""
        self._compatible(other)
        for k in self._states:
            self._states[k] = self._states[k] + other._states[k].to(self._states[k].device)
        return self

    def sync(self, process_group: Any = None) -> Metric:
        """Sum the states over the ranks of ``process_group`` (all-reduce); a no-op without DDP.

        Call once per evaluation, after the last ``update`` and before ``compute``; the NCCL
        backend needs the states on this rank's CUDA device (moved there if needed).
        """
        import torch.distributed as dist

        if self._synced:
            raise ConfigurationError(f"{type(self).__name__}.sync() called twice; the states would be "
                                     "counted twice. Call reset() before the next evaluation")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
            if dist.get_backend(process_group) == "nccl" and self.device.type != "cuda":
                self._to(torch.device("cuda", torch.cuda.current_device()))
            for k in sorted(self._states):
                dist.all_reduce(self._states[k], op=dist.ReduceOp.SUM, group=process_group)
            self._synced = True
        return self

    def _require(self, count: Tensor, what: str) -> float:
        n = float(count)
        if n <= 0:
            raise ConfigurationError(
                f"{type(self).__name__}.compute(): no {what} accumulated — call update() with data "
                "that has at least one valid element first"
            )
        return n

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.names)})"


def _integer_labels(target: Tensor, who: str) -> Tensor:
    if target.is_floating_point() and not torch.equal(target, target.round()):
        raise DataError(f"{who}: labels must be integers, got non-integer values")
    return target.long()


def _label_predictions(pred: Tensor, expect_dim: int, num_classes: int, who: str) -> Tensor:
    """Argmax over dim 1 of logits, or integer label predictions as they are."""
    if pred.dim() == expect_dim + 1 and pred.is_floating_point():
        if pred.shape[1] != num_classes:
            raise ShapeError(
                f"{who}: logits have {pred.shape[1]} channels, the task has {num_classes} classes"
            )
        return pred.argmax(dim=1)
    if pred.dim() == expect_dim and not pred.is_floating_point():
        check_labels(pred, num_classes, None, who + " (predicted labels)")
        return pred.long()
    raise ShapeError(
        f"{who}: pred must be logits with a class dimension ({expect_dim + 1}-D float) or integer "
        f"labels ({expect_dim}-D), got {tuple(pred.shape)} {pred.dtype}"
    )


class SegmentationMetric(Metric):
    """mIoU and pixel accuracy (percent) from a confusion matrix accumulated over all pixels.

    Reference: LibMTL ``SegMetric`` / MTAN ``ConfMatrix`` (arXiv:1803.10704). ``pred``: B×C×H×W
    logits (arg-max taken) or B×H×W labels; ``target``: B×H×W (or B×1×H×W) with
    ``ignore_index`` (default −1) excluded. ``miou`` = mean over the classes present (union of
    prediction and ground truth > 0) of TP / (TP + FP + FN); equal to LibMTL's mean over all
    classes whenever every class occurs (as on the NYUv2 and Cityscapes test sets), where LibMTL
    would return NaN otherwise. ``pixacc`` = correctly labelled / labelled pixels.
    """

    names = ("miou", "pixacc")

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 2:
            raise ConfigurationError(f"SegmentationMetric needs num_classes ≥ 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        super().__init__()

    def _init_states(self) -> dict[str, Tensor]:
        return {"confusion": torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)}

    def _update(self, pred: Tensor, target: Tensor) -> None:
        who = "SegmentationMetric"
        labels = _label_predictions(pred, 3, self.num_classes, who)
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if tuple(target.shape) != tuple(labels.shape):
            raise ShapeError(
                f"{who}: target shape {tuple(target.shape)} does not match the prediction's "
                f"{tuple(labels.shape)} (B×H×W); upsample predictions to the label size"
            )
        target = _integer_labels(target, who)
        check_labels(target, self.num_classes, self.ignore_index, who)
        valid = target != self.ignore_index
        idx = target[valid] * self.num_classes + labels[valid]
        c = self.num_classes
        self._states["confusion"] += torch.bincount(idx, minlength=c * c).reshape(c, c)

    def confusion(self) -> Tensor:
        """The C×C confusion matrix (rows: ground truth, columns: prediction)."""
        return self._states["confusion"].clone()

    def per_class_iou(self) -> list[float]:
        """IoU (percent) per class; NaN for a class absent from both prediction and ground truth."""
        h = self._states["confusion"].double()
        tp = h.diagonal()
        union = h.sum(0) + h.sum(1) - tp
        return (tp / union * 100.0).tolist()

    def _compute(self) -> dict[str, float]:
        h = self._states["confusion"].double()
        total = self._require(h.sum(), "labelled pixel")
        tp = h.diagonal()
        union = h.sum(0) + h.sum(1) - tp
        present = union > 0
        miou = float((tp[present] / union[present]).mean()) * 100.0
        return {"miou": miou, "pixacc": float(tp.sum()) / total * 100.0}


class DepthMetric(Metric):
    """Depth absolute and relative error, averaged over all valid pixels of the data set.

    Reference: LibMTL ``DepthMetric`` / MTAN (arXiv:1803.10704): ``abs_err`` = mean |d̂ − d|,
    ``rel_err`` = mean |d̂ − d| / |d| over pixels with d ≠ 0 (0 marks missing depth). LibMTL
    weights each batch's mean by its number of valid pixels, so both equal the pixel-level
    means computed here. ``pred``, ``target``: B×1×H×W (target B×H×W accepted).
    """

    names = ("abs_err", "rel_err")

    def _init_states(self) -> dict[str, Tensor]:
        return {"abs_sum": torch.zeros((), dtype=torch.float64),
                "rel_sum": torch.zeros((), dtype=torch.float64),
                "count": torch.zeros((), dtype=torch.int64)}

    def _update(self, pred: Tensor, target: Tensor) -> None:
        target = _dense_pair(pred, target, 1, "DepthMetric")
        valid = depth_valid_mask(target)
        d = target[valid].double()
        err = (pred[valid].double() - d).abs()
        self._states["abs_sum"] += err.sum()
        self._states["rel_sum"] += (err / d.abs()).sum()
        self._states["count"] += valid.sum()

    def _compute(self) -> dict[str, float]:
        n = self._require(self._states["count"], "valid depth pixel")
        return {"abs_err": float(self._states["abs_sum"]) / n, "rel_err": float(self._states["rel_sum"]) / n}


class NormalMetric(Metric):
    """Surface-normal angular error (degrees): mean, median and % of pixels within 11.25/22.5/30°.

    Reference: LibMTL ``NormalMetric`` / MTAN (arXiv:1803.10704), following Eigen & Fergus 2015.
    Angle = arccos(cos(pred, target)) with both vectors L2-normalised (LibMTL normalises only
    the prediction; NYUv2's targets are unit vectors, so the angles agree), computed in float64.
    Valid pixels: target norm > 0. ``mean`` and the "within" fractions (strict ``<``, as LibMTL)
    are exact; ``median`` comes from a histogram of the angles with bins of
    ``median_resolution`` degrees (default 0.001°, 180 000 bins) with linear interpolation inside
    the bin, so it is exact to within ``median_resolution`` — two orders below the 0.01° the
    papers print — while the state stays a fixed-size tensor that DDP can all-reduce.
    ``pred``, ``target``: B×3×H×W.
    """

    names = ("mean", "median", "within_11.25", "within_22.5", "within_30")

    def __init__(self, median_resolution: float = 1e-3):
        if not (0 < median_resolution <= 1.0):
            raise ConfigurationError(
                f"median_resolution={median_resolution}; choose a value in (0, 1] degrees"
            )
        self.bins = int(math.ceil(180.0 / median_resolution))
        self.bin_width = 180.0 / self.bins
        super().__init__()

    def _init_states(self) -> dict[str, Tensor]:
        return {"angle_sum": torch.zeros((), dtype=torch.float64),
                "count": torch.zeros((), dtype=torch.int64),
                "within": torch.zeros(len(NORMAL_THRESHOLDS), dtype=torch.int64),
                "histogram": torch.zeros(self.bins, dtype=torch.int64)}

    @staticmethod
    def angles(pred: Tensor, target: Tensor) -> Tensor:
        """Angles in degrees (float64) between ``pred`` and ``target`` at the valid pixels (1-D)."""
        target = _dense_pair(pred, target, 3, "NormalMetric")
        valid = normal_valid_mask(target)
        p = F.normalize(pred.double(), dim=1, eps=NORMAL_EPS)
        g = F.normalize(target.double(), dim=1, eps=NORMAL_EPS)
        cos = (p * g).sum(dim=1)[valid].clamp(-1.0, 1.0)
        return torch.rad2deg(torch.arccos(cos))

    def _update(self, pred: Tensor, target: Tensor) -> None:
        ang = self.angles(pred, target)
        self._states["angle_sum"] += ang.sum()
        self._states["count"] += ang.numel()
        for i, t in enumerate(NORMAL_THRESHOLDS):
            self._states["within"][i] += (ang < t).sum()
        idx = (ang / self.bin_width).floor().long().clamp(0, self.bins - 1)
        self._states["histogram"] += torch.bincount(idx, minlength=self.bins)

    def _quantile_rank(self, cum: Tensor, hist: Tensor, k: int) -> float:
        """Interpolated value of the k-th smallest angle (1-based) from the histogram."""
        b = int(torch.searchsorted(cum, torch.tensor(k, dtype=cum.dtype, device=cum.device)))
        before = int(cum[b] - hist[b])
        m = int(hist[b])
        return (b + (k - before - 0.5) / m) * self.bin_width

    def _compute(self) -> dict[str, float]:
        n = int(self._require(self._states["count"], "valid normal pixel"))
        hist = self._states["histogram"]
        cum = hist.cumsum(0)
        if n % 2 == 1:
            median = self._quantile_rank(cum, hist, n // 2 + 1)
        else:
            lo = self._quantile_rank(cum, hist, n // 2)
            median = 0.5 * (lo + self._quantile_rank(cum, hist, n // 2 + 1))
        within = (self._states["within"].double() / n * 100.0).tolist()
        return {"mean": float(self._states["angle_sum"]) / n, "median": median, **dict(zip(self.names[2:], within))}


class ClassificationMetric(Metric):
    """Top-1 accuracy (percent) over all samples.

    ``pred``: B×C logits (arg-max taken) or B integer labels; ``target``: B labels (LibMTL
    ``AccMetric``, Office-31 / Office-Home / MultiMNIST).
    """

    names = ("acc",)

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise ConfigurationError(f"ClassificationMetric needs num_classes ≥ 2, got {num_classes}")
        self.num_classes = int(num_classes)
        super().__init__()

    def _init_states(self) -> dict[str, Tensor]:
        return {"correct": torch.zeros((), dtype=torch.int64), "count": torch.zeros((), dtype=torch.int64)}

    def _update(self, pred: Tensor, target: Tensor) -> None:
        labels = _label_predictions(pred, 1, self.num_classes, "ClassificationMetric")
        if target.dim() == 2 and target.shape[1] == 1:
            target = target[:, 0]
        if tuple(target.shape) != tuple(labels.shape):
            raise ShapeError(
                f"ClassificationMetric: target shape {tuple(target.shape)} does not match the "
                f"predictions' {tuple(labels.shape)} (B)"
            )
        target = _integer_labels(target, "ClassificationMetric")
        check_labels(target, self.num_classes, None, "ClassificationMetric")
        self._states["correct"] += (labels == target).sum()
        self._states["count"] += labels.numel()

    def _compute(self) -> dict[str, float]:
        n = self._require(self._states["count"], "sample")
        return {"acc": float(self._states["correct"]) / n * 100.0}


REGRESSION_METRICS = ("mae", "mse")


class RegressionMetric(Metric):
    """Mean absolute error and/or mean squared error over all elements of all samples.

    ``pred``, ``target``: B×K (B accepted for K = 1). ``metrics`` selects what ``compute``
    returns; default ``("mae",)``, the metric reported per target on QM9 (LibMTL, Nash-MTL).

    ``scale`` multiplies every error (MSE by ``scale²``): for targets standardised as
    ``(y − mean) / std`` pass ``scale = std`` to report errors in the units of ``y`` (Nash-MTL's
    and LibMTL's QM9 MAE: ``|pred·std − y·std|``). ``scale=None`` marks a metric whose scale is
    known only once the data is loaded (QM9's training-set std, bound by
    :meth:`~mtlens.tasks.spec.BenchmarkSpec.bound`); ``compute`` then raises ConfigurationError.
    """

    def __init__(self, metrics: Sequence[str] = ("mae",), scale: float | None = 1.0):
        metrics = tuple(metrics)
        bad = [m for m in metrics if m not in REGRESSION_METRICS]
        if not metrics or bad:
            raise ConfigurationError(f"RegressionMetric metrics={metrics}; choose from {REGRESSION_METRICS}")
        if scale is not None and not (math.isfinite(float(scale)) and float(scale) > 0):
            raise ConfigurationError(f"RegressionMetric scale={scale!r}; expected a finite positive number")
        self.names = metrics
        self.scale = None if scale is None else float(scale)
        super().__init__()

    def _init_states(self) -> dict[str, Tensor]:
        return {"abs_sum": torch.zeros((), dtype=torch.float64),
                "sq_sum": torch.zeros((), dtype=torch.float64),
                "count": torch.zeros((), dtype=torch.int64)}

    def _update(self, pred: Tensor, target: Tensor) -> None:
        target = regression_target(pred, target, "RegressionMetric")
        err = pred.double() - target.double()
        self._states["abs_sum"] += err.abs().sum()
        self._states["sq_sum"] += err.pow(2).sum()
        self._states["count"] += err.numel()

    def _compute(self) -> dict[str, float]:
        n = self._require(self._states["count"], "value")
        if self.scale is None:
            raise ConfigurationError(
                "this RegressionMetric reports errors in units known only once the data is loaded "
                "(scale=None); build the datasets and use spec.bound(datasets) (mtlens' Trainer does)"
            )
        s = self.scale
        vals = {"mae": float(self._states["abs_sum"]) / n * s, "mse": float(self._states["sq_sum"]) / n * s * s}
        return {m: vals[m] for m in self.names}

    def _compatible(self, other: Metric) -> None:
        super()._compatible(other)
        assert isinstance(other, RegressionMetric)  # the base class checked the class
        if other.names != self.names or other.scale != self.scale:
            raise ConfigurationError(
                f"cannot merge RegressionMetric{other.names} (scale {other.scale}) into "
                f"RegressionMetric{self.names} (scale {self.scale})"
            )
