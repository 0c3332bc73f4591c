"""Build a real benchmark results store for report tests, by running the trainer.

The layout is the store contract shared with ``mtlens bench`` (see docs/benchmark.md)::

    DIR/suite.yaml, DIR/index.json, DIR/runs/<key>/{run.json, results.json, log.jsonl, best.pt, ...},
    DIR/baselines/<benchmark>-<task>-<hash>/{run.json, results.json, ...}

Every ``done`` run is a real (short) training of the quick MultiMNIST preset; ``failed`` and
``pending`` runs are entries without results, as the executor leaves them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mtlens.train import load_config, run

VARIANT_REGULARIZERS = {
    "none": [],
    "rep_mtl": [{"name": "rep_mtl", "hparams": {"lambda_tsr": 0.1, "lambda_csa": 0.1}}],
    "rep_mtl_tsr": [{"name": "rep_mtl", "hparams": {"lambda_tsr": 0.1, "lambda_csa": 0.1, "csa": False}}],
    "rep_mtl_csa": [{"name": "rep_mtl", "hparams": {"lambda_tsr": 0.1, "lambda_csa": 0.1, "tsr": False}}],
}


@dataclass
class RunSpec:
    method: str
    level: str = "loss"  # "loss" | "param" | "feature"
    variant: str = "none"
    seed: int = 0
    status: str = "done"  # "done" trains; "failed" / "pending" / "running" only write the entry
    error: str | None = None
    extra: list[str] = field(default_factory=list)  # more --set style overrides


QUICK_OVERRIDES = [
    "train.epochs=2",
    "train.max_steps_per_epoch=8",
    "train.batch_size=32",
    "monitor.every=2",
    "train.device=cpu",
]


def _label(s: RunSpec) -> str:
    lab = s.method if s.level == "loss" else f"{s.method} ({s.level})"
    return lab + ("" if s.variant == "none" else f" + {s.variant}")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def build_store(
    root: Path,
    specs: list[RunSpec],
    *,
    preset: str = "quick-multimnist",
    overrides: list[str] = QUICK_OVERRIDES,
    suite: str = "test-suite",
) -> Path:
    """Train every ``done`` spec into ``root/runs/<key>`` and write run.json, index.json and suite.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in specs:
        cfg = load_config(preset, overrides=list(overrides) + list(s.extra) + [f"train.seed={s.seed}"])
        d = cfg.model_dump(mode="json")
        d["method"] = {**d["method"], "name": s.method, "level": None if s.level == "loss" else s.level, "hparams": {}}
        d["regularizers"] = VARIANT_REGULARIZERS[s.variant]
        d["baseline_cache"] = str(root / "baselines")
        d["out_dir"] = None
        key = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
        run_dir = root / "runs" / key
        d["out_dir"] = str(run_dir)
        entry = {
            "key": key,
            "label": _label(s),
            "benchmark": cfg.data.benchmark,
            "method": s.method,
            "level": s.level,
            "variant": s.variant,
            "seed": s.seed,
            "kind": "mtl",
            "task": None,
            "status": s.status,
            "attempts": 0,
            "error": None,
            "traceback": None,
            "started": None,
            "finished": None,
            "wall_s": None,
            "results": None,
        }
        if s.status == "done":
            t0 = time.time()
            run(d, quiet=True)
            entry.update(
                attempts=1,
                started=t0,
                finished=time.time(),
                wall_s=time.time() - t0,
                results=f"runs/{key}/results.json",
            )
        elif s.status == "failed":
            entry.update(
                attempts=2,
                error=s.error or "RuntimeError: the solver diverged",
                traceback="Traceback (most recent call last):\n  ...\nRuntimeError: the solver diverged",
            )
        elif s.status == "running":
            entry.update(attempts=1, started=time.time())
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "run.json", entry)
        entries.append(entry)
    # the STL baselines the runs trained, as the executor records them
    for res_path in sorted((root / "baselines").glob("*/results.json")):
        res = json.loads(res_path.read_text())
        key = res_path.parent.name
        task = res["tasks"][0]
        entry = {
            "key": key,
            "label": f"STL {task}",
            "benchmark": res["benchmark"],
            "method": "stl",
            "level": "loss",
            "variant": "none",
            "seed": res["config"]["train"]["seed"],
            "kind": "stl",
            "task": task,
            "status": "done",
            "attempts": 1,
            "error": None,
            "traceback": None,
            "started": None,
            "finished": None,
            "wall_s": None,
            "results": f"baselines/{key}/results.json",
        }
        _write_json(res_path.parent / "run.json", entry)
        entries.append(entry)
    _write_json(root / "index.json", {"format": "mtlens-bench-index", "version": 1, "suite": suite, "runs": entries})
    (root / "suite.yaml").write_text(yaml.safe_dump({"name": suite, "preset": preset, "overrides": overrides}))
    return root


