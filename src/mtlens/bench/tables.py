"""The report's tables, computed from a benchmark results store (no rendering here).

Reading the store (the layout ``mtlens bench`` writes; docs/benchmark.md):

* ``DIR/index.json`` lists every run entry; each run's own ``run.json`` (in ``DIR/runs/<key>/``
  or ``DIR/baselines/<key>/``) is newer when both exist and wins;
* a ``done`` run's ``results.json`` is the trainer's (``mtlens.train.trainer``): test metrics of
  the best epoch, Δ in the three conventions against the run's STL baselines, the diagnostics'
  training means, step time and peak memory.

Every run that is not ``done`` (pending, running, failed) or whose results cannot be read is
listed in the "unfinished runs" table: nothing is dropped silently.

Statistics (the rules the report states, docs/benchmark.md "Reading the report"):

* mean ± sample standard deviation (``ddof=1``) over seeds; one seed shows no ±;
* **mean rank (MR)**: :func:`mtlens.tasks.delta.mean_rank` over every test metric, among the
  configurations of one benchmark that finished at least one seed;
* **noise rule**: two configurations differ when a two-sided t-test on their per-seed values gives
  p < 0.05 (:data:`ALPHA_TEST`); otherwise the difference is "within noise". The test is the
  **paired** t-test when both ran the same seeds (seed ``i`` of one against seed ``i`` of the other:
  they share the seed's data order, initialisation and STL baselines, so what a seed does to both
  cancels), Welch's t-test otherwise. With fewer than 2 seeds on either side nothing is tested
  ("not testable"), never called a win.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..errors import ConfigurationError, IntegrityError, MTLensError
from ..tasks.delta import DELTA_CONVENTIONS, mean_rank

ALPHA_TEST = 0.05
"""Significance level of the noise rule (a two-sided t-test: paired on common seeds, else Welch's)."""

PERFORMANCE = "delta_p_task"
"""The Δ convention that ranks methods in the level comparison, Ranking Similarity and the Rep-MTL
ablation (higher is better); the leaderboard shows all three."""

VARIANT_NAMES = {
    "none": "base",
    "rep_mtl_tsr": "+TSR",
    "rep_mtl_csa": "+CSA",
    "rep_mtl": "+TSR +CSA (Rep-MTL)",
    "log_losses": "base, log losses",
}
"""Display names of the regulariser variants (Rep-MTL's ablation, arXiv:2507.21049 Table 5)."""

REP_MTL_VARIANTS = ("rep_mtl_tsr", "rep_mtl_csa", "rep_mtl")

IDENTIFIERS: tuple[tuple[str, str, str], ...] = (
    ("FD", "diag/fd", "fd"),
    ("GDS (param level)", "diag/param/gds_mean", "gds"),
    ("GMS (param level)", "diag/param/gms_mean", "gms"),
    ("GDS (feature level)", "diag/feature/gds_mean", "gds"),
    ("GMS (feature level)", "diag/feature/gms_mean", "gms"),
    ("TSR entropy", "diag/tsr_entropy", "tsr_entropy"),
)
"""``(name, key in results.json diagnostics.mean, direction key of mtlens.diagnose.ranking)``.
GDS/GMS measured at different gradient levels are never mixed in one ranking."""


# =============================================================================================
# the store
@dataclass
class RunRecord:
    """One run entry of the store, with its results when it finished and they could be read."""

    entry: dict[str, Any]
    dir: Path | None
    results: dict[str, Any] | None = None
    problem: str | None = None  # why a "done" run has no usable results

    @property
    def status(self) -> str:
        if self.entry.get("status") == "done" and self.results is None:
            return "unreadable"
        return str(self.entry.get("status", "unknown"))

    @property
    def done(self) -> bool:
        return self.results is not None

    @property
    def res(self) -> dict[str, Any]:
        """The results of a finished run (:attr:`done`)."""
        if self.results is None:
            raise ValueError(f"run {self.key} has no results ({self.status})")
        return self.results

    @property
    def key(self) -> str:
        return str(self.entry.get("key"))

    @property
    def seed(self) -> Any:
        return self.entry.get("seed")


@dataclass
class Store:
    root: Path
    suite: str | None
    runs: list[RunRecord]
    problems: list[str] = field(default_factory=list)
    #: runs found on disk but not in a readable index.json: left by an earlier configuration of the suite
    #: (other settings, methods or seeds; the store keeps their directories), so never mixed into the tables
    unlisted: list[RunRecord] = field(default_factory=list)

    def benchmarks(self) -> list[str]:
        return sorted({str(r.entry.get("benchmark")) for r in self.runs})


def _read_json(path: Path) -> tuple[Any, str | None]:
    """The file's JSON, its content hash verified when it carries one (:func:`mtlens.storage.read_json`)."""
    from ..storage import read_json

    try:
        return read_json(path, required=False), None
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except IntegrityError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"{path} cannot be read ({type(exc).__name__}: {exc})"


def load_store(store_dir: str | Path) -> Store:
    """Read ``index.json``, every ``run.json`` and the finished runs' ``results.json``.

    Raises:
        ConfigurationError: ``store_dir`` is not a results store (no ``index.json`` and no
            ``runs/*/run.json``), or its index is not the store's format.
    """
    root = Path(store_dir)
    index, problem = _read_json(root / "index.json")
    found = sorted(root.glob("runs/*/run.json")) + sorted(root.glob("baselines/*/run.json"))
    if index is None and not found:
        raise ConfigurationError(
            f"'{root}' is not a benchmark results store: it has neither index.json nor runs/*/run.json "
            f"({problem}); pass the directory `mtlens bench` wrote (its --out)"
        )
    problems: list[str] = []
    entries: dict[str, dict[str, Any]] = {}
    suite = None
    if index is not None:
        if not isinstance(index, dict) or index.get("format") != "mtlens-bench-index":
            raise ConfigurationError(
                f"{root / 'index.json'} is not a mtlens benchmark index (format 'mtlens-bench-index'); "
                "was it written by `mtlens bench`?"
            )
        suite = index.get("suite")
        for e in index.get("runs") or []:
            if isinstance(e, dict) and e.get("key"):
                entries[str(e["key"])] = e
    elif problem:
        problems.append(f"index.json unreadable ({problem}); the run directories were read instead")
    dirs: dict[str, Path] = {}
    unlisted: set[str] = set()
    for rj in found:
        e, err = _read_json(rj)
        if e is None or not isinstance(e, dict) or not e.get("key"):
            problems.append(f"{rj}: {err or 'not a run entry'}")
            continue
        key = str(e["key"])
        if key not in entries and index is not None:
            unlisted.add(key)
        entries[key] = e  # the run's own file is written last: it wins
        dirs[key] = rj.parent
    if unlisted:
        # A run the index does not list was expanded from another configuration of the suite (the same --out
        # rerun with other --set values, methods or seeds: run keys hash the whole configuration, and the old
        # directories stay on disk). Its results are not the current suite's: counting them would make an
        # earlier setting look like an extra seed of the current one.
        where = ", ".join(f"{k} ({dirs[k]})" for k in sorted(unlisted)[:3]) + (" ..." if len(unlisted) > 3 else "")
        problems.append(
            f"{'run ' + where + ' is' if len(unlisted) == 1 else f'{len(unlisted)} runs ({where}) are'} not listed in "
            "index.json: left by an earlier configuration of the suite in this store (other settings, methods or "
            "seeds), so left out of every table; delete those directories, or use another --out for each configuration"
        )
    runs: list[RunRecord] = []
    stale: list[RunRecord] = []
    for key, e in entries.items():
        d = dirs.get(key)
        if d is None and e.get("dir") and (root / str(e["dir"])).is_dir():
            d = root / str(e["dir"])
        if d is None:
            for sub in ("runs", "baselines"):
                if (root / sub / key).is_dir():
                    d = root / sub / key
        rec = RunRecord(entry=e, dir=d)
        if e.get("status") == "done":
            rel = e.get("results")
            candidates = []
            if rel:
                candidates += [root / rel, *([d / rel] if d else [])]
            if d is not None:
                candidates.append(d / "results.json")
            path = next((c for c in candidates if c.is_file()), candidates[0] if candidates else None)
            if path is None:
                rec.problem = "marked done but its entry names no results file and its directory is missing"
            else:
                res, err = _read_json(path)
                if err is None and (not isinstance(res, dict) or "metrics" not in res):
                    err = f"{path} is not a results.json"
                if err is not None:
                    rec.problem = f"marked done but {err}"
                else:
                    rec.results = res
        (stale if key in unlisted else runs).append(rec)
    runs.sort(key=lambda r: (str(r.entry.get("benchmark")), str(r.entry.get("label")), str(r.seed)))
    return Store(root=root, suite=suite, runs=runs, problems=problems, unlisted=stale)


# =============================================================================================
# configurations (a method × level × variant over seeds)
@dataclass
class Group:
    benchmark: str
    method: str
    level: str
    variant: str
    runs: list[RunRecord]

    @property
    def label(self) -> str:
        s = self.method if self.level in ("loss", "", "None") else f"{self.method} ({self.level})"
        return s if self.variant == "none" else f"{s} + {self.variant}"

    @property
    def done(self) -> list[RunRecord]:
        return [r for r in self.runs if r.done]

    def per_seed(self, get: Callable[[dict[str, Any]], Any]) -> list[float]:
        """Finite values of ``get(results)`` over the finished seeds (sorted by seed)."""
        return list(self.by_seed(get).values())

    def by_seed(self, get: Callable[[dict[str, Any]], Any]) -> dict[str, float]:
        """``{seed: value}`` for the finished seeds whose ``get(results)`` is finite (sorted by seed): what the
        paired noise rule (:func:`compare`) matches seed by seed."""
        out: dict[str, float] = {}
        for r in sorted(self.done, key=lambda r: str(r.seed)):
            try:
                v = get(r.res)
            except (KeyError, TypeError, IndexError):
                continue
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                out[str(r.seed)] = float(v)
        return out

    def nonfinite(self, get: Callable[[dict[str, Any]], Any]) -> int:
        """How many finished seeds hold a value for ``get`` that is not finite (NaN, ±inf): :meth:`per_seed`
        leaves them out of the mean, so every table that shows that mean must say so."""
        n = 0
        for r in self.done:
            try:
                v = get(r.res)
            except (KeyError, TypeError, IndexError):
                continue
            if isinstance(v, (int, float)) and not math.isfinite(float(v)):
                n += 1
        return n

    def status_text(self) -> str:
        counts: dict[str, int] = {}
        for r in self.runs:
            counts[r.status] = counts.get(r.status, 0) + 1
        n = len(self.runs)
        text = f"{counts.pop('done', 0)}/{n} done"
        return text + "".join(f"; {k} {v}" for k, v in sorted(counts.items()))


def _level(entry: dict[str, Any]) -> str:
    lv = entry.get("level")
    return "loss" if lv in (None, "", "loss") else str(lv)


def mtl_groups(store: Store, benchmark: str) -> list[Group]:
    groups: dict[tuple[str, str, str], Group] = {}
    for r in store.runs:
        e = r.entry
        if e.get("kind", "mtl") != "mtl" or str(e.get("benchmark")) != benchmark:
            continue
        k = (str(e.get("method")), _level(e), str(e.get("variant") or "none"))
        groups.setdefault(k, Group(benchmark, *k, runs=[])).runs.append(r)
    return list(groups.values())


def stl_runs(store: Store, benchmark: str) -> list[RunRecord]:
    return [r for r in store.runs if r.entry.get("kind") == "stl" and str(r.entry.get("benchmark")) == benchmark]


def reference_group(groups: Sequence[Group]) -> Group | None:
    """EW at loss level without regulariser (the cost reference), when it finished a seed."""
    for g in groups:
        if g.method == "ew" and g.level == "loss" and g.variant == "none" and g.done:
            return g
    return None


# =============================================================================================
# numbers
def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1; None below 2 values) of finite values; (None, None) if empty."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:.0f}"
    if ax >= 1:
        return f"{x:.2f}"
    if ax == 0:
        return "0"
    return f"{x:.3g}"


