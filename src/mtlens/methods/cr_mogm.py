"""CR-MOGM: an exponential moving average of the weights of any Gramian weighting."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor

from ..engine.protocols import SYMMETRIC, Claim, GramianWeighting
from ..errors import ConfigurationError, ShapeError
from ._registry import get, register
from ._utils import in_range


@register
class CRMOGM(GramianWeighting):
    """CR-MOGM: ``λ_k = α λ_{k−1} + (1 − α) λ̂_k``, λ̂_k the weights of a wrapped Gramian weighting.

    Reference: Zhou, Zhang, Jiang, Liu, Zhang, Jiang & Hsieh (Zhou et al.), "On the Convergence of
    Stochastic Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022 (the
    "Correlation-Reduced" modifier: averaging the weights across steps reduces the correlation
    between the weights and the stochastic gradients that breaks the convergence of MGDA-type
    methods). The same wrapper is TorchJD's ``CRMOGMWeighting``, which we follow for the
    initialisation: ``λ_0 = λ̂_1`` (the first output equals the wrapped method's), unless
    ``initial_weights`` is given.

    Hyper-parameters (defaults): ``base="mgda"`` (the paper's main instance, CR-MGDA; any
    registered Gramian weighting works, built with ``base_kwargs``); ``alpha=0.9`` (TorchJD's
    default; the paper's Corollary 1 lets α_k grow towards 1 as the learning rate decays — set
    :attr:`alpha` between steps for such a schedule); ``initial_weights=None``.
    The wrapped method is a submodule (``base``): its state is part of :meth:`state_dict`.
    """

    name = "cr_mogm"
    lam: Tensor | None  # buffer
    base: GramianWeighting  # the wrapped method (a submodule)
    reference = ("Zhou et al., On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond, "
                 "NeurIPS 2022")
    defaults_source = "alpha = 0.9 and λ_0 = first weights (TorchJD CRMOGMWeighting); base = mgda (paper's CR-MGDA)"
    stateful = True
    head_rule = "own gradient, unit weights (TorchJD's mtl_backward; CR-MOGM smooths the shared weights)"

    claims = {
        "permutation_invariant": SYMMETRIC,
        "homogeneous": Claim("averages the weights of a homogeneous base (default MGDA), which do not depend on the "
                             "scale"),
    }

    def __init__(self, base: str = "mgda", alpha: float = 0.9, initial_weights: list[float] | None = None,
                 base_kwargs: Mapping[str, Any] | None = None) -> None:
        from ._registry import create

        cls = get(base)
        if not issubclass(cls, GramianWeighting) or cls is CRMOGM:
            raise ConfigurationError(
                f"cr_mogm: base='{base}' is a {cls.family} method ({cls.__name__}); CR-MOGM averages the weights "
                "of a Gramian weighting (e.g. mgda, upgrad, imtl_g, nash_mtl, fairgrad)"
            )
        self.base = cast(GramianWeighting, create(base, **dict(base_kwargs or {})))  # checked above
        self.levels = cls.levels  # type: ignore[misc]
        self.alpha = in_range("alpha", alpha, 0.0, 1.0, self.name)
        if initial_weights is not None:
            initial_weights = [float(x) for x in initial_weights]
        self.initial_weights = initial_weights
        self.register_buffer("lam", None)  # the running weights λ_k (T,), float64

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        hat = torch.as_tensor(self.base.weights(gramian, losses), dtype=torch.float64)
        T = hat.shape[0]
        if self.lam is None:
            if self.initial_weights is not None:
                if len(self.initial_weights) != T:
                    raise ShapeError(f"cr_mogm: initial_weights has {len(self.initial_weights)} entries, {T} tasks")
                prev = torch.tensor(self.initial_weights, dtype=torch.float64, device=hat.device)
            else:
                prev = hat
        else:
            prev = self.lam.to(hat.device)
            if prev.shape[0] != T:
                raise ShapeError(f"cr_mogm: built up weights for {prev.shape[0]} tasks, got {T}; create a new "
                                 "method object for a different task set")
        self.lam = self.alpha * prev + (1.0 - self.alpha) * hat
        return self.lam.clone()

    def log_values(self) -> dict[str, float]:
        return {f"cr_mogm/{k}": v for k, v in self.base.log_values().items()}
