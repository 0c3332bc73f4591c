"""The multi-task backward engine (usable in any training loop) and the method contracts."""

from .backward import counters, mtl_backward, transform_losses
from .cross import cross_gramian
from .gramian import combine_blocks, gramian_from_blocks
from .graph import find_leaves
from .protocols import GramianWeighting, JacobianAggregator, LossWeighting, Method, Regularizer
from .record import StepRecord

__all__ = [
    "GramianWeighting",
    "JacobianAggregator",
    "LossWeighting",
    "Method",
    "Regularizer",
    "StepRecord",
    "combine_blocks",
    "counters",
    "cross_gramian",
    "find_leaves",
    "gramian_from_blocks",
    "mtl_backward",
    "transform_losses",
]