def pm(values: Sequence[float], signed: bool = False) -> str:
    m, s = mean_std(values)
    if m is None:
        return "—"
    head = (f"{m:+.2f}" if abs(m) < 1000 else f"{m:+.0f}") if signed else num(m)
    return head if s is None else f"{head} ± {num(s)}"


def compare(a: Sequence[float] | Mapping[str, float], b: Sequence[float] | Mapping[str, float],
            higher_is_better: bool = True) -> dict[str, Any]:
    """The noise rule: a two-sided t-test of ``b`` against ``a`` (per-seed values).

    Given two ``{seed: value}`` mappings (:meth:`Group.by_seed`) with the same seeds, the test is the paired
    t-test (``scipy.stats.ttest_rel``) on seed-matched values: configurations run on one seed share its data
    order, initialisation and STL baselines (every Δ of that seed is measured against them), and pairing
    removes that shared effect, which Welch's test counts as noise. Otherwise (sequences, or different
    seeds) it is Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``) on the values.

    Returns ``{"diff": mean(b) − mean(a), "p": p-value or None, "test": "paired" | "Welch" | None,
    "verdict": "better" | "worse" | "within noise" | "not testable (< 2 seeds)" | "no seed spread"}``
    ("better" = ``b`` better than ``a`` in the given direction, at p < :data:`ALPHA_TEST`; "no seed spread":
    a nonzero difference with nothing to measure the noise by — every seed's value equal on both sides
    for Welch, every seed's difference equal for the paired test)."""
    from scipy import stats

    paired = isinstance(a, Mapping) and isinstance(b, Mapping) and len(a) >= 2 and a.keys() == b.keys()
    if paired:
        seeds = list(cast(Mapping[str, float], a))
        av = [float(cast(Mapping[str, float], a)[k]) for k in seeds]
        bv = [float(cast(Mapping[str, float], b)[k]) for k in seeds]
    else:
        av = [float(x) for x in (a.values() if isinstance(a, Mapping) else a)]
        bv = [float(x) for x in (b.values() if isinstance(b, Mapping) else b)]
    if not av or not bv:
        return {"diff": None, "p": None, "test": None, "verdict": "missing"}
    diff = float(np.mean(bv) - np.mean(av))
    if len(av) < 2 or len(bv) < 2:
        return {"diff": diff, "p": None, "test": None, "verdict": "not testable (< 2 seeds)"}
    if paired:
        d = np.subtract(bv, av)
        # no spread of the differences beyond their float rounding (each is exact to ≈ eps · the values'
        # magnitude): the t statistic is undefined, or infinite from rounding alone
        if np.ptp(d) <= 16 * np.finfo(float).eps * max(np.abs(av).max(), np.abs(bv).max()):
            return {"diff": diff, "p": None, "test": "paired",
                    "verdict": "no seed spread" if diff != 0 else "within noise"}
        p = float(stats.ttest_rel(bv, av).pvalue)
    else:
        if np.std(av) == 0 and np.std(bv) == 0:
            return {"diff": diff, "p": None, "test": "Welch",
                    "verdict": "no seed spread" if diff != 0 else "within noise"}
        p = float(stats.ttest_ind(bv, av, equal_var=False).pvalue)
    test = "paired" if paired else "Welch"
    if not math.isfinite(p) or p >= ALPHA_TEST:
        return {"diff": diff, "p": p if math.isfinite(p) else None, "test": test, "verdict": "within noise"}
    good = diff > 0 if higher_is_better else diff < 0
    return {"diff": diff, "p": p, "test": test, "verdict": "better" if good else "worse"}


