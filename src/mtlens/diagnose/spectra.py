"""Power-law exponent α of weight spectra, per layer and per model component.

Heavy-tailed self-regularisation (Martin & Mahoney, arXiv:1810.01075, JMLR 2021; WeightWatcher,
https://github.com/CalculatedContent/WeightWatcher): fit the empirical spectral density of each
layer's ``WᵀW`` to a power law ``p(λ) ∝ λ^(−α)`` above ``λ_min``; α in [2, 4] reads as well
trained, α > 6 as under-trained / over-parameterised. Rep-MTL (arXiv:2507.21049, Sec. 4.3,
App. C) reports it per component: the shared backbone (median over its layers) and each head.

Two estimators, chosen explicitly (never switched silently):

* ``method="mle"`` (default, in Python and in ``mtlens diagnose``): our built-in estimator with
  no extra dependency. Eigenvalues as WeightWatcher
  extracts them (a Linear/Embedding weight is one matrix; a convolution weight
  ``(out, in, *kernel)`` gives one ``out × in`` slice per kernel position, whose eigenvalues are
  pooled), then the continuous power-law MLE of Clauset, Shalizi & Newman (SIAM Review 2009,
  arXiv:0706.1062): ``α = 1 + n / Σ_{λ ≥ λ_min} ln(λ / λ_min)`` with ``λ_min`` chosen among the
  eigenvalues to minimise the Kolmogorov–Smirnov distance of the fitted tail, over tails of at
  least ``min_tail`` (8) eigenvalues.
* ``method="weightwatcher"``: ``weightwatcher.WeightWatcher(model).analyze()`` on each
  component, its defaults untouched except ``min_evals``. Needs ``pip install 'mtlens[spectra]'``.
  The estimator Rep-MTL's figures used.

Why one default, and this one: on spectra drawn from a power law the two agree (tested). Where
a spectrum is not a power law (e.g. near initialisation: a Marchenko–Pastur bulk) WeightWatcher
may pick ``λ_min`` so that the fitted "tail" is a handful of the largest eigenvalues, and report
α of 10–20 (LeNet's 50×500 layer at initialisation: α = 20.3 from its 7 largest eigenvalues,
against 4.6 from a 36-eigenvalue tail with ``min_tail = 8``; the same fit with ``min_tail ≤ 7``
gives WeightWatcher's 20.3 exactly). The built-in estimator's minimum tail avoids those
few-point fits, and it needs no extra. Use ``method="weightwatcher"`` to compare with the
paper's numbers.
"""

from __future__ import annotations

import contextlib
import io
import math
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigurationError, require

SPECTRA_METHODS = ("weightwatcher", "mle")
DEFAULT_SPECTRA_METHOD = "mle"
"""The one default estimator of :func:`power_law_alpha` and ``mtlens diagnose --alpha`` (see above)."""
SUMMARIES = ("median", "mean")
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


@dataclass(frozen=True)
class LayerAlpha:
    """α of one layer: ``component``, ``layer`` (module path inside it; "" = the component
    itself), ``kind`` (module class), ``alpha``, ``num_evals`` (eigenvalues fitted),
    ``xmin`` (λ_min of the tail) and ``ks_distance`` (KS distance of the fit)."""

    component: str
    layer: str
    kind: str
    alpha: float
    num_evals: int
    xmin: float
    ks_distance: float


@dataclass(frozen=True)
class PowerLawReport:
    """Per-layer α and the per-component summary.

    ``summary[component]`` is the median (or mean) α over that component's analysed layers, NaN
    when none could be analysed — ``skipped`` then says why, as ``(component, layer, reason)``."""

    method: str
    layers: list[LayerAlpha]
    skipped: list[tuple[str, str, str]]
    summary: dict[str, float]
    reduce: str = field(default="median")

    def to_dict(self, prefix: str = "alpha/") -> dict[str, float]:
        """``{prefix + component: α}``, plain floats ready for logging."""
        return {f"{prefix}{c}": float(v) for c, v in self.summary.items()}

    def component(self, name: str) -> list[LayerAlpha]:
        return [la for la in self.layers if la.component == name]


