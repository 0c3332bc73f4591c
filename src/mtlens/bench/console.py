"""Rich renderings of one run's results for the terminal (metric tables, named Δ conventions, diagnostics)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def metrics_table(
    title: str | None,
    metrics: dict[str, dict[str, float]],
    directions: dict[str, dict[str, bool]],
    baseline: dict[str, dict[str, float]] | None = None,
    units: dict[str, dict[str, str]] | None = None,
) -> Table:
    """One row per (task, metric): value (with its unit when ``units`` names one), direction, and the
    STL baseline with r_m when given."""
    table = Table(title=title, title_justify="left")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if units:
        table.add_column("unit")
    if baseline is not None:
        table.add_column("STL baseline", justify="right")
        table.add_column("r_m (%)", justify="right")
    rel = None
    if baseline is not None:
        from ..tasks.delta import relative_improvements

        rel = relative_improvements(metrics, baseline, directions)
    for t, ms in metrics.items():
        for m, v in ms.items():
            arrow = "↑" if directions.get(t, {}).get(m, True) else "↓"
            row = [t, f"{m} {arrow}", _fmt(v)]
            if units:
                row.append((units.get(t) or {}).get(m, ""))
            if baseline is not None and rel is not None:
                row += [_fmt(baseline[t][m]), f"{rel[t][m]:+.2f}"]
            table.add_row(*row)
    return table


def delta_table(delta: dict[str, float] | None, split: str, source: str | None = None) -> Table | None:
    """Δ values, each with its convention's name and direction (never a bare Δm)."""
    if not delta:
        return None
    from ..tasks.delta import DELTA_CONVENTIONS

    where = "" if source is None else f" ({'trained or reused from cache' if source == 'auto' else source})"
    table = Table(title=f"{split}: Δ against single-task baselines{where}", title_justify="left")
    table.add_column("convention")
    table.add_column("value (%)", justify="right")
    table.add_column("better")
    table.add_column("printed by", overflow="fold")
    for name, value in delta.items():
        conv = DELTA_CONVENTIONS.get(name)
        table.add_row(
            name,
            f"{value:+.3f}",
            "" if conv is None else ("higher" if conv.higher_is_better else "lower"),
            "" if conv is None else conv.used_by,
        )
    return table


def print_results(results: dict[str, Any], console: Console) -> None:
    """The end-of-run summary: test metrics vs baseline, Δ in three named conventions, final FD."""
    directions = results["metric_directions"]
    base = (results.get("baseline") or {}).get("metrics", {})
    what = "STL " + results["tasks"][0] if results["kind"] == "stl" else results["method"]
    if results.get("level"):
        what += f" ({results['level']} level)"
    regs = results.get("regularizers") or []
    if regs:
        what += " + " + " + ".join(regs)
    epochs = len(results.get("history") or [])
    console.print(f"[bold]{results['benchmark']}[/] · {what} · {epochs} epochs, {results['steps']} steps")
    console.print(f"best epoch {results['best_epoch']} (selected on val by {results['selection']['criterion']})")
    console.print(
        metrics_table(
            "test metrics (best epoch)", results["metrics"]["test"], directions, base.get("test"),
            units=results.get("metric_units"),
        )
    )
    delta = results.get("delta") or {}
    table = delta_table(delta.get("test"), "test", (results.get("baseline") or {}).get("source"))
    if table is not None:
        console.print(table)
    diag = results.get("diagnostics")
    if diag:
        final = diag["final"]
        names = {"diag/fd": "FD", "diag/tsr_entropy": "TSR entropy"}
        parts = [f"{names[k]} {final[k]:.4f}" for k in names if k in final]
        for k in final:
            for key, label in (("gds_mean", "GDS"), ("gms_mean", "GMS")):
                if k.endswith(key):
                    parts.append(f"{label} ({k.split('/')[1]}) {final[k]:.4f}")
        console.print(f"diagnostics at the last monitored step ({diag['final_step']}): " + ", ".join(parts))
    t = results["timings"]
    console.print(
        f"[dim]train {t['train_s']:.1f} s ({t['mean_step_s'] * 1000:.1f} ms/step), "
        f"eval {t['eval_s']:.1f} s, on {results['device']}[/]"
    )
    console.print(f"results: {results['out_dir']}/results.json")