def _p_text(cmp: dict[str, Any]) -> str:
    """The p cell: the value and, when one ran, which test (``0.0085 (paired)``, ``0.187 (Welch)``)."""
    return num(cmp["p"]) if cmp.get("test") is None or cmp["p"] is None else f"{num(cmp['p'])} ({cmp['test']})"


def _metric_keys(groups: Iterable[Group]) -> tuple[list[tuple[str, str]], dict[str, dict[str, bool]]]:
    spec: dict[str, dict[str, bool]] = {}
    for g in groups:
        for r in g.done:
            for t, ms in (r.res.get("metric_directions") or {}).items():
                for m, hib in ms.items():
                    spec.setdefault(t, {})[m] = bool(hib)
    return [(t, m) for t, ms in spec.items() for m in ms], spec


def _test_metric(task: str, metric: str) -> Callable[[dict[str, Any]], Any]:
    """``results -> results["metrics"]["test"][task][metric]`` (for :meth:`Group.per_seed`)."""
    return lambda res: res["metrics"]["test"][task][metric]


def _delta(conv: str) -> Callable[[dict[str, Any]], Any]:
    return lambda res: res["delta"]["test"][conv]


def _step_ms(res: dict[str, Any]) -> float:
    return 1000.0 * res["timings"]["mean_step_s"]


