"""The typed output of a method's decision: everything the engine needs to write gradients."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Decision:
    """What a method decided for one step (step 2 of the engine).

    Exactly one way of updating the shared parameters is given:

    * ``weights`` (T,) float64 alone: the shared update is ``Σ_t w_t g_t`` (Gramian weightings;
      at feature level the combined saliency ``Σ_t w_t S_t`` is pushed through the encoder);
    * ``combined``: the combined Jacobian blocks (same shapes without the task dimension) of a
      Jacobian aggregator; ``weights`` may then hold values to log (e.g. DB-MTL's ratios);
    * ``objective``: the scalar a loss-level method differentiates (attached to the graph,
      ``Σ_t w_t L_t`` or a learnable weighting's objective); ``weights`` are the values to log.

    Attributes:
        weights: task weights (T,) float64, or ``None`` (aggregators without weights).
        head_weights: weights (T,) float64 of each task's loss for the task-specific parameters
            (the heads). The rule is the method's, with its source, listed in docs/methods.md:
            unit weights (each head gets its own task's gradient) unless the method's paper or
            code states another rule. Ignored at loss level (the objective trains the heads).
        combined: combined blocks of a Jacobian aggregator, or ``None``.
        objective: loss-level objective, or ``None``.
        extra_grads: gradients the method computed itself, as ``(parameter, gradient)`` pairs
            (gradient: the parameter's shape, unscaled, already the global batch's gradient under
            data parallelism), added to ``.grad`` with the rest of the step — ConsMTL's
            consistency term on the heads, FORUM's upper-level multi-gradient. Only methods that
            declare ``adds_gradients`` may return them; ``None`` otherwise.
        values: scalars to log (solver iterations, temperatures, ...).
        cacheable: whether the decision can be reused for later steps (``update_every``): true
            when it reduces to weights on the losses.
    """

    weights: Tensor | None = None
    head_weights: Tensor | None = None
    combined: list[Tensor] | None = None
    objective: Tensor | None = None
    extra_grads: list[tuple[Tensor, Tensor]] | None = None
    values: dict[str, float] = field(default_factory=dict)

    @property
    def cacheable(self) -> bool:
        return (self.combined is None and self.objective is None and self.weights is not None
                and not self.extra_grads)
