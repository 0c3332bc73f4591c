"""Ranking Similarity: does an identifier rank MTL methods the way test performance does?

Mao et al., arXiv:2402.03557 (the score's exact definition is not available to us; the choices
below are ours, marked [choice] in docs/diagnostics.md). For N methods on one benchmark and backbone:

1. each identifier is summarised per run as its mean over the logged training steps
   (:func:`summarize_steps`) [our choice], then averaged over seeds;
2. methods are ranked best → worst by the identifier in its declared good direction (FD lower
   is better; GDS, GMS higher is better — :data:`IDENTIFIER_DIRECTIONS`) and by test
   performance (Δm, higher is better by default);
3. **score = Kendall τ-b** between the two rankings (ties handled by τ-b) [our choice]; Spearman
   ρ is reported beside it; with ≥ 2 seeds a seeded percentile bootstrap over seeds gives
   intervals for both.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..errors import ConfigurationError, ShapeError

IDENTIFIER_DIRECTIONS: dict[str, bool] = {
    "fd": False,  # Feature Disentanglement: lower = more disentangled = better
    "tsr_entropy": False,  # Rep-MTL's TSR entropy: lower = more task-specific = better
    "gds": True,  # gradient direction similarity: higher = fewer conflicts = better
    "gms": True,  # gradient magnitude similarity: higher = more balanced = better
}
"""Declared good direction of each identifier: ``True`` = higher is better."""

STEP_REDUCTIONS = ("mean", "median", "last")


def summarize_steps(values: Sequence[float], reduction: str = "mean") -> float:
    """One number per run from an identifier's per-step values (default: the mean [our choice]).

    Non-finite steps (e.g. FD's NaN on an all-zero batch) are left out; a run with no finite
    value raises."""
    if reduction not in STEP_REDUCTIONS:
        raise ConfigurationError(f"summarize_steps: reduction={reduction!r}; choose one of {STEP_REDUCTIONS}")
    v = np.asarray(list(values), dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ShapeError("summarize_steps: no finite value to summarise (was the identifier ever logged?)")
    if reduction == "last":
        return float(v[-1])
    return float(np.median(v) if reduction == "median" else np.mean(v))


@dataclass(frozen=True)
class RankingSimilarity:
    """Result of :func:`ranking_similarity`.

    ``kendall_tau`` (the score) and ``spearman_rho`` on the seed means; ``*_interval`` are
    ``(low, high)`` bootstrap percentiles, or ``None`` with fewer than 2 seeds;
    ``*_bootstrap`` the resampled values (NaN where a resample made a ranking constant);
    ``identifier_ranking`` / ``performance_ranking`` list the methods best first."""

    kendall_tau: float
    spearman_rho: float
    kendall_interval: tuple[float, float] | None
    spearman_interval: tuple[float, float] | None
    kendall_bootstrap: np.ndarray | None
    spearman_bootstrap: np.ndarray | None
    identifier_ranking: list[str]
    performance_ranking: list[str]
    n_methods: int
    n_seeds: int
    confidence: float

    def to_dict(self, prefix: str = "ranking/") -> dict[str, float]:
        out = {f"{prefix}kendall_tau": self.kendall_tau, f"{prefix}spearman_rho": self.spearman_rho}
        if self.kendall_interval is not None:
            out[f"{prefix}kendall_low"], out[f"{prefix}kendall_high"] = self.kendall_interval
        if self.spearman_interval is not None:  # both intervals exist from 2 seeds on
            out[f"{prefix}spearman_low"], out[f"{prefix}spearman_high"] = self.spearman_interval
        return out


def _per_method(values: Mapping, what: str) -> dict[str, np.ndarray]:
    if not isinstance(values, Mapping):
        raise ConfigurationError(f"{what} must map method name → value or list of per-seed values")
    out = {}
    for k, v in values.items():
        a = np.asarray(v, dtype=np.float64).reshape(-1)
        if a.size == 0 or not np.isfinite(a).all():
            raise ShapeError(f"{what}['{k}'] must hold finite numbers, got {v!r}")
        out[str(k)] = a
    return out


def _tau_rho(ident: np.ndarray, perf: np.ndarray) -> tuple[float, float]:
    """τ-b and ρ between 'goodness' vectors (NaN when either ranking is constant)."""
    if np.ptp(ident) == 0 or np.ptp(perf) == 0:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tau = stats.kendalltau(ident, perf, variant="b").statistic
        rho = stats.spearmanr(ident, perf).statistic
    return float(tau), float(rho)


def _tau_rho_batch(ident: np.ndarray, perf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """τ-b and ρ of every row of ``(B, N)`` goodness matrices at once (NaN where a row is constant).

    Same values as :func:`_tau_rho` (scipy's ``kendalltau(variant="b")`` and ``spearmanr``), from the
    pairwise sign matrices ``s_ij = sign(x_i − x_j)``: τ-b = Σ s^x s^y / sqrt(Σ (s^x)² Σ (s^y)²) and
    ρ = Pearson correlation of the average ranks ``(N + 1)/2 + ½ Σ_j s_ij``. The bootstrap calls
    this once instead of scipy per resample (which took seconds per identifier)."""
    sx = np.sign(ident[:, :, None] - ident[:, None, :])
    sy = np.sign(perf[:, :, None] - perf[:, None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = (sx * sy).sum(axis=(1, 2)) / np.sqrt((sx * sx).sum(axis=(1, 2)) * (sy * sy).sum(axis=(1, 2)))
        rx = 0.5 * sx.sum(axis=2)
        ry = 0.5 * sy.sum(axis=2)  # ranks minus their mean (N + 1) / 2
        rho = (rx * ry).sum(axis=1) / np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    const = (np.ptp(ident, axis=1) == 0) | (np.ptp(perf, axis=1) == 0)
    tau[const] = np.nan
    rho[const] = np.nan
    return np.clip(tau, -1.0, 1.0), np.clip(rho, -1.0, 1.0)


def _ranking(names: list[str], goodness: np.ndarray) -> list[str]:
    order = sorted(range(len(names)), key=lambda i: (-goodness[i], names[i]))
    return [names[i] for i in order]


def _resolve_direction(higher_is_better: bool | None, identifier: str | None) -> bool:
    if identifier is not None:
        key = identifier.lower()
        if key not in IDENTIFIER_DIRECTIONS:
            raise ConfigurationError(
                f"unknown identifier {identifier!r}; known: {sorted(IDENTIFIER_DIRECTIONS)} — or pass "
                "higher_is_better explicitly"
            )
        declared = IDENTIFIER_DIRECTIONS[key]
        if higher_is_better is not None and bool(higher_is_better) != declared:
            raise ConfigurationError(
                f"identifier '{identifier}' is declared {'higher' if declared else 'lower'}-is-better but "
                f"higher_is_better={higher_is_better} was passed"
            )
        return declared
    if higher_is_better is None:
        raise ConfigurationError(
            "ranking_similarity needs the identifier's good direction: identifier='fd'|'gds'|'gms'|... or "
            "higher_is_better=True/False"
        )
    return bool(higher_is_better)


def ranking_similarity(
    identifier_values: Mapping[str, float | Sequence[float]],
    performance: Mapping[str, float | Sequence[float]],
    *,
    higher_is_better: bool | None = None,
    identifier: str | None = None,
    performance_higher_is_better: bool = True,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    paired: bool = False,
) -> RankingSimilarity:
    """Kendall τ-b (the score) and Spearman ρ between identifier and performance rankings.

    Args:
        identifier_values: method → identifier value, or method → per-seed values (each the run's
            summary, e.g. :func:`summarize_steps` of a monitor's log).
        performance: method → test performance (Δm), or method → per-seed values.
        higher_is_better: the identifier's good direction; or give ``identifier`` instead.
        identifier: ``"fd"``, ``"tsr_entropy"``, ``"gds"`` or ``"gms"``: uses the declared
            direction (:data:`IDENTIFIER_DIRECTIONS`); a contradicting ``higher_is_better`` raises.
        performance_higher_is_better: Δm is higher-is-better (default ``True``).
        n_bootstrap: bootstrap resamples (default 1000) when some method has ≥ 2 seeds.
        confidence: interval coverage (default 0.95; percentile bootstrap).
        seed: the bootstrap's random seed (results are deterministic given it).
        paired: the methods were run on the same seeds, given in the same order (value ``i`` of every
            method is seed ``i``): each resample draws ONE set of seed indices for all methods.

    Bootstrap: every resample draws, for each method independently, its seeds with replacement;
    when both inputs hold per-seed lists for a method, seed ``i`` of the identifier and of the
    performance come from the same run and are drawn together (so their lengths must match). A
    method with one value keeps it. Resamples in which a ranking is constant give NaN and are
    left out of the percentiles. With ``paired=True`` the draw is shared by all methods, as the seeds
    are: what a seed does to every method alike (its data order, its single-task baselines, which every
    run's Δ of that seed is measured against) then moves every method together and leaves the rankings
    alone, as it does in the point estimate. Drawn independently, such a shared seed effect reorders the
    methods by which seed each one drew, and the interval can even exclude the point estimate.

    Example:
        >>> r = ranking_similarity({"ew": 0.6, "mgda": 0.4, "rep": 0.3},
        ...                        {"ew": -2.0, "mgda": 0.5, "rep": 1.7}, identifier="fd")
        >>> r.kendall_tau
        1.0
    """
    better_high = _resolve_direction(higher_is_better, identifier)
    ident = _per_method(identifier_values, "identifier_values")
    perf = _per_method(performance, "performance")
    if set(ident) != set(perf):
        raise ConfigurationError(
            f"identifier_values and performance must cover the same methods; only in identifier_values: "
            f"{sorted(set(ident) - set(perf))}, only in performance: {sorted(set(perf) - set(ident))}"
        )
    names = sorted(ident)
    if len(names) < 2:
        raise ConfigurationError(f"ranking similarity needs at least 2 methods, got {names}")
    if not (0 < confidence < 1):
        raise ConfigurationError(f"confidence must be in (0, 1), got {confidence!r}")
    for m in names:
        a, b = ident[m].size, perf[m].size
        if a > 1 and b > 1 and a != b:
            raise ShapeError(
                f"method '{m}': {a} identifier seeds but {b} performance seeds; per-seed lists are paired "
                "run by run, so give both the same seeds (or a single performance value)"
            )
    s_id = 1.0 if better_high else -1.0
    s_pf = 1.0 if performance_higher_is_better else -1.0
    g_id = np.array([s_id * ident[m].mean() for m in names])
    g_pf = np.array([s_pf * perf[m].mean() for m in names])
    tau, rho = _tau_rho(g_id, g_pf)
    n_seeds = max(max(ident[m].size, perf[m].size) for m in names)

    if paired:
        sizes = {(ident[m].size, perf[m].size) for m in names}
        if len(sizes) != 1 or len(set(next(iter(sizes)))) != 1:
            raise ConfigurationError(
                "paired=True needs every method's identifier and performance on the same seeds (as many values "
                f"each); got (identifier, performance) counts {sorted(sizes)}"
            )

    k_int = s_int = k_bs = s_bs = None
    if n_seeds >= 2:
        if not isinstance(n_bootstrap, int) or n_bootstrap < 1:
            raise ConfigurationError(f"n_bootstrap must be a positive integer, got {n_bootstrap!r}")
        rng = np.random.default_rng(seed)
        gi, gp = np.empty((n_bootstrap, len(names))), np.empty((n_bootstrap, len(names)))
        shared = rng.integers(0, n_seeds, size=(n_bootstrap, n_seeds)) if paired else None
        for j, m in enumerate(names):  # all resamples of method j at once: (n_bootstrap, n) seed indices
            n = max(ident[m].size, perf[m].size)
            idx = shared if shared is not None else rng.integers(0, n, size=(n_bootstrap, n))
            gi[:, j] = s_id * (ident[m][idx].mean(axis=1) if ident[m].size > 1 else ident[m][0])
            gp[:, j] = s_pf * (perf[m][idx].mean(axis=1) if perf[m].size > 1 else perf[m][0])
        k_bs, s_bs = _tau_rho_batch(gi, gp)
        lo, hi = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2

        def interval(v):
            v = v[np.isfinite(v)]
            return (
                (math.nan, math.nan)
                if v.size == 0
                else (float(np.percentile(v, lo)), float(np.percentile(v, hi)))
            )

        k_int, s_int = interval(k_bs), interval(s_bs)
    return RankingSimilarity(
        kendall_tau=tau,
        spearman_rho=rho,
        kendall_interval=k_int,
        spearman_interval=s_int,
        kendall_bootstrap=k_bs,
        spearman_bootstrap=s_bs,
        identifier_ranking=_ranking(names, g_id),
        performance_ranking=_ranking(names, g_pf),
        n_methods=len(names),
        n_seeds=n_seeds,
        confidence=confidence,
    )


__all__ = ["IDENTIFIER_DIRECTIONS", "RankingSimilarity", "ranking_similarity", "summarize_steps"]