MEMORY_SOURCES = {
    "training": "the trainer's peak above what was resident when training started (results.json timings.peak_memory)",
    "worker": "the worker process's peak for the whole run, interpreter and libraries included (run.json "
    "peak_memory_bytes)",
}


def _peak(r: RunRecord, source: str) -> float | None:
    """Peak memory of a finished run in bytes from ``source`` ("training" or "worker"), or None."""
    if source == "training":
        pm_ = ((r.results or {}).get("timings") or {}).get("peak_memory") or {}
        if pm_.get("peak_bytes") is None or pm_.get("start_bytes") is None:
            return None
        return float(max(pm_["peak_bytes"] - pm_["start_bytes"], 0))
    v = r.entry.get("peak_memory_bytes")
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


def _ratio(values: Sequence[float], ref: Sequence[float]) -> float | None:
    m, _ = mean_std(values)
    r, _ = mean_std(ref)
    if m is None or r is None or r <= 0:
        return None
    return m / r


# =============================================================================================
@dataclass
class Table:
    """One table: display cells (``columns``/``rows``) and the unformatted CSV (``csv_*``)."""

    key: str  # file stem of the CSV
    title: str
    caption: str
    columns: list[str]
    rows: list[list[str]]
    csv_columns: list[str]
    csv_rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [i for i, r in enumerate(self.rows) if len(r) != len(self.columns)]
        bad += [i for i, r in enumerate(self.csv_rows) if len(r) != len(self.csv_columns)]
        if bad:
            raise ValueError(f"table {self.key}: rows {bad} do not match the header (a bug in mtlens.bench.tables)")


def _arrow(hib: bool) -> str:
    return "↑" if hib else "↓"


def leaderboard(store: Store, benchmark: str) -> tuple[Table, list[Group]]:
    """Method × level × regulariser: test metrics, Δ (three conventions), MR, time and memory vs EW."""
    groups = mtl_groups(store, benchmark)
    keys, spec = _metric_keys(groups)
    done = [g for g in groups if g.done]
    notes: list[str] = []
    mr: dict[str, float] = {}
    if len(done) >= 1 and spec:
        means = {}
        for g in done:
            means[g.label] = {
                f"{t}/{m}": mean_std(g.per_seed(_test_metric(t, m)))[0] for t, m in keys
            }
        ranked = {k: v for k, v in means.items() if all(x is not None for x in v.values())}
        if ranked:
            mr = mean_rank(ranked, spec)
    ref = reference_group(groups)
    if ref is None:
        notes.append("no finished EW run (loss level, no regulariser) in this suite: time and memory are not relative")
    ref_time = ref.per_seed(_step_ms) if ref else []
    mem_source, ref_mem = None, []
    for src in MEMORY_SOURCES:  # the first source EW has; every ratio uses that same source
        ref_mem = [x for x in (_peak(r, src) for r in ref.done) if x is not None] if ref else []
        if ref_mem:
            mem_source = src
            break
    if ref and mem_source is None:
        notes.append("EW's runs hold no peak memory (not measurable on this platform, or written by an older mtlens)")
    elif mem_source is not None:
        notes.append(f"peak memory: {MEMORY_SOURCES[mem_source]}")
    if not any(g.per_seed(lambda res: res["delta"]["test"]["delta_p_task"]) for g in done) and done:
        notes.append("no run has Δ: the runs were trained without STL baselines (baseline: auto)")

    conv = list(DELTA_CONVENTIONS)
    columns = ["method", "level", "regulariser", "runs"]
    columns += [f"{t}/{m} {_arrow(spec[t][m])}" for t, m in keys]
    columns += [f"{c} {_arrow(DELTA_CONVENTIONS[c].higher_is_better)}" for c in conv]
    columns += ["MR ↓", "step time ×EW", "peak mem ×EW"]
    csv_columns = ["benchmark", "method", "level", "variant", "label", "runs", "done", "status"]
    for t, m in keys:
        csv_columns += [f"{t}/{m}_mean", f"{t}/{m}_std"]
    for c in conv:
        csv_columns += [f"{c}_mean", f"{c}_std"]
    csv_columns += [
        "mean_rank",
        "step_ms_mean",
        "step_ms_std",
        "step_time_rel_ew",
        "peak_mem_mib_mean",
        "peak_mem_source",
        "peak_mem_rel_ew",
        "nonfinite_seeds",
    ]
    rows, csv_rows = [], []
    nonfinite_groups: list[str] = []

    def order(g: Group) -> tuple[int, float, str]:
        return (0 if g.label in mr else 1, mr.get(g.label, 0.0), g.label)

    for g in sorted(groups, key=order):
        row = [
            g.method,
            g.level,
            VARIANT_NAMES.get(g.variant, g.variant) if g.variant != "none" else "—",
            g.status_text(),
        ]
        crow: list[Any] = [benchmark, g.method, g.level, g.variant, g.label, len(g.runs), len(g.done), g.status_text()]
        bad_cells: list[str] = []
        for name, get, signed in [*((f"{t}/{m}", _test_metric(t, m), False) for t, m in keys),
                                  *((c, _delta(c), True) for c in conv)]:
            vals = g.per_seed(get)
            cell = pm(vals, signed=signed)
            n_bad = g.nonfinite(get)
            if n_bad:  # a diverged seed: never averaged away in silence
                cell += f" ({n_bad} of {len(g.done)} seeds non-finite)"
                bad_cells.append(f"{name}: {n_bad}")
            row.append(cell)
            crow += list(mean_std(vals))
        if bad_cells:
            nonfinite_groups.append(g.label)
        row.append(num(mr.get(g.label)))
        crow.append(mr.get(g.label))
        times = g.per_seed(_step_ms)
        rt = _ratio(times, ref_time)
        m_t, s_t = mean_std(times)
        row.append("—" if rt is None else f"{rt:.2f}× ({num(m_t)} ms)")
        crow += [m_t, s_t, rt]
        mem = [x for x in (_peak(r, mem_source) for r in g.done) if x is not None] if mem_source else []
        rm = _ratio(mem, ref_mem)
        m_m, _ = mean_std(mem)
        row.append("—" if rm is None or m_m is None else f"{rm:.2f}× ({num(m_m / 2**20)} MiB)")
        crow += [None if m_m is None else m_m / 2**20, mem_source, rm, "; ".join(bad_cells) or None]
        rows.append(row)
        csv_rows.append(crow)
    if nonfinite_groups:
        notes.append(
            f"{', '.join(nonfinite_groups)}: some finished seeds have non-finite test metrics or Δ (the run "
            "diverged); their mean ± std are over the finite seeds only, as the cells say, and their MR ranks those "
            "means (CSV column nonfinite_seeds)"
        )

    stl = [r for r in stl_runs(store, benchmark) if r.done]
    if stl:
        row = ["STL baselines", "—", "—", f"{len(stl)} runs"]
        crow = [benchmark, "stl", "", "none", "STL baselines", len(stl), len(stl), "reference"]
        for t, m in keys:
            vals = [r.res["metrics"]["test"][t][m] for r in stl if t in r.res["metrics"]["test"]]
            row.append(pm(vals))
            crow += list(mean_std(vals))
        row += ["0 (reference)"] * len(conv) + ["—", "—", "—"]
        crow += [0.0, None] * len(conv) + [None] * 8
        rows.append(row)
        csv_rows.append(crow)

    caption = (
        "Test metrics at the epoch selected on validation, mean ± std over seeds. Δ against the STL "
        "baselines in three conventions ("
        + "; ".join(
            f"{c}: {'higher' if DELTA_CONVENTIONS[c].higher_is_better else 'lower'} is better, printed by "
            f"{DELTA_CONVENTIONS[c].used_by}"
            for c in conv
        )
        + "). MR = mean over test metrics of the configuration's rank (1 = best) among the configurations "
        "above that finished; rows are sorted by MR, which weighs every test metric alike and so can order "
        "configurations differently from Δ. Step time = mean training step (forward, backward, method, "
        "optimiser step); peak mem = peak memory (its source in the notes below); both relative "
        "to EW in this suite (same machine, same run layout)."
    )
    title = f"{benchmark}: leaderboard"
    return Table(f"{benchmark}-leaderboard", title, caption, columns, rows, csv_columns, csv_rows, notes), groups


