"""A per-step monitor of the multi-task identifiers, for any training loop.

It reads only what the engine's :class:`~mtlens.engine.StepRecord` already holds — the
saliencies and the Gramian — so monitoring costs no extra backward. With a loss-level method
(EW, UW, ...) the engine computes neither unless asked, so on monitored steps the trainer must
pass ``keep_saliencies=True`` and ``compute_gramian="param"`` or ``"feature"`` to
``mtl_backward``; :meth:`SaliencyMonitor.engine_kwargs` returns exactly those arguments.
Gradient-level methods always record the Gramian at their own level, and the saliencies
whenever ``features=Z`` is given.
"""

from __future__ import annotations

import math
from typing import Any

from ..engine.protocols import LossWeighting, Method
from ..engine.record import StepRecord
from ..errors import ConfigurationError
from ._inputs import gramian_rows_of
from .gradients import _direction, _magnitude
from .saliency import feature_disentanglement, tsr_entropy

METRICS = ("fd", "tsr_entropy", "gds", "gms", "grad_norms", "cond")
_SALIENCY_METRICS = {"fd", "tsr_entropy"}
_GRAMIAN_METRICS = {"gds", "gms", "grad_norms", "cond"}


class SaliencyMonitor:
    """Compute FD, TSR entropy, GDS, GMS, per-task gradient norms and cond(G) every ``every`` steps.

    References: FD / GDS / GMS as benchmarked in arXiv:2402.03557; GMS per PCGrad
    (arXiv:2001.06782); TSR entropy from Rep-MTL (arXiv:2507.21049). Defaults: every step,
    Gramian at parameter level (the diagnostics paper's default), FD temperature 0, all metrics.

    Usage in a loop::

        monitor = SaliencyMonitor(every=10)
        for step, batch in enumerate(loader):
            z = model.encode(x); losses = ...
            record = mtl_backward(losses, features=z, shared_params=model.shared_parameters(),
                                  method=method, **monitor.engine_kwargs(step, method))
            logger.log(monitor(record, step))   # {} on steps that are not monitored

    Args:
        every: monitor steps ``0, every, 2·every, ...`` (≥ 1).
        level: where a loss-level method's Gramian is measured: ``"param"`` (default; per-task
            gradients w.r.t. the shared parameters — costs T encoder backwards on monitored steps)
            or ``"feature"`` (the saliencies' Gramian; no encoder backward). Gradient methods'
            records hold the Gramian at the method's own level, and the keys say which.
        metrics: subset of ``("fd", "tsr_entropy", "gds", "gms", "grad_norms", "cond")``.
        fd_temperature: FD's temperature (0 = plain L1 normalisation).
        prefix: key prefix (default ``"diag/"``).
        strict: raise when a monitored record lacks what a metric needs (default ``True``);
            ``False`` computes only what the record holds.

    Output keys (plain floats): ``{prefix}fd``, ``{prefix}tsr_entropy``,
    ``{prefix}<level>/gds_mean``, ``.../gds_min``, ``.../gds_conflict_fraction``,
    ``.../gms_mean``, ``.../gms_min``, ``.../grad_norm/<task>``, ``.../cond_G`` where ``<level>``
    is ``param`` or ``feature`` (the record's level), so values measured at different levels are
    never mixed.
    """

    def __init__(
        self,
        every: int = 1,
        level: str = "param",
        metrics: tuple[str, ...] = METRICS,
        fd_temperature: float = 0.0,
        prefix: str = "diag/",
        strict: bool = True,
    ):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigurationError(f"SaliencyMonitor: every must be an integer ≥ 1, got {every!r}")
        if level not in ("param", "feature"):
            raise ConfigurationError(f"SaliencyMonitor: level={level!r}; choose 'param' or 'feature'")
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise ConfigurationError(f"SaliencyMonitor: unknown metrics {unknown}; choose from {METRICS}")
        if (
            not isinstance(fd_temperature, (int, float))
            or not math.isfinite(fd_temperature)
            or fd_temperature < 0
        ):
            raise ConfigurationError(f"SaliencyMonitor: fd_temperature must be ≥ 0, got {fd_temperature!r}")
        self.every = every
        self.level = level
        self.metrics = tuple(metrics)
        self.fd_temperature = float(fd_temperature)
        self.prefix = prefix
        self.strict = strict
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    # -- what the engine must compute --------------------------------------------------------
    @property
    def needs_saliencies(self) -> bool:
        return bool(_SALIENCY_METRICS & set(self.metrics))

    @property
    def needs_gramian(self) -> bool:
        return bool(_GRAMIAN_METRICS & set(self.metrics))

    def due(self, step: int) -> bool:
        """Whether ``step`` is a monitored step."""
        return step % self.every == 0

    def engine_kwargs(self, step: int, method: Method) -> dict[str, Any]:
        """The ``mtl_backward`` keyword arguments this step needs (``{}`` when not monitored).

        For a loss-level method: ``keep_saliencies`` / ``compute_gramian`` and ``level``
        (``"param"``, or ``None`` for the feature-level Gramian). Gradient-level methods compute
        both anyway; nothing is returned for them (their ``level`` stays the caller's)."""
        if not self.due(step) or not isinstance(method, LossWeighting):
            return {}
        kw: dict[str, Any] = {}
        if self.needs_saliencies:
            kw["keep_saliencies"] = True
        if self.needs_gramian:
            kw["compute_gramian"] = "param" if self.level == "param" else "feature"
        return kw

    # -- measuring ---------------------------------------------------------------------------
    def __call__(self, record: StepRecord, step: int) -> dict[str, float]:
        """Identifiers of this step as plain floats; ``{}`` when the step is not monitored or
        the record was skipped (non-finite step: nothing was measured)."""
        if not self.due(step) or record.skipped:
            return {}
        out: dict[str, float] = {}
        p = self.prefix
        want = set(self.metrics)
        if want & _SALIENCY_METRICS:
            if record.saliencies is None:
                self._missing("saliencies", "keep_saliencies=True (and features=Z)")
            else:
                if "fd" in want:
                    out[f"{p}fd"] = feature_disentanglement(
                        record.saliencies, temperature=self.fd_temperature
                    )
                if "tsr_entropy" in want:
                    if record.saliencies.ndim >= 3:
                        out[f"{p}tsr_entropy"] = tsr_entropy(record.saliencies)
                    else:
                        self._missing(
                            "saliencies with a channel dimension (T, B, C, ...)",
                            "features Z of shape (B, C, ...)",
                        )
        if want & _GRAMIAN_METRICS:
            if record.gramian is None:
                self._missing("a Gramian", "compute_gramian='param' (or 'feature')")
            else:
                lvl = record.level if record.level in ("param", "feature") else self.level
                q = f"{p}{lvl}/"
                A = gramian_rows_of(record.gramian)  # validated once, for every identifier below
                gds = _direction(A, record.level)
                if "gds" in want:
                    out[f"{q}gds_mean"] = gds.mean
                    out[f"{q}gds_min"] = gds.min
                    out[f"{q}gds_conflict_fraction"] = gds.conflict_fraction
                if "gms" in want:
                    gms = _magnitude(A, record.level)
                    out[f"{q}gms_mean"] = gms.mean
                    out[f"{q}gms_min"] = gms.min
                if "grad_norms" in want:
                    out.update(gds.norms_dict(q, record.task_names))
                if "cond" in want:
                    out[f"{q}cond_G"] = gds.condition_number
        for k, v in out.items():
            if math.isfinite(v):
                self._sums[k] = self._sums.get(k, 0.0) + v
                self._counts[k] = self._counts.get(k, 0) + 1
        return out

    def _missing(self, what: str, fix: str) -> None:
        if self.strict:
            raise ConfigurationError(
                f"SaliencyMonitor: the StepRecord of a monitored step holds no {what}; pass {fix} to "
                "mtl_backward on monitored steps (monitor.engine_kwargs(step, method) returns them), "
                "or build the monitor with strict=False to skip what is missing"
            )

    def summary(self) -> dict[str, float]:
        """Mean of every key over the monitored steps so far (finite values only): the per-run
        summary the Ranking Similarity score uses [our choice: the mean over logged steps]."""
        return {k: self._sums[k] / self._counts[k] for k in self._sums}

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self._sums), "counts": dict(self._counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums = dict(state["sums"])
        self._counts = dict(state["counts"])


__all__ = ["METRICS", "SaliencyMonitor"]
