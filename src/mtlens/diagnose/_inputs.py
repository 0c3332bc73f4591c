"""Turn what diagnostics are given (a StepRecord, a tensor, a list) into the tensors they need."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.numerics import check_gramian, check_gramian_rows
from ..engine.record import StepRecord
from ..engine.saliency import saliency_stack
from ..errors import ConfigurationError


def saliencies_of(
    x: StepRecord | Tensor | Sequence[Tensor], min_ndim: int = 2, what: str = "saliencies"
) -> Tensor:
    """Detached saliencies ``(T, ...)`` from a record, a stacked tensor or a list of T tensors."""
    if isinstance(x, StepRecord):
        if x.saliencies is None:
            raise ConfigurationError(
                f"{what}: this StepRecord holds no saliencies. With a loss-level method pass "
                "keep_saliencies=True (and features=Z) to mtl_backward on the steps you measure; "
                "gradient-level methods record them whenever features=Z is given."
            )
        x = x.saliencies
    if (type(x) is Tensor and not x.requires_grad and (x.dtype is torch.float32 or x.dtype is torch.float64)
            and x.ndim >= min_ndim and x.numel()):
        return x  # the engine's stacked block as it is: what the general route below returns, without its calls
    with torch.no_grad():
        S = saliency_stack(x, min_ndim=min_ndim, what=what)
    return S.detach()


def gramian_of(x: StepRecord | Tensor, what: str = "gramian") -> Tensor:
    """The Gramian ``G = J Jᵀ`` (T×T) as a symmetric float64 tensor, from a record or a tensor
    (validated by :func:`mtlens.engine.numerics.check_gramian`)."""
    return check_gramian(_recorded_gramian(x, what), what)


def gramian_rows_of(x: StepRecord | Tensor, what: str = "gramian") -> list[list[float]]:
    """:func:`gramian_of` as T lists of T Python floats (:func:`mtlens.engine.numerics.check_gramian_rows`)."""
    return check_gramian_rows(_recorded_gramian(x, what), what)


def _recorded_gramian(x: StepRecord | Tensor, what: str) -> Tensor:
    if isinstance(x, StepRecord):
        if x.gramian is None:
            raise ConfigurationError(
                f"{what}: this StepRecord holds no Gramian. With a loss-level method pass "
                "compute_gramian='param' (parameter level, the default of the diagnostics) or "
                "compute_gramian='feature' (with features=Z) to mtl_backward on the steps you measure."
            )
        return x.gramian
    return x
