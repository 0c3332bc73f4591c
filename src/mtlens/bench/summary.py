"""A short terminal table of a store (used until/unless the full report is available).

One row per benchmark × label (method, level, variant) over the seeds that finished: Δp_task on
the test split (mean ± sample std over seeds, against the suite's own single-task baselines) and
the mean training step time relative to EW (no regulariser) measured in the same suite.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .store import load_index, read_results


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:+.2f}"
    return f"{statistics.fmean(xs):+.2f} ± {statistics.stdev(xs):.2f}"


def summary_rows(out: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``{benchmark: [{"label", "seeds", "delta_p_task": [...], "step_s": [...], "failed"}]}`` from the store."""
    root = Path(out)
    idx = load_index(root)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for e in idx["runs"]:
        if e["kind"] != "mtl":
            continue
        row = table.setdefault(e["benchmark"], {}).setdefault(
            e["label"], {"label": e["label"], "method": e["method"], "level": e["level"], "variant": e["variant"],
                         "seeds": [], "delta_p_task": [], "step_s": [], "failed": 0})
        if e["status"] == "failed":
            row["failed"] += 1
        if e["status"] != "done" or not e.get("results"):
            continue
        res = read_results(root / e["results"])
        if res is None:
            continue
        row["seeds"].append(e["seed"])
        if res.get("delta") and res["delta"].get("test"):
            row["delta_p_task"].append(float(res["delta"]["test"]["delta_p_task"]))
        row["step_s"].append(float(res["timings"]["mean_step_s"]))
    return {b: list(rows.values()) for b, rows in table.items()}


def summary_tables(out: str | Path) -> list:
    """Rich tables, one per benchmark."""
    from rich.table import Table

    tables = []
    for bench, rows in summary_rows(out).items():
        ew = next((r for r in rows if r["method"] == "ew" and r["variant"] == "none" and r["step_s"]), None)
        ew_step = statistics.fmean(ew["step_s"]) if ew else None
        rows = sorted(rows, key=lambda r: -statistics.fmean(r["delta_p_task"]) if r["delta_p_task"] else float("inf"))
        t = Table(title=f"{bench}: test Δp_task (%, higher is better; mean ± std over seeds)", title_justify="left")
        for col, j in (("run", "left"), ("seeds", "right"), ("Δp_task", "right"), ("step time / EW", "right")):
            t.add_column(col, justify=j)
        for r in rows:
            step = statistics.fmean(r["step_s"]) if r["step_s"] else None
            ratio = f"{step / ew_step:.2f}×" if step and ew_step else "—"
            seeds = str(len(r["seeds"])) + (f" ({r['failed']} failed)" if r["failed"] else "")
            t.add_row(r["label"], seeds, _mean_std(r["delta_p_task"]), ratio)
        tables.append(t)
    return tables