# the specs of the shared report fixture: loss/gradient families at both levels, the Rep-MTL ablation,
# two seeds, one failed and one pending run
REPORT_SPECS = [
    *(RunSpec("ew", seed=s) for s in (0, 1)),
    # UW is not defined on log losses (the quick preset's transform): it trains on the raw losses
    *(RunSpec("uw", seed=s, extra=["loss_transform=none"]) for s in (0, 1)),
    *(RunSpec(m, level=lv, seed=s) for m in ("mgda", "pcgrad") for lv in ("param", "feature") for s in (0, 1)),
    *(RunSpec("ew", variant=v, seed=s) for v in ("rep_mtl", "rep_mtl_tsr", "rep_mtl_csa") for s in (0, 1)),
    RunSpec(
        "cagrad",
        level="param",
        seed=0,
        status="failed",
        error="NonFiniteError: step 3: the combined gradient is not finite",
    ),
    RunSpec("cagrad", level="param", seed=1, status="pending"),
]


def write_fake_store(root: Path, runs: list[dict], suite: str = "fake") -> Path:
    """A store whose results.json hold given numbers (no training): for exact checks of the report's arithmetic.

    Each item: ``{"method", "level", "variant", "seed", "status", "acc": {task: value}, "delta": float,
    "diag": {key: value}, "step_s": float, "peak": bytes or None, "benchmark": str}``; missing keys get
    defaults. The Δ conventions are derived from ``delta`` (Δp_task = Δp_metric = −Δm)."""
    entries = []
    for i, r in enumerate(runs):
        s = RunSpec(
            r["method"], r.get("level", "loss"), r.get("variant", "none"), r.get("seed", 0), r.get("status", "done")
        )
        key = f"k{i:03d}"
        bench = r.get("benchmark", "multimnist")
        entry = {
            "key": key,
            "label": _label(s),
            "benchmark": bench,
            "method": s.method,
            "level": s.level,
            "variant": s.variant,
            "seed": s.seed,
            "kind": r.get("kind", "mtl"),
            "task": r.get("task"),
            "status": s.status,
            "attempts": 1,
            "error": r.get("error"),
            "traceback": None,
            "started": None,
            "finished": None,
            "wall_s": None,
            "results": None,
        }
        entry.update(r.get("entry", {}))
        d = root / "runs" / key
        d.mkdir(parents=True, exist_ok=True)
        if s.status == "done":
            acc = r.get("acc", {"left": 90.0, "right": 88.0})
            delta = r.get("delta", 0.0)
            res = {
                "format": "mtlens-results",
                "version": 1,
                "kind": entry["kind"],
                "benchmark": bench,
                "tasks": list(acc),
                "method": s.method,
                "metric_directions": {t: {"acc": True} for t in acc},
                "metrics": {
                    "val": {t: {"acc": v} for t, v in acc.items()},
                    "test": {t: {"acc": v} for t, v in acc.items()},
                },
                "delta": None
                if delta is None
                else {"test": {"delta_p_task": delta, "delta_p_metric": delta, "delta_m": -delta}},
                "diagnostics": {"mean": r.get("diag", {}), "final": r.get("diag", {})},
                "config": {"loss_transform": r.get("loss_transform")},
                "timings": {
                    "mean_step_s": r.get("step_s", 0.01),
                    "peak_memory": {"peak_bytes": (r.get("peak") or 0) + 10**8, "start_bytes": 10**8, "source": "fake"}
                    if r.get("peak") is not None
                    else None,
                },
            }
            if r.get("corrupt"):
                (d / "results.json").write_text("{ torn")
            elif r.get("sealed"):
                from mtlens.storage import write_json

                write_json(d / "results.json", res)
            else:
                _write_json(d / "results.json", res)
            entry["results"] = f"runs/{key}/results.json"
        _write_json(d / "run.json", entry)
        entries.append(entry)
    _write_json(root / "index.json", {"format": "mtlens-bench-index", "version": 1, "suite": suite, "runs": entries})
    return root
