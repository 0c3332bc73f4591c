"""The multi-task backward engine (usable in any training loop) and the method contracts.

Three steps, each usable alone (docs/engine.md): :func:`compute_task_gradients` →
``method.decide(grads)`` (a :class:`Decision`) → :func:`apply_decision`; :func:`mtl_backward`
composes them for the common loop.
"""

from .apply import apply_decision, check_decision
from .backward import DecisionCache, counters, mtl_backward, resolve_level, transform_losses
from .cross import cross_gramian
from .decision import Decision
from .gradients import TaskGradients, compute_task_gradients
from .gramian import combine_blocks, gramian_from_blocks
from .graph import find_leaves
from .lookahead import LookAhead
from .protocols import Claim, GramianWeighting, JacobianAggregator, LossWeighting, Method, Regularizer
from .record import StepRecord

__all__ = [
    "Claim",
    "Decision",
    "DecisionCache",
    "GramianWeighting",
    "JacobianAggregator",
    "LookAhead",
    "LossWeighting",
    "Method",
    "Regularizer",
    "StepRecord",
    "TaskGradients",
    "apply_decision",
    "check_decision",
    "combine_blocks",
    "compute_task_gradients",
    "counters",
    "cross_gramian",
    "find_leaves",
    "gramian_from_blocks",
    "mtl_backward",
    "resolve_level",
    "transform_losses",
]