def _nonfinite_note(groups: Iterable[Group]) -> list[str]:
    """The note of a table that compares Δ means: which configurations have seeds whose Δ is not finite (a run
    that diverged), left out of the mean, the std and the test (:meth:`Group.by_seed`)."""
    bad = [f"{g.label} ({n} of {len(g.done)})" for g in groups if (n := g.nonfinite(_delta(PERFORMANCE)))]
    if not bad:
        return []
    return [f"seeds with a non-finite {PERFORMANCE} (the run diverged), left out of the means, the stds and the "
            f"tests: {', '.join(bad)}"]


def _verdict_text(cmp: dict[str, Any], better: str, worse: str) -> str:
    v = cmp["verdict"]
    return {"better": better, "worse": worse}.get(v, v)


def level_comparison(groups: Sequence[Group], benchmark: str) -> Table | None:
    """Per gradient method: Δ and step time at parameter vs feature level, with the noise rule."""
    by = {(g.method, g.level, g.variant): g for g in groups}
    pairs = sorted((m, v) for (m, lv, v) in by if lv == "param" and (m, "feature", v) in by)
    if not pairs:
        return None
    cols = [
        "method",
        "regulariser",
        "seeds p/f",
        f"{PERFORMANCE} param",
        f"{PERFORMANCE} feature",
        "feature − param",
        "p (t-test)",
        "fast surrogate",
        "step ms param",
        "step ms feature",
        "time feature/param",
    ]
    ccols = [
        "method",
        "variant",
        "seeds_param",
        "seeds_feature",
        "param_mean",
        "param_std",
        "feature_mean",
        "feature_std",
        "diff",
        "p",
        "test",
        "verdict",
        "step_ms_param",
        "step_ms_feature",
        "time_ratio",
    ]
    rows, crows = [], []
    for m, v in pairs:
        gp, gf = by[(m, "param", v)], by[(m, "feature", v)]
        sp, sf = gp.by_seed(_delta(PERFORMANCE)), gf.by_seed(_delta(PERFORMANCE))
        dp, df = list(sp.values()), list(sf.values())
        cmp = compare(sp, sf, higher_is_better=True)
        tp, tf = gp.per_seed(_step_ms), gf.per_seed(_step_ms)
        r = _ratio(tf, tp)
        verdict = _verdict_text(cmp, "gains", "loses")
        rows.append(
            [
                m,
                VARIANT_NAMES.get(v, v) if v != "none" else "—",
                f"{len(dp)}/{len(df)}",
                pm(dp, True),
                pm(df, True),
                "—" if cmp["diff"] is None else f"{cmp['diff']:+.2f}",
                _p_text(cmp),
                verdict,
                pm(tp),
                pm(tf),
                "—" if r is None else f"{r:.2f}×",
            ]
        )
        crows.append(
            [
                m,
                v,
                len(dp),
                len(df),
                *mean_std(dp),
                *mean_std(df),
                cmp["diff"],
                cmp["p"],
                cmp["test"],
                verdict,
                mean_std(tp)[0],
                mean_std(tf)[0],
                r,
            ]
        )
    caption = (
        f"Mao et al. (arXiv:2402.03557) compare every gradient method with its gradients taken w.r.t. the "
        f'shared parameters (param) and w.r.t. the shared representation Z (feature, the "fast gradient '
        f'surrogate"). Δ = {PERFORMANCE} (higher is better), mean ± std over seeds. "gains"/"loses": the '
        f"feature level is better/worse by a two-sided t-test at p < {ALPHA_TEST} (paired on seeds when both "
        'levels ran the same seeds, else Welch\'s; the p column names it); "within noise" otherwise; with fewer '
        "than 2 seeds per side nothing is called."
    )
    by_verdict: dict[str, list[str]] = {}
    for row in rows:
        by_verdict.setdefault(row[7], []).append(row[0] if row[1] == "—" else f"{row[0]} {row[1]}")
    summary = "; ".join(f"{v}: {', '.join(ms)}" for v, ms in sorted(by_verdict.items()))
    notes = [f"the fast surrogate (feature level) — {summary}"]
    notes += _nonfinite_note(by[(m, lv, v)] for m, v in pairs for lv in ("param", "feature"))
    return Table(
        f"{benchmark}-levels", f"{benchmark}: parameter vs feature level", caption, cols, rows, ccols, crows, notes
    )