# ----------------------------------------------------------------------------------------------
def components_of(model: nn.Module | Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """``{component: module}``: explicit mapping as given, or ``encoder`` + ``heads/<task>``.

    A model with ``encoder`` and ``heads`` (e.g. :class:`mtlens.models.hps.HPSModel`) gives
    ``{"encoder": model.encoder, "heads/<task>": model.heads[task], ...}``."""
    if isinstance(model, Mapping):
        comps = dict(model)
    elif isinstance(model, nn.Module) and hasattr(model, "encoder") and hasattr(model, "heads"):
        heads = model.heads
        if isinstance(heads, (nn.ModuleDict, Mapping)):
            items = list(heads.items())
        elif isinstance(heads, (nn.ModuleList, list, tuple)):
            items = [(str(i), h) for i, h in enumerate(heads)]
        else:
            raise ConfigurationError(
                f"model.heads is a {type(heads).__name__}; expected a ModuleDict/ModuleList, or pass "
                "{component: module} explicitly"
            )
        encoder = model.encoder
        if not isinstance(encoder, nn.Module):
            raise ConfigurationError(f"model.encoder is a {type(encoder).__name__}, not an nn.Module")
        comps = {"encoder": encoder, **{f"heads/{k}": h for k, h in items}}
    else:
        raise ConfigurationError(
            f"power_law_alpha needs a model with .encoder and .heads (HPSModel) or an explicit "
            f"{{component: module}} mapping; got {type(model).__name__}"
        )
    if not comps:
        raise ConfigurationError("power_law_alpha: no components to analyse")
    for k, m in comps.items():
        if not isinstance(m, nn.Module):
            raise ConfigurationError(f"component '{k}' is a {type(m).__name__}, not an nn.Module")
    return comps


def _weight_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in module.named_modules()
        if isinstance(m, WEIGHT_LAYERS) and isinstance(getattr(m, "weight", None), torch.Tensor)
    ]


def layer_eigenvalues(weight: torch.Tensor) -> np.ndarray:
    """Eigenvalues of ``WᵀW`` (ascending, float64), with convolution kernels sliced as WeightWatcher.

    A 2-D weight is one matrix; a weight ``(out, in, *kernel)`` gives one ``out × in`` matrix per
    kernel position and the eigenvalues of all slices are pooled. Eigenvalues are squared
    singular values (no ``1/N`` normalisation: α is scale-free)."""
    W = weight.detach().to("cpu", torch.float64)
    if W.ndim == 2:
        mats = W.unsqueeze(0)
    elif W.ndim >= 3:
        mats = W.reshape(W.shape[0], W.shape[1], -1).permute(2, 0, 1)  # (positions, out, in)
    else:
        raise ConfigurationError(
            f"layer_eigenvalues needs a weight with ≥ 2 dimensions, got shape {tuple(W.shape)}"
        )
    sv = torch.linalg.svdvals(mats)
    return np.sort((sv * sv).reshape(-1).numpy())


