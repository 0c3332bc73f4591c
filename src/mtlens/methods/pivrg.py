"""PIVRG: performance-informed weights in a FairGrad-type system G x = (w / x)^{1/2}."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..engine.protocols import SYMMETRIC, Claim, GramianWeighting
from ..errors import NonFiniteError, ShapeError, SolverError
from ._calls import EpochCalls
from ._fair import check_infeasible, check_max_norm, clip_update, solve_power_system
from ._loss_common import check_int
from ._registry import register
from ._solvers import check_gramian, to_weights
from ._utils import check, positive


def performance_weights(scores: np.ndarray, bound: float, mintemp: float) -> np.ndarray:
    """``T · softmax(scores / τ)`` with ``τ = max((max s − min s) / ln(bound), mintemp)``.

    The temperature makes the ratio of the largest to the smallest weight at most ``bound``."""
    T = scores.shape[0]
    temp = max((scores.max() - scores.min()) / np.log(bound), mintemp)
    e = np.exp((scores - scores.max()) / temp)
    return T * e / e.sum()


@register
class PIVRG(GramianWeighting):
    """PIVRG: the update solving ``G x = (w / x)^{1/2}``, ``w`` from each task's current performance.

    Reference: Qin et al., "Revisiting Fairness in Multitask Learning: A Performance-Driven
    Approach for Variance Reduction", CVPR 2025 (openaccess.thecvf.com). We follow the authors'
    code (``PIVRG`` in ``methods/weight_methods.py`` of github.com/jianke0604/MTLlib and
    github.com/jianke0604/NTKMTL): ``w = T · softmax(scores / τ)`` with
    ``τ = max((max s − min s)/ln(bound), mintemp)`` — tasks that are further behind their
    single-task baseline get larger weights, at most ``bound`` times the smallest — and the
    shared update ``d = T · Σ_t x_t g_t`` with ``x > 0`` solving ``G x = (w/x)^{1/2}`` (the
    FairGrad system with α = 2 and performance priorities) — the authors' code calls
    ``scipy.optimize.least_squares`` from ``x = 1/T``; here the solution is certified by Newton's
    method on the system's convex potential (:func:`~mtlens.methods._fair.solve_power_system`, ours:
    least squares stops short on solvable, badly scaled problems); then
    ``‖d‖`` is clipped at ``max_norm`` (authors' ``--max_norm 1.0``). Heads get weight 1
    (their own loss gradients, as in the authors' code).

    Scores: the caller reports them with :meth:`set_scores` — one number per task, the task's
    relative performance drop against its single-task baseline in percent (higher = worse;
    ``needs_task_scores``: the mtlens trainer reports, after every epoch, minus the mean over
    the task's metrics of the relative improvement ``r_m`` of :mod:`mtlens.tasks.delta` on the
    **validation** metrics, against the baseline's validation metrics; the authors average
    ``delta_fn_arr`` of the task's **training** metrics of the epoch, which our trainer does not
    compute — the same quantity on held-out data). Before the first report every score is 0
    (equal priorities), as in the authors' trainers, which start from zeros. In your own loop,
    call :meth:`on_task_scores` (or :meth:`set_scores`) after every epoch and create the method
    with ``steps_per_epoch=len(loader)``: more than one weighting call beyond an epoch without a
    report raises :class:`~mtlens.errors.ConfigurationError` naming the call (without
    ``steps_per_epoch`` the first call warns and the epoch length is learnt from the first
    report) — never a silent equal-priority run.

    Hyper-parameters (defaults, the authors' ``experiments/utils.py``): ``bound=2.0``,
    ``mintemp=10``, ``max_norm=1.0``; ``infeasible="raise"`` as our FairGrad (no positive solution
    exists when no direction improves every task; ``"least_squares"`` takes the authors' silent
    least-squares point).
    """

    name = "pivrg"
    scores: Tensor | None  # buffer
    reference = ("Qin et al., Revisiting Fairness in Multitask Learning: A Performance-Driven Approach for Variance "
                 "Reduction (PIVRG), CVPR 2025")
    defaults_source = "bound = 2.0, mintemp = 10, max_norm = 1.0, ×T (authors' code, MTLlib/NTKMTL repositories)"
    stateful = True
    state_attrs = ("_calls",)
    needs_task_scores = True
    user_calls = ("on_task_scores",)
    head_rule = ("own gradient, unit weights (authors' code: each task's loss is backpropagated, only the shared "
                 "gradient is overwritten and clipped)")

    claims = {
        "permutation_invariant": SYMMETRIC,
        "non_conflicting": Claim("solves G x = (w/x)^(1/2) > 0, so g_t·d > 0", when="common_descent"),
    }
    disclaims = {
        "homogeneous": "max_norm = 1 clips the update (authors' code): absolute; homogeneous with max_norm=0",
    }
    failures = {
        "no_common_descent": (SolverError, "G x = (w/x)^(1/2) has no positive solution when no direction improves "
                                           "every task"),
    }

    def __init__(self, bound: float = 2.0, mintemp: float = 10.0, max_norm: float = 1.0,
                 infeasible: str = "raise", steps_per_epoch: int | None = None) -> None:
        self.bound = positive("bound", bound, self.name)
        check(self.bound > 1.0, f"pivrg: bound must be > 1 (the largest/smallest weight ratio), got {bound!r}")
        self.mintemp = positive("mintemp", mintemp, self.name)
        self.max_norm = check_max_norm(max_norm, self.name)
        self.infeasible = check_infeasible(infeasible, self.name)
        if steps_per_epoch is not None:
            check_int("steps_per_epoch", steps_per_epoch, 1, self.name)
        self.register_buffer("scores", None)  # the last reported task scores (T,), float64
        self._log: dict[str, float] = {}
        self._calls = EpochCalls(self.name, steps_per_epoch,
                                 "weights the tasks by their performance drop against single-task baselines and "
                                 "stays at equal priorities without it",
                                 report="on_task_scores(scores)",
                                 what="each task's relative performance drop against its single-task baseline, in %")

    def set_scores(self, scores: Sequence[float] | Tensor) -> None:
        """Report each task's relative performance drop (%, higher = worse) for the next steps."""
        s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu().reshape(-1).numpy().copy()
        if not np.isfinite(s).all():
            raise NonFiniteError(f"pivrg: non-finite task scores {s.tolist()}")
        self.scores = torch.from_numpy(s)
        self._calls.epoch_ended()

    def on_task_scores(self, scores: Tensor) -> None:
        """The trainer's report after each epoch (``needs_task_scores``): same as :meth:`set_scores`."""
        self.set_scores(scores)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        G, _ = check_gramian(gramian, losses, self.name)
        T = G.shape[0]
        self._calls.weighting_call()
        scores = np.zeros(T) if self.scores is None else self.scores.numpy()
        if scores.shape[0] != T:
            raise ShapeError(f"pivrg: got {scores.shape[0]} task scores for {T} tasks")
        pw = performance_weights(scores, self.bound, self.mintemp)
        x, info = solve_power_system(G, np.sqrt(pw), 2.0, method=self.name, infeasible=self.infeasible)
        w, clip = clip_update(T * x, G, self.max_norm)
        self._log = {**{f"pivrg/{k}": v for k, v in {**info, **clip}.items()},
                     **{f"pivrg/priority/{t}": float(v) for t, v in enumerate(pw)}}
        return to_weights(w, gramian)

    def head_weights(self, weights: Tensor) -> Tensor:
        """Every head gets its own loss gradient (weight 1), as in the authors' code."""
        return torch.ones_like(weights)

    def log_values(self) -> dict[str, float]:
        return dict(self._log)
