"""Diagnostics of multi-task challenges: FD, TSR entropy, GDS, GMS, power-law α, ranking similarity.

All of them read what the engine's :class:`~mtlens.engine.StepRecord` already holds (task
saliencies ``S_t = ∂L_t/∂Z`` and the Gramian ``G = J Jᵀ``) or the model's weights; none changes
training. See docs/diagnostics.md for the formulas, the choices and their defaults.

One engine step gives both inputs (a plain ``nn.Module`` encoder with two heads, UPGrad at
parameter level; ``record.saliencies`` is ``(T, B, C)`` here, ``record.gramian`` is ``(T, T)``):

    >>> import torch
    >>> from torch import nn
    >>> import mtlens
    >>> from mtlens.diagnose import feature_disentanglement, gradient_direction_similarity
    >>> _ = torch.manual_seed(0)
    >>> encoder, heads = nn.Linear(4, 3), [nn.Linear(3, 1), nn.Linear(3, 1)]
    >>> z = encoder(torch.randn(8, 4))
    >>> losses = [head(z).pow(2).mean() for head in heads]
    >>> record = mtlens.mtl_backward(losses, features=z, shared_params=encoder.parameters(),
    ...                              method=mtlens.methods.create("upgrad"))
    >>> tuple(record.saliencies.shape), tuple(record.gramian.shape)
    ((2, 8, 3), (2, 2))
    >>> fd = feature_disentanglement(record)  # or record.saliencies
    >>> gds = gradient_direction_similarity(record).mean  # or record.gramian
    >>> 0.0 <= fd <= 1.0, -1.0 <= gds <= 1.0
    (True, True)
"""

from .gradients import (
    DirectionSimilarity,
    MagnitudeSimilarity,
    gradient_direction_similarity,
    gradient_magnitude_similarity,
    gradient_norms,
    gramian_condition_number,
)
from .monitor import METRICS, SaliencyMonitor
from .ranking import IDENTIFIER_DIRECTIONS, RankingSimilarity, ranking_similarity, summarize_steps
from .saliency import feature_disentanglement, tsr_entropy
from .spectra import (
    LayerAlpha,
    PowerLawReport,
    components_of,
    fit_power_law,
    layer_eigenvalues,
    power_law_alpha,
)

__all__ = [
    "IDENTIFIER_DIRECTIONS",
    "METRICS",
    "DirectionSimilarity",
    "LayerAlpha",
    "MagnitudeSimilarity",
    "PowerLawReport",
    "RankingSimilarity",
    "SaliencyMonitor",
    "components_of",
    "feature_disentanglement",
    "fit_power_law",
    "gradient_direction_similarity",
    "gradient_magnitude_similarity",
    "gradient_norms",
    "gramian_condition_number",
    "layer_eigenvalues",
    "power_law_alpha",
    "ranking_similarity",
    "summarize_steps",
    "tsr_entropy",
]
