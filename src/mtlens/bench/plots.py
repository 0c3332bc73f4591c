"""Figures of runs and of the report (matplotlib, Agg backend; PNG files).

The report's figures:

* ``dynamics_plot`` — an identifier (FD, GDS, GMS) over training steps, one line per
  configuration (mean over seeds at each monitored step; shaded: min–max over seeds), as Mao et
  al.'s Figures 3–5 (arXiv:2402.03557);
* ``time_delta_scatter`` — mean step time against Δ, error bars = std over seeds;
* ``level_bars`` — Δ at parameter vs feature level per gradient method;
* ``alpha_bars`` — power-law α per component for each Rep-MTL variant.

One run's training dynamics from its ``log.jsonl`` (:func:`plot_run`, ``mtlens diagnose``; each
figure written only when the log holds its series):

* ``losses.png`` — per-task training loss over steps;
* ``weights.png`` — per-task weights the method used;
* ``fd.png`` — Feature Disentanglement (and TSR entropy) on monitored steps;
* ``gds.png`` / ``gms.png`` — gradient direction / magnitude similarity (mean and min), per level;
* ``grad_norms.png`` — per-task gradient norms;
* ``val.png`` — validation metrics per epoch, one panel per task;
* ``alpha.png`` — power-law α per component of the best weights (:func:`plot_alpha`, when computed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..train.records import read_jsonl
from .tables import PERFORMANCE, VARIANT_NAMES, Group, mean_std

if TYPE_CHECKING:  # matplotlib is imported lazily (the report only)
    from matplotlib.figure import Figure

LEVEL_MARKERS = {"loss": "o", "param": "s", "feature": "^"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: Path, **kw: Any) -> Path:
    """Write the figure as PNG atomically (mtlens.storage.atomic_write) and close it."""
    from ..storage import atomic_write

    atomic_write(path, "wb", lambda f: fig.savefig(f, format="png", dpi=100, **kw))
    _plt().close(fig)
    return path


def _colors(n: int) -> list[tuple[float, float, float, float]]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def read_log(run_dir: Path | None) -> list[dict[str, Any]]:
    """The step records of a run's ``log.jsonl`` ([] when absent; a torn last line is skipped).

    Raises:
        IntegrityError: a corrupt line (the hash chain is verified, see :func:`mtlens.train.records.read_jsonl`).
    """
    if run_dir is None or not (run_dir / "log.jsonl").is_file():
        return []
    return [rec for rec in read_jsonl(run_dir / "log.jsonl", allow_torn_tail=True) if rec.get("type") == "step"]


def dynamics_series(
    group: Group, key: str, logs: dict[str, list[dict[str, Any]]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, mean, low, high) of ``key`` over the group's finished seeds, or None."""
    per_step: dict[int, list[float]] = {}
    for r in group.done:
        for rec in logs.get(r.key, []):
            v = rec.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                per_step.setdefault(int(rec["global_step"]), []).append(float(v))
    if not per_step:
        return None
    steps = sorted(per_step)
    vals = [per_step[s] for s in steps]
    return (
        np.array(steps),
        np.array([np.mean(v) for v in vals]),
        np.array([min(v) for v in vals]),
        np.array([max(v) for v in vals]),
    )


LEVEL_TITLES = {"loss": "loss weightings and regularisers", "param": "parameter level", "feature": "feature level"}


