"""UPGrad's decision inside a training step: the small-T Python route against the general route.

Usage::

    python benchmarks/dual_cone_in_step.py                       # conv and MLP at T = 3, 5, 6, 8
    python benchmarks/dual_cone_in_step.py --kinds conv --tasks 5 --steps 300

Each step runs the scaling study's workload (``run_all.Workload``: forward, the per-task Jacobian into one
``(T, P)`` matrix, its Gramian), then times one decision on that step's Gramian with the compute thread's
CPU clock: ``UPGrad().weights`` (the Python route of ``mtlens.methods._qp.dual_cone_rows`` for
T ≤ ``SMALL_T``, else the general route) or the same call with that route switched off (UPGrad as it was
before it: the shortcuts without conflict and for T = 2, then ``dual_cone_weights``: an eigendecomposition
and one scipy NNLS per conflicting row). The two alternate in a fresh
random order every step, so both run right after a backward, where the interpreter's code and data are
cold — which is where a decision runs in training, and where it costs ≈ 2–4× its warm time in a loop of
decisions (docs/performance.md, "The dual-cone projection at few tasks"). Medians in µs; ``without / with`` is the
median of the per-step ratios of neighbouring calls.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import JacobianFloor, Workload  # noqa: E402  (the scaling study's synthetic workloads)

from mtlens.engine.gramian import gramian_from_blocks  # noqa: E402
from mtlens.methods import _qp, create  # noqa: E402

BATCH = {"conv": 8, "mlp": 256}


def measure(kind: str, T: int, steps: int, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    w = Workload(kind, T, BATCH[kind])
    jf = JacobianFloor(w)
    upgrad = create("upgrad")
    small = _qp.SMALL_T

    def general(G: torch.Tensor) -> torch.Tensor:  # UPGrad with its Python route switched off: as before it
        _qp.SMALL_T = 0
        try:
            return upgrad.weights(G)
        finally:
            _qp.SMALL_T = small

    rows = {"UPGrad": upgrad.weights, "without the Python route": general}  # same object: same state
    times: dict[str, list[float]] = {k: [] for k in rows}
    rng = random.Random(seed)
    for step in range(steps + 3):
        for name in rng.sample(list(rows), len(rows)):
            w.zero()
            jf.rows()
            G = gramian_from_blocks([jf.J])
            t0 = time.thread_time()
            rows[name](G)
            if step >= 3:  # warm-up steps are not counted
                times[name].append(time.thread_time() - t0)
    out = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    out["without / with"] = statistics.median(g / u for g, u in zip(times["without the Python route"], times["UPGrad"]))
    G = gramian_from_blocks([jf.J])
    out["conflicting pairs"] = float(int((torch.triu(G, 1) < 0).sum()))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="conv,mlp")
    ap.add_argument("--tasks", default="3,5,6,8")
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    kinds, tasks = args.kinds.split(","), [int(t) for t in args.tasks.split(",")]
    print(f"torch {torch.__version__}, 1 thread, thread CPU clock, {args.steps} steps per point; "
          f"Python route for T ≤ {_qp.SMALL_T}\n")
    print("| workload | T | conflicting pairs | UPGrad, µs | without the Python route (before), µs | without / with |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in kinds:
        for T in tasks:
            r = measure(kind, T, args.steps)
            before, ratio = r["without the Python route"], r["without / with"]
            print(f"| {kind} | {T} | {r['conflicting pairs']:.0f} | {r['UPGrad']:.0f} | {before:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