def ranking_table(
    groups: Sequence[Group], benchmark: str, n_bootstrap: int = 1000, confidence: float = 0.95
) -> Table | None:
    """Ranking Similarity of each identifier (training mean) against the test-Δ ranking of the configurations."""
    from ..diagnose.ranking import ranking_similarity

    done = [g for g in groups if g.done]
    if len(done) < 2:
        return None
    cols = [
        "identifier",
        "configurations",
        "seeds",
        "Kendall τ-b",
        f"{confidence:.0%} interval",
        "Spearman ρ",
        f"{confidence:.0%} interval ",
        "identifier ranking (best first)",
        f"{PERFORMANCE} ranking (best first)",
    ]
    ccols = [
        "identifier",
        "key",
        "n_configurations",
        "n_seeds",
        "kendall_tau",
        "kendall_low",
        "kendall_high",
        "spearman_rho",
        "spearman_low",
        "spearman_high",
        "identifier_ranking",
        "performance_ranking",
        "note",
    ]
    rows, crows = [], []
    resampling: set[str] = set()
    few: set[int] = set()  # seed counts of paired intervals drawn from a handful of distinct seed sets
    for name, key, direction in IDENTIFIERS:
        ident: dict[str, list[float]] = {}
        perf: dict[str, list[float]] = {}
        seeds: dict[str, tuple[str, ...]] = {}
        for g in done:
            iv, pv, sv = [], [], []
            for r in sorted(g.done, key=lambda r: str(r.seed)):
                mean = ((r.res.get("diagnostics") or {}).get("mean")) or {}
                d = ((r.res.get("delta") or {}).get("test") or {}).get(PERFORMANCE)
                x = mean.get(key)
                if isinstance(x, (int, float)) and math.isfinite(x) and isinstance(d, (int, float)):
                    iv.append(float(x))
                    pv.append(float(d))
                    sv.append(str(r.seed))
            if iv:
                ident[g.label], perf[g.label], seeds[g.label] = iv, pv, tuple(sv)
        # the configurations share their seeds (and each seed's STL baselines): resample the seeds jointly
        paired = len(set(seeds.values())) == 1 and len(next(iter(seeds.values()), ())) >= 2
        if not ident:
            continue
        if len(ident) < 2:
            rows.append([name, str(len(ident)), "—", "—", "—", "—", "—", "needs ≥ 2 configurations", ""])
            crows.append([name, key, len(ident), None, None, None, None, None, None, None, "", "", "too few"])
            continue
        try:
            rs = ranking_similarity(
                ident, perf, identifier=direction, n_bootstrap=n_bootstrap, confidence=confidence, seed=0,
                paired=paired,
            )
        except MTLensError as exc:
            rows.append([name, str(len(ident)), "—", "—", "—", "—", "—", f"not computed: {exc}", ""])
            crows.append([name, key, len(ident), None, None, None, None, None, None, None, "", "", str(exc)])
            continue

        if rs.n_seeds >= 2:
            resampling.add("paired" if paired else "unpaired")
            if paired and rs.n_seeds <= 4:
                few.add(rs.n_seeds)

        def iv_text(t):
            return "— (1 seed)" if t is None else f"[{num(t[0])}, {num(t[1])}]"

        rows.append(
            [
                name,
                str(rs.n_methods),
                str(rs.n_seeds),
                num(rs.kendall_tau),
                iv_text(rs.kendall_interval),
                num(rs.spearman_rho),
                iv_text(rs.spearman_interval),
                " > ".join(rs.identifier_ranking),
                " > ".join(rs.performance_ranking),
            ]
        )
        ki, si = rs.kendall_interval or (None, None), rs.spearman_interval or (None, None)
        crows.append(
            [
                name,
                key,
                rs.n_methods,
                rs.n_seeds,
                rs.kendall_tau,
                *ki,
                rs.spearman_rho,
                *si,
                " > ".join(rs.identifier_ranking),
                " > ".join(rs.performance_ranking),
                "",
            ]
        )
    if not rows:
        return None
    caption = (
        "Ranking Similarity (Mao et al., arXiv:2402.03557): each identifier is averaged over the monitored "
        "training steps of a run (the trainer's diagnostics mean), then over seeds; configurations are ranked "
        f"by it in its good direction (FD, TSR entropy: lower is better; GDS, GMS: higher) and by test "
        f"{PERFORMANCE}. Score = Kendall τ-b between the rankings (Spearman ρ beside it; 1 = same order, "
        f"−1 = reversed). Intervals: {confidence:.0%} percentile bootstrap over seeds ({n_bootstrap} "
        "resamples; seeds drawn with replacement, identifier and Δ of a seed kept together; where every "
        "configuration ran the same seeds, one draw of seeds serves them all, since a seed — its data order, "
        "its STL baselines — moves every configuration's Δ alike). GDS/GMS at parameter and feature level come "
        "from different configurations (a gradient method's own level) and are never mixed."
    )
    notes = []
    for k in sorted(few):
        distinct = math.comb(2 * k - 1, k)  # multisets of k seeds drawn from k
        notes.append(
            f"{k} seeds: a joint draw of {k} seeds with replacement has only {distinct} distinct outcomes"
            + (" (either seed alone, or both)" if k == 2 else "")
            + f", so the {confidence:.0%} interval is the spread of {distinct} scores, not a "
            "confidence interval; run more seeds (--seeds 5) before reading it as one"
        )
    if "unpaired" in resampling:
        notes.append("the configurations ran different seeds, so some intervals resample each configuration's "
                     "seeds on their own: a seed's shared effect on Δ then widens (and can shift) the interval")
    return Table(
        f"{benchmark}-ranking-similarity",
        f"{benchmark}: Ranking Similarity of FD, GDS, GMS",
        caption,
        cols,
        rows,
        ccols,
        crows,
        notes,
    )