def dynamics_plot(
    groups: Sequence[Group], key: str, title: str, ylabel: str, path: Path, logs: dict[str, list[dict[str, Any]]]
) -> Path | None:
    """One panel per gradient level present (loss / param / feature), shared y axis, a line per configuration."""
    series = [(g, s) for g in groups if (s := dynamics_series(g, key, logs)) is not None]
    if not series:
        return None
    levels = [lv for lv in ("loss", "param", "feature") if any(g.level == lv for g, _ in series)]
    levels += sorted({g.level for g, _ in series} - set(levels))
    plt = _plt()
    fig, axes = plt.subplots(1, len(levels), figsize=(5.2 * len(levels) + 1, 4.6), sharey=True, squeeze=False)
    # one colour per method + variant, the same in every panel (mgda at param and feature level alike)
    names = sorted({(g.method, g.variant) for g, _ in series})
    color = dict(zip(names, _colors(len(names))))
    style = {n: ["-", "--", ":", "-."][(i // 20) % 4] for i, n in enumerate(names)}
    for ax, lv in zip(axes[0], levels):
        mine = sorted(((g, s) for g, s in series if g.level == lv), key=lambda t: t[0].label)
        for g, (x, m, lo, hi) in mine:
            c = color[(g.method, g.variant)]
            ax.plot(x, m, color=c, linestyle=style[(g.method, g.variant)], linewidth=1.4, label=g.label)
            if len(g.done) > 1:
                ax.fill_between(x, lo, hi, color=c, alpha=0.12, linewidth=0)
        ax.set_title(LEVEL_TITLES.get(lv, lv), fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(mine) > 8 else 1, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    return _save(fig, path, bbox_inches="tight")


def time_delta_scatter(groups: Sequence[Group], title: str, path: Path) -> Path | None:
    pts = []
    for g in groups:
        t = g.per_seed(lambda res: 1000.0 * res["timings"]["mean_step_s"])
        d = g.per_seed(lambda res: res["delta"]["test"][PERFORMANCE])
        if t and d:
            pts.append((g, mean_std(t), mean_std(d)))
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for (g, (tm, ts), (dm, ds)), c in zip(pts, _colors(len(pts))):
        ax.errorbar(
            tm,
            dm,
            xerr=ts or 0.0,
            yerr=ds or 0.0,
            fmt=LEVEL_MARKERS.get(g.level, "D"),
            color=c,
            markersize=7,
            capsize=3,
            label=g.label,
        )
        ax.annotate(g.label, (tm, dm), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("mean training step time (ms)")
    ax.set_ylabel(f"test {PERFORMANCE} (%) ↑")
    ax.set_title(title + "  (marker: o loss, □ param, △ feature level)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def level_bars(groups: Sequence[Group], title: str, path: Path) -> Path | None:
    by = {(g.method, g.level, g.variant): g for g in groups}
    pairs = sorted((m, v) for (m, lv, v) in by if lv == "param" and (m, "feature", v) in by)
    if not pairs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(pairs) + 2), 4))
    x = np.arange(len(pairs))
    for off, lv, c in ((-0.2, "param", "tab:blue"), (0.2, "feature", "tab:orange")):
        ms, ss = [], []
        for m, v in pairs:
            mu, sd = mean_std(by[(m, lv, v)].per_seed(lambda res: res["delta"]["test"][PERFORMANCE]))
            ms.append(np.nan if mu is None else mu)
            ss.append(0.0 if sd is None else sd)
        ax.bar(x + off, ms, width=0.4, yerr=ss, capsize=3, color=c, label=f"{lv} level")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([m if v == "none" else f"{m} + {v}" for m, v in pairs], rotation=20, ha="right")
    ax.set_ylabel(f"test {PERFORMANCE} (%) ↑")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)


def alpha_bars(variant_alphas: dict[str, dict[str, list[float]]], title: str, path: Path) -> Path | None:
    """``variant → component → per-seed α``; grouped bars (mean ± std) with the [2, 4] band."""
    comps = sorted({c for d in variant_alphas.values() for c in d}, key=lambda c: (c != "encoder", c))
    if not comps:
        return None
    plt = _plt()
    variants = list(variant_alphas)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(comps) + 2), 4))
    w = 0.8 / max(len(variants), 1)
    x = np.arange(len(comps))
    for i, (v, c) in enumerate(zip(variants, _colors(len(variants)))):
        ms, ss = [], []
        for comp in comps:
            mu, sd = mean_std(variant_alphas[v].get(comp, []))
            ms.append(np.nan if mu is None else mu)
            ss.append(0.0 if sd is None else sd)
        ax.bar(x - 0.4 + w * (i + 0.5), ms, width=w, yerr=ss, capsize=2, color=c, label=VARIANT_NAMES.get(v, v))
    ax.axhspan(2, 4, color="tab:green", alpha=0.1, label="α in [2, 4]")
    ax.set_xticks(x)
    ax.set_xticklabels(comps)
    ax.set_ylabel("power-law α (median over layers)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["alpha_bars", "dynamics_plot", "dynamics_series", "level_bars", "read_log", "time_delta_scatter"]


# -- one run's training dynamics (mtlens diagnose) ------------------------------------------------
def _series(steps: list[dict[str, Any]], pattern: str) -> dict[str, tuple[list[int], list[float]]]:
    rx = re.compile(pattern)
    out: dict[str, tuple[list[int], list[float]]] = {}
    for rec in steps:
        for k, v in rec.items():
            m = rx.fullmatch(k)
            if m and isinstance(v, (int, float)):
                xs, ys = out.setdefault(m.group(1) if m.groups() else k, ([], []))
                xs.append(rec["global_step"])
                ys.append(float(v))
    return out


def _line_plot(
    path: Path, series: dict[str, tuple[list[int], list[float]]], title: str, ylabel: str, logy: bool = False
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, label=label, marker="." if len(xs) < 60 else None, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(records: Sequence[dict[str, Any]], out_dir: Path, title: str = "") -> tuple[list[Path], list[str]]:
    """Write the figures of one run; return (written files, notes about absent series)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    written: list[Path] = []
    notes: list[str] = []
    pre = f"{title}: " if title else ""

    losses = _series(steps, r"train/loss/(.+)")
    if losses:
        written.append(_line_plot(out_dir / "losses.png", losses, pre + "training loss per task", "loss", logy=True))
    weights = _series(steps, r"train/weight/(.+)")
    if weights:
        written.append(_line_plot(out_dir / "weights.png", weights, pre + "task weights", "weight"))
    else:
        notes.append("no task weights in the log (a Jacobian aggregator that does not reduce to weights)")
    fd = _series(steps, r"diag/(fd|tsr_entropy)")
    if fd:
        written.append(
            _line_plot(out_dir / "fd.png", fd, pre + "Feature Disentanglement (lower = more disentangled)", "value")
        )
    gds = _series(steps, r"diag/((?:param|feature)/gds_(?:mean|min))")
    if gds:
        written.append(_line_plot(out_dir / "gds.png", gds, pre + "gradient direction similarity", "cosine"))
    gms = _series(steps, r"diag/((?:param|feature)/gms_(?:mean|min))")
    if gms:
        written.append(_line_plot(out_dir / "gms.png", gms, pre + "gradient magnitude similarity", "GMS"))
    norms = _series(steps, r"diag/((?:param|feature)/grad_norm/.+)")
    if norms:
        written.append(
            _line_plot(out_dir / "grad_norms.png", norms, pre + "per-task gradient norms", "‖g_t‖", logy=True)
        )
    if not (fd or gds or gms):
        notes.append("no diagnostics in the log: train with monitor.every=K (e.g. --set monitor.every=10)")

    val_keys = sorted(
        {k for r in epochs for k in r if k.startswith("val/") and k.count("/") == 2 and not k.startswith("val/loss/")}
    )
    if val_keys:
        tasks = sorted({k.split("/")[1] for k in val_keys})
        plt = _plt()
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
        for ax, t in zip(axes[0], tasks):
            for k in [k for k in val_keys if k.split("/")[1] == t]:
                xs = [r["epoch"] for r in epochs if k in r]
                ax.plot(xs, [r[k] for r in epochs if k in r], marker="o", label=k.split("/")[2])
            ax.set_title(f"val: {t}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(pre + "validation metrics")
        fig.tight_layout()
        fig.savefig(out_dir / "val.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "val.png")
    return written, notes


def plot_alpha(summary: dict[str, float], path: Path, method: str) -> Path:
    plt = _plt()
    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3.5))
    ax.bar(range(len(names)), [summary[n] for n in names], color="tab:blue")
    ax.axhspan(2, 4, color="tab:green", alpha=0.12, label="α in [2, 4]: well trained")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("power-law α (median over layers)")
    ax.set_title(f"power-law α per component ({method})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
