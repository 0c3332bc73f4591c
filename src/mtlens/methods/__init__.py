"""Multi-task optimisation methods: loss weightings, gradient aggregators, regularisers.

Use the registry::

    >>> import mtlens.methods as M
    >>> "upgrad" in M.available()
    True
    >>> m = M.create("pcgrad", seed=0)

Every method module lives in this package and registers itself; see docs/methods.md for the
table of methods, families, levels, references and defaults.
"""

from ..engine.protocols import Claim, GramianWeighting, JacobianAggregator, LossWeighting, Method, Regularizer
from ._registry import available, create, defaults, describe, get, register

__all__ = [
    "Claim",
    "GramianWeighting",
    "JacobianAggregator",
    "LossWeighting",
    "Method",
    "Regularizer",
    "available",
    "create",
    "defaults",
    "describe",
    "get",
    "register",
]
