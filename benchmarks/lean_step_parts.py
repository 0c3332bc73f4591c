"""The lean Gramian steps' own work, part by part, inside the training loop (feature or parameter level).

Usage::

    python benchmarks/lean_step_parts.py --kind conv --tasks 3 --level feature
    python benchmarks/lean_step_parts.py --kind conv --tasks 3 --level param --steps 300

On the scaling study's synthetic workloads (``benchmarks/run_all.py``: conv B = 8, MLP B = 256), one
``mtl_backward`` step (MGDA at ``level="feature"``, UPGrad at ``level="param"``) alternates with the target's
arithmetic floor (``MGDA feature arithmetic (floor)`` / ``UPGrad param arithmetic (floor)``, the same rows as
``run_all.py``), the order swapped every step. Every function the lean step calls
(``mtlens.engine.feature_step`` / ``param_step`` and the helpers they import) is wrapped by a timer (thread CPU
clock, ≈ 1 µs per wrapper, so the engine row carries ≈ 20–30 µs of wrappers); the table gives each part's median
time per step — nested parts are included in their callers (``decide_and_write`` holds the encoder VJP at feature
level; the ``vjp`` rows sum the autograd calls of the heads pass and, at parameter level, of the
encoder). ``mtl_backward − lean step`` is what ``mtl_backward``
spends before and after the lean step (the option checks, ``trainable``, ``resolve``). What the floor does too —
the autograd calls, the Gramian, the decision, the finiteness check — is the floor's; the rest is the engine's own
cost (docs/performance.md, "The engine's own cost at small T").
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import Workload, step_fns  # noqa: E402

import mtlens.engine.backward as bk  # noqa: E402
import mtlens.engine.feature_step as fs  # noqa: E402
import mtlens.engine.param_step as ps  # noqa: E402
from mtlens.engine import mtl_backward  # noqa: E402
from mtlens.methods import create  # noqa: E402

ACC: collections.defaultdict[str, float] = collections.defaultdict(float)


def wrap(mod, name: str, label: str | None = None) -> None:
    """Replace ``mod.name`` by a timed wrapper that adds its thread CPU time to ``ACC[label]``."""
    f = getattr(mod, name)
    key = label or name

    def timed(*a, **k):
        t0 = time.thread_time()
        try:
            return f(*a, **k)
        finally:
            ACC[key] += time.thread_time() - t0

    setattr(mod, name, timed)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="conv", choices=("conv", "mlp"))
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--level", default="feature", choices=("feature", "param"))
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    level = args.level
    mod = fs if level == "feature" else ps
    for name in ("lean_start", "lean_heads_pass", "gramian_problem", "decide_and_write"):
        wrap(mod, name)
    if level == "feature":
        wrap(fs.pool, "stack", "pool.stack (the saliency block)")
        wrap(fs, "gramian_from_blocks")
    else:
        wrap(ps.pool, "stack", "pool.stack (the record's saliencies)")
        for name in ("gramian_from_matrix", "jacobian_workspace", "_write_row"):
            wrap(ps, name)
    for name in ("_walk_heads", "check_only_route", "_retain_flags", "_fresh_rows", "all_finite", "_accumulate",
                 "normalise_losses", "normalise_features", "_entries"):
        wrap(fs, name)
    wrap(fs, "vjp", "vjp (autograd calls: the heads pass)")
    if level == "param":
        wrap(ps, "vjp", "vjp (autograd calls: the encoder VJPs, the last task's one call)")
    for name in ("trainable", "check_loss_transform", "resolve"):
        wrap(bk, name)
    wrap(bk, f"{level}_step", "lean step")

    w = Workload(args.kind, args.tasks, 8 if args.kind == "conv" else 256)
    method = create("mgda" if level == "feature" else "upgrad")
    made = {n: create(n) for n in ("mgda", "upgrad", "ew", "uw", "pcgrad", "rep_mtl")}
    floor = step_fns(w, made, False)["MGDA feature arithmetic (floor)" if level == "feature"
                                     else "UPGrad param arithmetic (floor)"]

    def engine() -> None:
        w.zero()
        z, losses = w.forward()
        t0 = time.thread_time()
        mtl_backward(losses, features=z, shared_params=w.shared, method=method, level=level)
        ACC["mtl_backward"] += time.thread_time() - t0

    for _ in range(5):
        engine()
        floor()
    parts: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
    te: list[float] = []
    tf: list[float] = []
    for i in range(args.steps):
        ACC.clear()
        for f, out in ((engine, te), (floor, tf)) if i % 2 else ((floor, tf), (engine, te)):
            t0 = time.thread_time()
            f()
            out.append(time.thread_time() - t0)
        for k, v in ACC.items():
            parts[k].append(v)
    parts["mtl_backward − lean step"] = [a - b for a, b in zip(parts["mtl_backward"], parts["lean step"])]
    ratio = statistics.median(a / b for a, b in zip(te, tf))
    print(f"{args.kind} T={args.tasks}, level={level}, torch {torch.__version__}, 1 thread, thread CPU clock, "
          f"{args.steps} alternating steps: engine {statistics.median(te) * 1e3:.3f} ms, floor "
          f"{statistics.median(tf) * 1e3:.3f} ms, engine / floor {ratio:.3f} (median of per-step ratios)")
    print("\n| part | µs per step (median) |\n|---|---:|")
    for k, v in sorted(parts.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"| {k} | {statistics.median(v) * 1e6:.1f} |")


if __name__ == "__main__":
    main()