def _loss_transform(g: Group) -> str:
    """The loss transform of a group's runs ("none" when unset), from the configuration in results.json."""
    seen = {str((r.results or {}).get("config", {}).get("loss_transform") or "none") for r in g.done}
    return seen.pop() if len(seen) == 1 else "mixed" if seen else "unknown"


def _ablation_base(by: dict[tuple[str, str, str], Group], m: str, lv: str) -> tuple[Group | None, str]:
    """The reference row of a Rep-MTL ablation and a sentence for the caption.

    The reference is the unregularised run of the same method whose loss transform equals the
    Rep-MTL variants' (a suite that runs Rep-MTL on log losses should also run the base method on
    log losses, e.g. the ``log_losses`` variant of the ``rep-mtl`` suite); otherwise the plain base
    row, with the caption saying that "vs base" then mixes the transform's effect with the
    regularisers'."""
    reg = {_loss_transform(by[(m, lv, v)]) for v in REP_MTL_VARIANTS if (m, lv, v) in by}
    candidates = [v for (mm, ll, v) in by if mm == m and ll == lv and v not in REP_MTL_VARIANTS]
    matched = [v for v in sorted(candidates, key=lambda v: v != "none")
               if len(reg) == 1 and _loss_transform(by[(m, lv, v)]) in reg]
    if matched:
        what = VARIANT_NAMES.get(matched[0], matched[0])
        note = ""
        if matched[0] != "none":
            note = (f'Reference: "{what}", the same loss transform ({next(iter(reg))}) as the Rep-MTL rows, so the '
                    "differences isolate the regularisers. ")
        return by[(m, lv, matched[0])], note
    base = by.get((m, lv, "none"))
    if base is None:
        return None, ""
    return base, (f"Caution: the reference row uses loss transform {_loss_transform(base)!r} and the Rep-MTL rows "
                  f"{', '.join(sorted(reg))!r}; \"vs base\" mixes the transform's effect with the regularisers'. ")