def fit_power_law(evals: np.ndarray, min_tail: int = 8) -> tuple[float, float, float, int]:
    """Clauset–Shalizi–Newman continuous power-law fit: ``(alpha, xmin, ks_distance, n_tail)``.

    For each candidate ``λ_min`` (every eigenvalue leaving a tail of at least ``min_tail``),
    ``α = 1 + n / Σ ln(λ_i / λ_min)`` and the two-sided KS distance between the tail's empirical
    CDF and ``1 − (λ/λ_min)^(1−α)``; the candidate with the smallest distance wins.
    Non-positive eigenvalues (a rank-deficient W) cannot lie on a power law and must be removed
    by the caller (:func:`power_law_alpha` drops those below numpy's rank tolerance)."""
    x = np.sort(np.asarray(evals, dtype=np.float64))
    if x.size == 0 or x[0] <= 0:
        raise ConfigurationError("fit_power_law needs positive eigenvalues")
    n = x.size
    if min_tail < 2 or n < min_tail:
        raise ConfigurationError(
            f"fit_power_law: {n} eigenvalues for min_tail={min_tail} (need min_tail ≥ 2 and n ≥ min_tail)"
        )
    logx = np.log(x)
    suffix = np.cumsum(logx[::-1])[::-1]  # Σ_{k ≥ i} ln x_k
    best = (math.inf, math.nan, math.nan, 0)
    for i in range(n - min_tail + 1):
        m = n - i
        s = suffix[i] - m * logx[i]
        if s <= 0:  # the whole tail equals λ_min
            continue
        alpha = 1.0 + m / s
        cdf = 1.0 - np.exp((1.0 - alpha) * (logx[i:] - logx[i]))
        k = np.arange(m, dtype=np.float64)
        D = float(max(np.max(np.abs((k + 1) / m - cdf)), np.max(np.abs(k / m - cdf))))
        if best[0] > D:
            best = (D, alpha, float(x[i]), m)
    D, alpha, xmin, m = best
    if not math.isfinite(D):
        return math.nan, math.nan, math.nan, 0
    return float(alpha), xmin, D, m


def _mle_layers(
    comp: str, module: nn.Module, min_evals: int, min_tail: int
) -> tuple[list[LayerAlpha], list[tuple[str, str, str]]]:
    out: list[LayerAlpha] = []
    skipped: list[tuple[str, str, str]] = []
    for name, layer in _weight_layers(module):
        W = layer.weight
        assert isinstance(W, torch.Tensor)  # _weight_layers keeps layers whose weight is a tensor
        ev = layer_eigenvalues(W)
        rows, cols = (W.shape[0], W.shape[1])
        tol = (math.sqrt(ev[-1]) if ev.size else 0.0) * max(rows, cols) * np.finfo(np.float64).eps
        ev = ev[ev > tol * tol]
        if ev.size < max(min_evals, min_tail):
            skipped.append(
                (comp, name, f"only {ev.size} non-zero eigenvalues (< min_evals={max(min_evals, min_tail)})")
            )
            continue
        alpha, xmin, D, m = fit_power_law(ev, min_tail=min_tail)
        if not math.isfinite(alpha):
            skipped.append((comp, name, "degenerate spectrum (all eigenvalues equal): no power-law tail"))
            continue
        out.append(LayerAlpha(comp, name, type(layer).__name__, alpha, int(ev.size), xmin, D))
    return out, skipped


def _import_weightwatcher():
    sink = io.StringIO()
    # weightwatcher prints on import and calls warnings.simplefilter("ignore") globally; keep both local.
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        return require("weightwatcher", "spectra", "Power-law α with method='weightwatcher'")


def _ww_layers(
    ww: types.ModuleType, comp: str, module: nn.Module, min_evals: int, options: dict[str, Any]
) -> tuple[list[LayerAlpha], list[tuple[str, str, str]]]:
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), warnings.catch_warnings():
        # weightwatcher's own pandas deprecation noise, not about the user's model
        warnings.filterwarnings("ignore", message="Passing a dict to DataFrame.from_records")
        df = ww.WeightWatcher(model=module).analyze(min_evals=min_evals, **options)
    ours = dict(_weight_layers(module))
    out: list[LayerAlpha] = []
    seen: set[str] = set()
    skipped_rows: list[tuple[str, str, str]] = []
    if len(df) and "alpha" in df.columns:
        for _, row in df.iterrows():
            name = str(row["longname"])
            if name not in ours and "" in ours and name == type(module).__name__:
                name = ""  # weightwatcher names a root layer by its class
            seen.add(name)
            alpha = float(row["alpha"])
            if not (math.isfinite(alpha) and alpha > 1):
                skipped_rows.append(
                    (comp, name, f"weightwatcher returned alpha={alpha} (no valid power-law fit)")
                )
                continue
            kind = type(ours[name]).__name__ if name in ours else str(row.get("layer_type", ""))
            out.append(
                LayerAlpha(
                    comp,
                    name,
                    kind,
                    alpha,
                    int(row["num_evals"]),
                    float(row.get("xmin", math.nan)),
                    float(row.get("D", math.nan)),
                )
            )
    skipped = [
        (
            comp,
            n,
            f"not analysed by weightwatcher (fewer than min_evals={min_evals} eigenvalues, or a "
            "layer type it does not support)",
        )
        for n in ours
        if n not in seen
    ]
    return out, skipped_rows + skipped


