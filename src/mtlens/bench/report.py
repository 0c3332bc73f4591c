"""The benchmark report: what a user reads after ``mtlens bench``.

:func:`write_report` turns a results store into ``DIR/report/``:

* ``report.md`` and a self-contained ``report.html`` (figures embedded, no network);
* one CSV per table (unformatted numbers: means and stds in separate columns);
* the PNG figures.

Per benchmark: the leaderboard (test metrics, Δ in the three named conventions, mean rank,
step time and peak memory relative to EW), parameter vs feature level (Mao et al.,
arXiv:2402.03557), Ranking Similarity of FD/GDS/GMS with bootstrap intervals and their training
dynamics, the Rep-MTL ablation with power-law α per component (arXiv:2507.21049), and a
time-vs-Δ scatter. Runs that did not finish are listed, never dropped. The rules (noise rule,
MR, bootstrap) are in :mod:`mtlens.bench.tables` and docs/benchmark.md.

:func:`leaderboard_renderables` gives the rich tables the command line prints.

>>> from mtlens.bench.report import write_report
>>> write_report("bench/quick")  # a store that mtlens bench filled  # doctest: +SKIP
PosixPath('bench/quick/report')
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError, MTLensError
from ..tasks.delta import DELTA_CONVENTIONS
from . import plots
from .html import Figure, Section, render_html, render_markdown
from .tables import (
    ALPHA_TEST,
    PERFORMANCE,
    REP_MTL_VARIANTS,
    Group,
    Store,
    Table,
    leaderboard,
    level_comparison,
    load_store,
    ranking_table,
    rep_mtl_tables,
    unfinished_table,
)

if TYPE_CHECKING:  # rich is imported where it renders
    from rich.console import Console
    from rich.table import Table as RichTable

REPORT_DIR = "report"
ALPHA_METHODS = ("mle", "weightwatcher", "none")

_DYNAMICS = (
    ("diag/fd", "fd", "Feature Disentanglement (FD, lower = more disentangled)", "FD"),
    ("diag/param/gds_mean", "gds-param", "gradient direction similarity, parameter level (GDS, mean cosine)", "GDS"),
    ("diag/param/gms_mean", "gms-param", "gradient magnitude similarity, parameter level (GMS, mean)", "GMS"),
    ("diag/feature/gds_mean", "gds-feature", "gradient direction similarity, feature level (GDS)", "GDS"),
    ("diag/feature/gms_mean", "gms-feature", "gradient magnitude similarity, feature level (GMS)", "GMS"),
)


def _atomic_write(path: Path, data: str) -> None:
    from ..storage import atomic_write_text

    atomic_write_text(path, data)


def _csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.csv_columns)
    for row in table.csv_rows:
        w.writerow(["" if (v is None or (isinstance(v, float) and not math.isfinite(v))) else v for v in row])
    return buf.getvalue()


def run_alpha(run_dir: Path, method: str = "mle") -> dict[str, float]:
    """Power-law α per component (``encoder``, ``heads/<task>``) of a run's ``best.pt`` (else ``checkpoint.pt``).

    Raises:
        CheckpointError: no weights in ``run_dir``; MissingDependencyError: ``weightwatcher``
        without the extra."""
    from ..diagnose.spectra import power_law_alpha
    from ..train.evaluate import load_model

    model, _ = load_model(run_dir)
    return dict(power_law_alpha(model, method=method).summary)


ALPHA_CACHE = ".alpha-cache.json"


def _weights_id(run_dir: Path) -> str | None:
    for name in ("best.pt", "checkpoint.pt"):
        f = run_dir / name
        if f.is_file():
            st = f.stat()
            return f"{name}:{st.st_size}:{st.st_mtime_ns}"
    return None


def _alphas(groups: list[Group], method: str, notes: list[str], cache_file: Path) -> dict[str, dict[str, float]]:
    """α per run key, reusing ``cache_file`` entries whose weights file (name, size, mtime) is unchanged."""
    if method == "none":
        return {}
    import json

    try:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    fresh: dict[str, Any] = {}
    out: dict[str, dict[str, float]] = {}
    by = {(g.method, g.level, g.variant): g for g in groups}
    bases = {(m, lv) for (m, lv, v) in by if v in REP_MTL_VARIANTS}
    for g in groups:
        if (g.method, g.level) not in bases:
            continue
        for r in g.done:
            if r.dir is None:
                continue
            wid = _weights_id(r.dir)
            hit = cache.get(r.key)
            if wid is not None and isinstance(hit, dict) and hit.get("weights") == wid and hit.get("method") == method:
                out[r.key] = {k: float(v) for k, v in hit["alpha"].items()}
            else:
                try:
                    out[r.key] = run_alpha(r.dir, method)
                except MTLensError as exc:
                    notes.append(f"α of {g.label} seed {r.seed} not computed: {exc}")
                    continue
            fresh[r.key] = {"weights": wid, "method": method, "alpha": out[r.key]}
    _atomic_write(cache_file, json.dumps(fresh, allow_nan=True))
    return out


def _benchmark_sections(
    store: Store, bench: str, out: Path, alpha_method: str, n_bootstrap: int, written: list[Path]
) -> list[Section]:
    stem = bench.replace("/", "_")
    lb, groups = leaderboard(store, bench)
    secs = [Section(f"{bench}", level=2, items=[lb])]

    def fig(path: Path | None, caption: str, into: Section) -> None:
        if path is not None:
            written.append(path)
            into.items.append(Figure(path, caption))

    cost = Section(f"{bench}: cost against Δ", level=3)
    fig(
        plots.time_delta_scatter(
            groups, f"{bench}: step time vs test {PERFORMANCE}", out / f"{stem}-time-vs-delta.png"
        ),
        f"Mean training step time against test {PERFORMANCE} (higher is better); error bars: std over seeds.",
        cost,
    )
    if cost.items:
        secs.append(cost)

    lv = level_comparison(groups, bench)
    if lv is not None:
        s = Section(f"{bench}: parameter vs feature level", level=3, items=[lv])
        fig(
            plots.level_bars(groups, f"{bench}: {PERFORMANCE} by gradient level", out / f"{stem}-levels.png"),
            f"Test {PERFORMANCE} of each gradient method at parameter and feature level (std over seeds).",
            s,
        )
        secs.append(s)

    rs = ranking_table(groups, bench, n_bootstrap=n_bootstrap)
    logs = {r.key: plots.read_log(r.dir) for g in groups for r in g.done}
    dyn = Section(f"{bench}: Ranking Similarity and training dynamics", level=3, items=[rs] if rs else [])
    for key, slug, title, ylabel in _DYNAMICS:
        fig(
            plots.dynamics_plot(groups, key, f"{bench}: {title}", ylabel, out / f"{stem}-dynamics-{slug}.png", logs),
            f"{title} on the monitored training steps, mean over seeds (band: min–max over seeds); Mao et al. "
            "Figures 3–5 style.",
            dyn,
        )
    if dyn.items:
        secs.append(dyn)

    alpha_notes: list[str] = []
    alphas = _alphas(groups, alpha_method, alpha_notes, out / f"{ALPHA_CACHE}-{stem}")
    for t in rep_mtl_tables(groups, bench, alphas):
        t.notes += alpha_notes
        if alpha_method == "none":
            t.notes.append("power-law α not computed (alpha_method='none')")
        s = Section(t.title, level=3, items=[t])
        by = {(g.method, g.level, g.variant): g for g in groups}
        base = t.csv_rows[0][:2] if t.csv_rows else None
        if base and alphas:
            m, lvl = base
            va: dict[str, dict[str, list[float]]] = {}
            for v in ("none", *REP_MTL_VARIANTS):
                g = by.get((m, lvl, v))
                if g is None:
                    continue
                va[v] = {}
                for r in g.done:
                    for comp, a in alphas.get(r.key, {}).items():
                        if math.isfinite(a):
                            va[v].setdefault(comp, []).append(a)
            fig(
                plots.alpha_bars(
                    va, f"{bench}: power-law α per component ({alpha_method})", out / f"{t.key}-alpha.png"
                ),
                f"Power-law α of the best weights per component, mean ± std over seeds (estimator: {alpha_method}).",
                s,
            )
        secs.append(s)
    return secs


def _definitions() -> Section:
    conv = "; ".join(
        f"{n} ({'higher' if c.higher_is_better else 'lower'} is better; printed by {c.used_by})"
        for n, c in DELTA_CONVENTIONS.items()
    )
    return Section(
        "How to read this report",
        level=2,
        text=[
            f"Δ conventions (mtlens.tasks.delta, always named): {conv}. r_m = ±(M_m − B_m)/B_m · 100 against the "
            "single-task (STL) baselines trained with the same settings and seed.",
            "Mean rank (MR): for each test metric the configurations of a benchmark that finished are ranked "
            "(1 = best, ties share the average rank), and MR is the mean of a configuration's ranks over all "
            "metrics (Nash-MTL, FAMO and later papers print it beside Δm). MR depends on the set compared.",
            f"Noise rule: a difference between two configurations (feature vs parameter level; a Rep-MTL term vs "
            f"its base) is called a gain or loss only when a two-sided t-test on the per-seed values gives "
            f'p < {ALPHA_TEST}; otherwise it is "within noise". The test is paired on seeds when both sides ran '
            "the same seeds (a seed's data order, initialisation and STL baselines are shared by every run of "
            "that seed, and cancel in the paired differences), Welch's otherwise; the p column names it. With "
            "fewer than 2 seeds on a side nothing is tested. With 2–3 seeds the test has little power: "
            '"within noise" does not mean "equal".',
            "Ranking Similarity: Kendall τ-b between the ranking of configurations by an identifier's training "
            f"mean and by test {PERFORMANCE}; percentile bootstrap over seeds for the interval "
            "(mtlens.diagnose.ranking.ranking_similarity).",
            "Step time: mean wall-clock time of a training step (forward, backward, the method, the optimiser "
            "step), the first step of each training session (lazy initialisation) left out. Peak memory: on "
            "CPU the process's peak resident memory during training (Linux VmHWM, reset "
            "when training starts), on CUDA torch.cuda.max_memory_allocated; shown as what training added over "
            "what was resident at its start. Both are relative to EW in the same suite; on a shared machine "
            "timings are noisy.",
        ],
    )


FINGERPRINT = ".fingerprint"


def _fingerprint(root: Path, out: Path, alpha_method: str, n_bootstrap: int) -> str:
    """Digest of everything the report reads (names, sizes and times of the store's files) and of
    the code and options that write it: equal digests mean the report on disk is current."""
    import hashlib

    h = hashlib.sha256(f"{alpha_method}|{n_bootstrap}|{out.resolve()}".encode())
    for mod in ("report.py", "tables.py", "plots.py", "html.py", "../diagnose/ranking.py"):
        h.update((Path(__file__).parent / mod).read_bytes())
    files = [root / "index.json"]
    for sub in ("runs", "baselines"):
        for name in ("run.json", "results.json", "log.jsonl", "best.pt", "checkpoint.pt"):
            files += sorted(root.glob(f"{sub}/*/{name}"))
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _status_line(store: Store) -> str:
    counts: dict[str, int] = {}
    for r in store.runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    done = counts.pop("done", 0)
    text = f"{len(store.runs)} runs in the store: {done} finished"
    if counts:
        text += ", " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        text += ' (listed in "Runs without results" at the end; their configurations show how many seeds finished)'
    return text + "."


def write_report(
    store_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    alpha_method: str = "mle",
    n_bootstrap: int = 1000,
    force: bool = False,
) -> Path:
    """Write the report of the results store ``store_dir``; return the report directory.

    Args:
        store_dir: the directory ``mtlens bench`` wrote (``index.json``, ``runs/``, ``baselines/``).
        out_dir: where to write (default ``store_dir/report``). Earlier ``.png``/``.csv`` files of a
            report there are removed first, so nothing stale survives.
        alpha_method: power-law α estimator for the Rep-MTL section: ``"mle"`` (default, built in),
            ``"weightwatcher"`` (the paper's tool; ``pip install 'mtlens[spectra]'``) or ``"none"``.
        n_bootstrap: bootstrap resamples of the Ranking Similarity intervals.
        force: rewrite even when the report is current. By default a report whose fingerprint
            (``report/.fingerprint``: the store's files by name, size and modification time, these
            options and the report code) is unchanged is left as it is, so rerunning a finished
            suite returns at once.

    Returns:
        the report directory, holding ``report.md``, ``report.html``, ``*.csv`` and ``*.png``.

    Raises:
        ConfigurationError: ``store_dir`` is not a results store, or a bad ``alpha_method``.
    """
    if alpha_method not in ALPHA_METHODS:
        raise ConfigurationError(f"alpha_method={alpha_method!r}; choose one of {ALPHA_METHODS}")
    store = load_store(store_dir)
    out = Path(out_dir) if out_dir is not None else store.root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(store.root, out, alpha_method, n_bootstrap)
    fp_file = out / FINGERPRINT
    if (
        not force
        and (out / "report.html").is_file()
        and (out / "report.md").is_file()
        and fp_file.is_file()
        and fp_file.read_text().strip() == fingerprint
    ):
        return out
    if (out / "report.md").exists() or (out / "report.html").exists():
        for old in [*out.glob("*.png"), *out.glob("*.csv")]:
            old.unlink()
    written: list[Path] = []
    sections: list[Section] = []
    bad = unfinished_table(store)
    sections.append(Section("Runs", level=2, text=[_status_line(store)]))
    benches = [
        b
        for b in store.benchmarks()
        if any(r.entry.get("kind", "mtl") == "mtl" and str(r.entry.get("benchmark")) == b for r in store.runs)
    ]
    for bench in benches:
        sections += _benchmark_sections(store, bench, out, alpha_method, n_bootstrap, written)
    if bad is not None:
        sections.append(Section("Runs without results", level=2, items=[bad]))
    sections.append(_definitions())

    tables = [it for s in sections for it in s.items if isinstance(it, Table)]
    for t in tables:
        _atomic_write(out / f"{t.key}.csv", _csv(t))
    title = f"mtlens benchmark report: {store.suite or store.root.name}"
    meta = [
        f"store: {store.root.resolve()}",
        f"written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"power-law α estimator: {alpha_method}; Ranking Similarity bootstrap: {n_bootstrap} resamples",
    ]
    _atomic_write(out / "report.md", render_markdown(title, meta, sections))
    _atomic_write(out / "report.html", render_html(title, meta, sections))
    _atomic_write(fp_file, fingerprint + "\n")
    return out


def table_rich(t: Table) -> RichTable:
    """A :class:`Table` as a ``rich.table.Table``."""
    from rich.table import Table as RichTable

    rt = RichTable(title=t.title, title_justify="left", show_lines=False)
    for i, c in enumerate(t.columns):
        rt.add_column(c, justify="left" if i < 2 else "right", overflow="fold")
    for row in t.rows:
        rt.add_row(*row)
    return rt


def _compact(lb: Table) -> Table:
    """The leaderboard for a terminal: one configuration column, the run count, Δ in the three
    conventions, MR and the cost ratios (without absolute values); the per-metric columns are in
    the report. Narrow enough for an 80-column terminal or a CI log."""
    keep = [3] + [i for i, c in enumerate(lb.columns) if i > 3 and (c.startswith(("delta", "MR", "step time",
                                                                                  "peak mem")))]
    rows = []
    for row, crow in zip(lb.rows, lb.csv_rows):
        rest = [row[i].split(" (")[0] if row[i].endswith(("ms)", "MiB)")) else row[i] for i in keep]
        rows.append([crow[4], *rest])
    columns = ["configuration", *[lb.columns[i] for i in keep]]
    title = lb.title + " (sorted by MR; per-metric columns: report.md)"
    return Table(lb.key, title, lb.caption, columns, rows, lb.csv_columns, lb.csv_rows, lb.notes)


def leaderboard_renderables(store_dir: str | Path) -> list[Any]:
    """What the terminal shows after a suite: each benchmark's leaderboard and the runs without results.

    Returns a list of rich renderables; print each on its own (``for r in ...: console.print(r)``): one
    ``console.print(*renderables)`` joins consecutive texts (the notes, the status) on one line."""
    from rich.text import Text

    store = load_store(store_dir)
    out: list[Any] = []
    for bench in store.benchmarks():
        if not any(r.entry.get("kind", "mtl") == "mtl" and str(r.entry.get("benchmark")) == bench for r in store.runs):
            continue
        lb, _ = leaderboard(store, bench)
        out.append(table_rich(_compact(lb)))
        out.extend(Text(f"note: {n}", style="yellow") for n in lb.notes)
    bad = unfinished_table(store)
    if bad is not None:
        # failed and unreadable runs in full; pending/running ones (an interrupted suite) as a count
        loud = [i for i, r in enumerate(bad.rows) if r[3] not in ("pending", "running")]
        if loud:
            shown = Table(
                bad.key,
                bad.title,
                bad.caption,
                bad.columns,
                [bad.rows[i] for i in loud],
                bad.csv_columns,
                [bad.csv_rows[i] for i in loud],
                bad.notes,
            )
            out.append(table_rich(shown))
        out.extend(Text(f"note: {n}", style="yellow") for n in bad.notes)
    out.append(Text(_status_line(store)))
    return out


def print_leaderboard(store_dir: str | Path, console: Console | None = None) -> None:
    """Print :func:`leaderboard_renderables` on ``console`` (default: a new ``rich.console.Console``)."""
    if console is None:
        from rich.console import Console

        console = Console()
    for r in leaderboard_renderables(store_dir):
        console.print(r)


def main(argv: list[str] | None = None) -> int:
    """``python -m mtlens.bench.report STORE_DIR [OUT_DIR]``: write the report, print the leaderboard."""
    import sys

    from rich.console import Console
    from rich.markup import escape

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or len(args) > 2:
        print("usage: python -m mtlens.bench.report STORE_DIR [OUT_DIR]")
        return 2
    console = Console()
    try:
        path = write_report(args[0], args[1] if len(args) > 1 else None)
    except MTLensError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1
    print_leaderboard(args[0], console)
    # one line whatever the terminal's width: a path folded at it can be neither copied nor found by a script
    console.print(f"report: {path / 'report.html'} (and report.md, CSV tables, PNG figures in {path})",
                  markup=False, highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = [
    "ALPHA_METHODS",
    "leaderboard_renderables",
    "main",
    "print_leaderboard",
    "run_alpha",
    "table_rich",
    "write_report",
]
