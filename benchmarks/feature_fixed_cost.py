"""Feature-level Gramian steps of this checkout against another engine, in ONE process, round-robin.

    mkdir /tmp/ref && git archive <rev> src/mtlens | tar -x -C /tmp/ref
    mv /tmp/ref/src/mtlens /tmp/ref/src/mtlens_ref
    python benchmarks/feature_fixed_cost.py --reference /tmp/ref/src --kinds conv,mlp --tasks 2,3,5,11,20,40

On the synthetic scaling workloads of ``benchmarks/run_all.py`` (conv: B = 8, Z 64×8×8; MLP: B = 256,
Z 256) it times EW, the ``feature floor`` (T head backwards to ``∂L_t/∂Z`` and one encoder VJP, nothing
else), the ``MGDA floor`` (``run_all.py``'s ``MGDA feature arithmetic (floor)``: MGDA's maths as raw
torch calls, the target's arithmetic floor) and the ``--methods`` (default MGDA, UPGrad) at
``level="feature"`` — with this checkout's ``mtlens`` and, with ``--reference``, with a copy of another
revision imported as ``mtlens_ref`` (its package renamed; mtlens imports itself only relatively) — rows
round-robin, each sample 5 steps, in **thread CPU time** (``time.thread_time``: time the process spends
descheduled on a shared machine is not counted; cache interference still is). Ratios are medians of
same-round ratios. Also prints the minor page faults per MGDA step (``resource.getrusage().ru_minflt``).
"""

from __future__ import annotations

import argparse
import importlib
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_all import Workload, step_fns  # noqa: E402

import mtlens.engine  # noqa: E402
import mtlens.methods  # noqa: E402
from mtlens.engine import pool  # noqa: E402
from mtlens.engine._autograd import vjp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="2,3,5,11,20,40")
    ap.add_argument("--kinds", default="conv,mlp")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reference", default=None, help="a folder holding the other revision as package mtlens_ref")
    ap.add_argument("--methods", default="MGDA,UPGrad", help="feature-level Gramian methods to time (registry names)")
    ap.add_argument("--pool-ab", action="store_true",
                    help="also time MGDA with the saliency pool off (mtlens.engine.pool: plain torch.stack)")
    ap.add_argument("--pool-min-bytes", type=int, default=None,
                    help="set mtlens.engine.pool.MIN_BYTES for the whole run (the allocator's state is per process: "
                         "compare two runs, e.g. 0 and the default)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.pool_min_bytes is not None:
        pool.MIN_BYTES = args.pool_min_bytes
    engines = {"": (mtlens.engine.mtl_backward, mtlens.methods.create)}
    if args.reference:
        sys.path.insert(0, args.reference)
        ref_e, ref_m = importlib.import_module("mtlens_ref.engine"), importlib.import_module("mtlens_ref.methods")
        engines = {" ref": (ref_e.mtl_backward, ref_m.create), **engines}
    methods = args.methods.split(",")
    cols = [f"{m}{tag}" for m in methods for tag in engines] + (["MGDA no pool"] if args.pool_ab else [])
    mgda = [c for c in cols if c.startswith("MGDA")]
    print(
        "| workload | T | EW ms | floor / EW | MGDA floor / EW | "
        + " | ".join(f"{c} / EW" for c in cols)
        + "".join(f" | {c} / MGDA floor" for c in mgda)
        + " | MGDA faults / step |"
    )
    print("|---|---:|---:|---:|---:|" + "---:|" * len(cols) + "---:|" * len(mgda) + "---:|")
    for kind in args.kinds.split(","):
        for T in (int(t) for t in args.tasks.split(",")):
            w = Workload(kind, T, 8 if kind == "conv" else 256)

            def step(backward, method, level, w=w):
                def run():
                    w.zero()
                    z, losses = w.forward()
                    backward(losses, features=z, shared_params=w.shared, method=method, level=level)

                return run

            def floor(w=w):
                w.zero()
                z, losses = w.forward()
                sal = [
                    vjp(L, [z] + list(w.heads[t].parameters()), retain_graph=True)[0]
                    for t, L in enumerate(losses.values())
                ]
                vjp(z, w.shared, grad_outputs=sum(sal))

            made = {n: mtlens.methods.create(n) for n in ("mgda", "ew", "uw", "upgrad", "pcgrad", "rep_mtl")}
            arithmetic = step_fns(w, made, False)["MGDA feature arithmetic (floor)"]
            rows = {"EW": step(mtlens.engine.mtl_backward, mtlens.methods.create("ew"), None), "floor": floor,
                    "MGDA floor": arithmetic}
            for m in methods:
                for tag, (backward, create) in engines.items():
                    rows[f"{m}{tag}"] = step(backward, create(m.lower()), "feature")
            if args.pool_ab:
                pooled = step(mtlens.engine.mtl_backward, mtlens.methods.create("mgda"), "feature")

                def unpooled(pooled=pooled):
                    keep, pool.MIN_BYTES = pool.MIN_BYTES, 1 << 62  # every stack below the pool's threshold
                    try:
                        pooled()
                    finally:
                        pool.MIN_BYTES = keep

                rows["MGDA no pool"] = unpooled
            for f in rows.values():
                for _ in range(3):
                    f()
            times: dict[str, list[float]] = {k: [] for k in rows}
            faults: dict[str, list[float]] = {k: [] for k in rows}
            for _ in range(args.rounds):
                for k, f in rows.items():
                    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0 = time.thread_time()
                    for _ in range(5):
                        f()
                    times[k].append((time.thread_time() - t0) / 5 * 1e3)
                    faults[k].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5)

            def ratio(a: str, b: str, times: dict[str, list[float]] = times) -> float:
                return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

            flt = " → ".join(f"{statistics.median(faults[c]):.0f}" for c in mgda)
            print(
                f"| {kind} | {T} | {statistics.median(times['EW']):.2f} | {ratio('floor', 'EW'):.3f} | "
                f"{ratio('MGDA floor', 'EW'):.3f} | "
                + " | ".join(f"{ratio(c, 'EW'):.3f}" for c in cols)
                + "".join(f" | {ratio(c, 'MGDA floor'):.3f}" for c in mgda)
                + f" | {flt} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