def power_law_alpha(
    model: nn.Module | Mapping[str, nn.Module],
    method: str = DEFAULT_SPECTRA_METHOD,
    reduce: str = "median",
    min_evals: int = 8,
    min_tail: int = 8,
    ww_options: Mapping | None = None,
) -> PowerLawReport:
    """Power-law α per layer and per component (Rep-MTL Sec. 4.3; Martin & Mahoney; WeightWatcher).

    Args:
        model: a model with ``encoder`` and ``heads`` (HPSModel) — components ``"encoder"`` and
            ``"heads/<task>"`` — or an explicit ``{component: module}`` mapping.
        method: ``"mle"`` (default: the built-in Clauset MLE, see the module docstring for why) or
            ``"weightwatcher"`` (needs ``pip install 'mtlens[spectra]'``). Never switched silently.
        reduce: per-component summary over layers, ``"median"`` (default, the paper's) or ``"mean"``.
        min_evals: layers with fewer eigenvalues are skipped and listed in ``skipped``
            (default 8, WeightWatcher's default).
        min_tail: smallest tail the MLE may fit (``method="mle"``; default 8).
        ww_options: extra keyword arguments for ``WeightWatcher.analyze`` (``method="weightwatcher"``).

    Returns:
        a :class:`PowerLawReport`; ``report.summary`` maps component → α.
    """
    if method not in SPECTRA_METHODS:
        raise ConfigurationError(f"power_law_alpha: method={method!r}; choose one of {SPECTRA_METHODS}")
    if reduce not in SUMMARIES:
        raise ConfigurationError(f"power_law_alpha: reduce={reduce!r}; choose one of {SUMMARIES}")
    if not isinstance(min_evals, int) or min_evals < 2:
        raise ConfigurationError(f"power_law_alpha: min_evals must be an integer ≥ 2, got {min_evals!r}")
    if method != "weightwatcher" and ww_options:
        raise ConfigurationError("power_law_alpha: ww_options only apply to method='weightwatcher'")
    comps = components_of(model)
    ww = _import_weightwatcher() if method == "weightwatcher" else None
    layers: list[LayerAlpha] = []
    skipped: list[tuple[str, str, str]] = []
    summary: dict[str, float] = {}
    for comp, module in comps.items():
        if ww is not None:
            got, skip = _ww_layers(ww, comp, module, min_evals, dict(ww_options or {}))
        else:
            got, skip = _mle_layers(comp, module, min_evals, min_tail)
        if not _weight_layers(module):
            skip.append((comp, "", "no Linear/Conv/Embedding layer in this component"))
        layers += got
        skipped += skip
        alphas = np.array([la.alpha for la in got if math.isfinite(la.alpha)], dtype=np.float64)
        if alphas.size == 0:
            summary[comp] = math.nan
        else:
            summary[comp] = float(np.median(alphas) if reduce == "median" else np.mean(alphas))
    return PowerLawReport(method=method, layers=layers, skipped=skipped, summary=summary, reduce=reduce)


__all__ = [
    "LayerAlpha",
    "PowerLawReport",
    "components_of",
    "fit_power_law",
    "layer_eigenvalues",
    "power_law_alpha",
]
