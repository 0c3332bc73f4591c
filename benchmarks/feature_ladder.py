"""Feature-level MGDA built up from its floor, one part at a time, in ONE process (rows interleaved).

    python benchmarks/feature_ladder.py --kinds conv,mlp --tasks 3,11,40 --steps 60

On the synthetic scaling workloads of ``benchmarks/run_all.py`` it times, step by step in turn and in
thread CPU time (``time.thread_time``: descheduled time on a shared machine is not counted), these rows:

* ``EW``: ``mtl_backward`` with equal weights (the target's reference);
* ``floor``: T head backwards to ``∂L_t/∂Z`` (and the head's gradient), one encoder VJP of ``Σ_t S_t``;
* ``stack+comb``: the floor with the saliencies stacked into the engine's pooled block and combined by
  ``tensordot`` (uniform weights);
* ``+gram``: and the Gramian of the block (``gramian_from_blocks``);
* ``+dec``: and MGDA's decision from it (``MGDA.weights``), whose weights the combination uses;
* ``mgda``: the engine's ``mtl_backward(..., method=MGDA, level="feature")``.

Each row's median over ``--steps`` steps; the differences between consecutive rows are what each part
costs *inside* a step (after the backward passes, where small calls cost several times their warm time),
and ``mgda − +dec`` is the engine's own cost above the same maths written by hand.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_all import Workload  # noqa: E402

from mtlens.engine import mtl_backward, pool  # noqa: E402
from mtlens.engine.gramian import gramian_from_blocks  # noqa: E402
from mtlens.methods import create  # noqa: E402


def rows_for(w: Workload) -> dict:
    T = w.T
    mgda, ew = create("mgda"), create("ew")
    heads = [list(h.parameters()) for h in w.heads]
    ones = torch.ones(T, dtype=torch.float64)

    def engine(method, level):
        def f():
            w.zero()
            z, losses = w.forward()
            mtl_backward(losses, features=z, shared_params=w.shared, method=method, level=level)

        return f

    def saliencies():
        w.zero()
        z, losses = w.forward()
        return z, [torch.autograd.grad(L, [z] + heads[t], retain_graph=True)[0] for t, L in enumerate(losses.values())]

    def floor():
        z, sal = saliencies()
        torch.autograd.grad(z, w.shared, grad_outputs=sum(sal))

    def ladder(gram: bool, dec: bool):
        def f():
            z, sal = saliencies()
            S = pool.stack(sal)
            wt = torch.full((T,), 1.0 / T, dtype=torch.float64)
            if gram:
                G = gramian_from_blocks([S])
                if dec:
                    wt = mgda.weights(G, ones)
            torch.autograd.grad(z, w.shared, grad_outputs=torch.tensordot(wt.to(S.dtype), S, dims=1))

        return f

    return {
        "EW": engine(ew, None),
        "floor": floor,
        "stack+comb": ladder(False, False),
        "+gram": ladder(True, False),
        "+dec": ladder(True, True),
        "mgda": engine(mgda, "feature"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="conv,mlp")
    ap.add_argument("--tasks", default="3,11,40")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| workload | T | " + " | ".join(("EW ms", "floor", "stack+comb", "+gram", "+dec", "mgda")) + " |")
    print("|---|---:|" + "---:|" * 6)
    for kind in args.kinds.split(","):
        for T in (int(t) for t in args.tasks.split(",")):
            rows = rows_for(Workload(kind, T, 8 if kind == "conv" else 256))
            for f in rows.values():
                for _ in range(5):
                    f()
            times: dict[str, list[float]] = {k: [] for k in rows}
            for _ in range(args.steps):
                for k, f in rows.items():
                    t0 = time.thread_time()
                    f()
                    times[k].append(time.thread_time() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            cells = [f"{med['EW']:.2f}"] + [f"{med[k]:.2f} ({med[k] / med['EW']:.2f})" for k in list(rows)[1:]]
            print(f"| {kind} | {T} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