def rep_mtl_tables(
    groups: Sequence[Group], benchmark: str, alphas: dict[str, dict[str, float]] | None = None
) -> list[Table]:
    """Rep-MTL's ablation per base method and level: base, +TSR, +CSA, both; with α per component.

    ``alphas``: run key → {component: α} (missing runs show "—")."""
    alphas = alphas or {}
    by = {(g.method, g.level, g.variant): g for g in groups}
    bases = sorted({(m, lv) for (m, lv, v) in by if v in REP_MTL_VARIANTS})
    tables = []
    for m, lv in bases:
        base, base_note = _ablation_base(by, m, lv)
        order = ["none", *REP_MTL_VARIANTS] + sorted(
            v for (mm, ll, v) in by if mm == m and ll == lv and v not in ("none", *REP_MTL_VARIANTS)
        )
        present = [v for v in order if (m, lv, v) in by]
        comps = sorted(
            {c for g in (by[(m, lv, v)] for v in present) for r in g.done for c in alphas.get(r.key, {})},
            key=lambda c: (c != "encoder", c),
        )
        cols = [
            "variant",
            "runs",
            f"{PERFORMANCE}",
            "vs base",
            "p (t-test)",
            "effect",
            "FD (train mean) ↓",
            "TSR entropy (train mean) ↓",
            "step time ×base",
        ] + [f"α {c}" for c in comps]
        ccols = [
            "method",
            "level",
            "variant",
            "runs",
            "done",
            "delta_mean",
            "delta_std",
            "diff_vs_base",
            "p",
            "test",
            "verdict",
            "fd_mean",
            "tsr_entropy_mean",
            "time_rel_base",
        ] + [f"alpha_{c}" for c in comps]
        rows, crows = [], []
        base_s = base.by_seed(_delta(PERFORMANCE)) if base else {}
        base_t = base.per_seed(_step_ms) if base else []
        for v in present:
            g = by[(m, lv, v)]
            ds = g.by_seed(_delta(PERFORMANCE))
            d = list(ds.values())
            fd = g.per_seed(lambda res: res["diagnostics"]["mean"]["diag/fd"])
            te = g.per_seed(lambda res: res["diagnostics"]["mean"]["diag/tsr_entropy"])
            cmp: dict[str, Any]
            if base is not None and g is base:
                cmp = {"diff": None, "p": None, "test": None, "verdict": "reference"}
            elif v not in REP_MTL_VARIANTS:
                cmp = {"diff": None, "p": None, "test": None, "verdict": "not compared"}
            elif base is None:
                cmp = {"diff": None, "p": None, "test": None, "verdict": "no base run"}
            else:
                cmp = compare(base_s, ds, higher_is_better=True)
            rt = _ratio(g.per_seed(_step_ms), base_t)
            avals = {c: [alphas[r.key][c] for r in g.done if c in alphas.get(r.key, {})] for c in comps}
            rows.append(
                [
                    VARIANT_NAMES.get(v, v) + (f" ({m})" if v == "none" else ""),
                    g.status_text(),
                    pm(d, True),
                    "—" if cmp["diff"] is None else f"{cmp['diff']:+.2f}",
                    _p_text(cmp),
                    _verdict_text(cmp, "helps", "hurts"),
                    pm(fd),
                    pm(te),
                    "—" if rt is None else f"{rt:.2f}×",
                ]
                + [pm(avals[c]) for c in comps]
            )
            crows.append(
                [
                    m,
                    lv,
                    v,
                    len(g.runs),
                    len(g.done),
                    *mean_std(d),
                    cmp["diff"],
                    cmp["p"],
                    cmp["test"],
                    cmp["verdict"],
                    mean_std(fd)[0],
                    mean_std(te)[0],
                    rt,
                ]
                + [mean_std(avals[c])[0] for c in comps]
            )
        where = m if lv == "loss" else f"{m} ({lv})"
        caption = (
            f"Rep-MTL (Wang et al., ICCV 2025, arXiv:2507.21049) ablation on {where}: the base method alone, "
            "with the task-specific saliency regulation (TSR) only, the cross-task saliency alignment (CSA) only, "
            f'and both. Δ = {PERFORMANCE}; "vs base" = difference of seed means against the reference row, '
            f'"helps"/"hurts" by a two-sided t-test at p < {ALPHA_TEST} (paired on seeds when both ran the same '
            f"seeds, else Welch's; the p column names it). {base_note}"
            "FD and TSR entropy: training means of the monitored steps. "
            "α: power-law exponent of the weight spectra of the best weights per component (median over "
            "layers; mtlens.diagnose.spectra), mean ± std over seeds; α in [2, 4] reads as well trained."
        )
        suffix = "" if (m, lv) == ("ew", "loss") else f"-{m}-{lv}"
        tables.append(
            Table(
                f"{benchmark}-rep-mtl{suffix}",
                f"{benchmark}: Rep-MTL ablation ({where})",
                caption,
                cols,
                rows,
                ccols,
                crows,
                _nonfinite_note(by[(m, lv, v)] for v in present),
            )
        )
    return tables


def unfinished_table(store: Store) -> Table | None:
    """Every run that did not finish (pending, running, failed, unreadable results)."""
    bad = [r for r in [*store.runs, *store.unlisted] if not r.done]
    if not bad and not store.problems:
        return None
    cols = ["benchmark", "run", "seed", "status", "attempts", "error", "directory"]
    rows, crows = [], []
    for r in bad:
        e = r.entry
        err = r.problem or (str(e.get("error") or "").strip().splitlines() or [""])[-1]
        where = (
            "" if r.dir is None else str(r.dir.relative_to(store.root) if r.dir.is_relative_to(store.root) else r.dir)
        )
        row = [
            str(e.get("benchmark")),
            str(e.get("label") or e.get("key")),
            str(r.seed),
            r.status,
            str(e.get("attempts", "")),
            err[:300],
            where,
        ]
        rows.append(row)
        crows.append([*row[:5], r.problem or e.get("error") or "", where])
    notes = list(store.problems)
    caption = (
        "Runs without results, as the store records them (failed runs keep their error and traceback "
        "in run.json). They are left out of every other table's numbers; their configurations still "
        "appear there with the count of finished runs."
    )
    return Table("unfinished-runs", "Runs without results", caption, cols, rows, cols, crows, notes)


__all__ = [
    "ALPHA_TEST",
    "IDENTIFIERS",
    "PERFORMANCE",
    "Group",
    "RunRecord",
    "Store",
    "Table",
    "compare",
    "leaderboard",
    "level_comparison",
    "load_store",
    "mean_std",
    "mtl_groups",
    "ranking_table",
    "rep_mtl_tables",
    "unfinished_table",
]
